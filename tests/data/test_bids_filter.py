"""--bids-filter: choosing among several T1w images of a session, as labs' BIDS datasets have."""
from __future__ import annotations

import json
import shutil

import pytest
from sources import make_bids, phantom, save

from hpcbrain.data.bids_filter import BidsFilterError, entities, load_filter, matches
from hpcbrain.data.convert import ConversionError, convert_cohort
from hpcbrain.data.discover import discover_scans
from hpcbrain.data.store import CohortStore


def test_entities_of_a_file_name():
    assert entities("sub-01_ses-02_acq-mprage_run-01_T1w.nii.gz") == \
        {"sub": "01", "ses": "02", "acq": "mprage", "run": "01"}
    assert entities("/x/sub-7_T1w.nii") == {"sub": "7"}


def test_filters_in_fmriprep_and_flat_forms(tmp_path):
    nested = load_filter('{"t1w": {"acquisition": "mprage", "run": 1}}')
    assert nested == {"acq": ["mprage"], "run": ["1"]}
    assert load_filter('{"acq": ["mprage", "fl3d"], "rec": null}') == \
        {"acq": ["mprage", "fl3d"], "rec": [None]}
    path = tmp_path / "filter.json"
    path.write_text(json.dumps({"t1w": {"run": 2}}))
    assert load_filter(str(path)) == {"run": ["2"]}
    assert matches("sub-01_ses-01_acq-mprage_run-01_T1w.nii.gz", nested)
    assert not matches("sub-01_ses-01_acq-mprage_run-02_T1w.nii.gz", nested)
    assert not matches("sub-01_ses-01_run-01_T1w.nii.gz", nested)          # acq missing
    assert matches("sub-01_ses-01_T1w.nii.gz", load_filter('{"rec": null}'))  # absent: ok
    assert matches("anything_T1w.nii", None)
    with pytest.raises(BidsFilterError, match="unknown entity 'task'"):
        load_filter('{"task": "rest"}')
    with pytest.raises(BidsFilterError, match="neither JSON nor a JSON file"):
        load_filter("run=1")


@pytest.fixture
def two_runs(tmp_path):
    """make_bids' dataset where sub-01 ses-01 has run-1 and run-2 (and an mprage run-1)."""
    root = make_bids(tmp_path / "bids", n_subjects=2, n_sessions=1)
    anat = root / "sub-01" / "ses-01" / "anat"
    plain = anat / "sub-01_ses-01_T1w.nii.gz"
    shutil.move(plain, anat / "sub-01_ses-01_run-1_T1w.nii.gz")
    save(anat / "sub-01_ses-01_run-2_T1w.nii.gz", phantom((14, 12, 10), seed=99))
    return root


def test_repeat_runs_use_the_lowest_run(two_runs, tmp_path):
    scans, _ = discover_scans(two_runs)
    assert [s.path.name for s in scans] == ["sub-01_ses-01_run-1_T1w.nii.gz",
                                            "sub-02_ses-01_T1w.nii.gz"]
    assert not any(s.problems for s in scans)


def test_two_acquisitions_are_a_duplicate_that_names_the_filter(two_runs, tmp_path):
    anat = two_runs / "sub-01" / "ses-01" / "anat"
    shutil.move(anat / "sub-01_ses-01_run-2_T1w.nii.gz",
                anat / "sub-01_ses-01_acq-fl3d_run-1_T1w.nii.gz")
    with pytest.raises(ConversionError, match="duplicate subject/session sub-01 ses-01.*"
                                              "--bids-filter"):
        convert_cohort(two_runs, tmp_path / "out.zarr", 8, progress=False)


def test_the_filter_picks_one_run_and_the_store_records_it(two_runs, tmp_path):
    spec = '{"t1w": {"run": [2, null]}}'       # run 2, or no run entity (sub-02)
    scans, _ = discover_scans(two_runs, spec)
    assert [s.path.name for s in scans] == ["sub-01_ses-01_run-2_T1w.nii.gz",
                                            "sub-02_ses-01_T1w.nii.gz"]
    out = convert_cohort(two_runs, tmp_path / "out.zarr", 8, bids_filter=spec,
                         progress=False).out
    store = CohortStore(out)
    assert [p.rsplit("/", 1)[1] for p in store.metadata["source_path"]] == \
        ["sub-01_ses-01_run-2_T1w.nii.gz", "sub-02_ses-01_T1w.nii.gz"]
    assert store.info["source"]["bids_filter"] == spec


def test_a_filter_on_a_manifest_is_refused(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,subject,age\n/x.nii.gz,sub-01,70\n")
    with pytest.raises(ConversionError, match="manifest names its images itself"):
        discover_scans(manifest, '{"run": 1}')
