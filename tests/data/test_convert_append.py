"""`hpcbrain convert --append`: waves of sessions added to a store give the scans, images and
columns of one conversion of everything, and the shard files already there keep their bytes."""
from __future__ import annotations

import numpy as np
import pytest
import zarr
from sources import arriving_in_waves
from store_checks import assert_same_scans, shard_hashes

from hpcbrain.cli import main
from hpcbrain.data import append as append_module
from hpcbrain.data.append import NothingToAppend
from hpcbrain.data.convert import ConversionError, convert_cohort
from hpcbrain.data.convert_blocks import convert_block, finish_conversion, plan_conversion
from hpcbrain.data.ledger import read_ledger
from hpcbrain.data.store import CohortStore

S = 8
PER_SHARD = 3


@pytest.fixture
def waves(tmp_path):
    return arriving_in_waves(tmp_path)


def test_appended_waves_equal_one_conversion_and_leave_shards_alone(waves, tmp_path):
    out = tmp_path / "cohort.zarr"
    convert_cohort(waves(1), out, S, scans_per_shard=PER_SHARD, progress=False)
    assert len(CohortStore(out)) == 4                 # shards of 3 + 1: the last one partial
    before = shard_hashes(out)
    report = convert_cohort(waves(2), out, S, append=True, progress=False)
    assert report.n_converted == 4
    after_two = shard_hashes(out)
    assert {k: after_two[k] for k in before} == before   # not one byte of a shard rewritten
    assert main(["convert", str(waves(3)), "--out", str(out), "--shape", str(S), "--append",
                 "--quiet"]) == 0
    after = shard_hashes(out)
    assert {k: after[k] for k in after_two} == after_two

    reference = convert_cohort(waves(3), tmp_path / "all.zarr", S, scans_per_shard=PER_SHARD,
                               progress=False, qc_report=False).out
    assert_same_scans(out, reference)
    cohort = CohortStore(out)
    assert len(cohort) == 15
    # plain zarr reads scan i at image_row[i]; waves start at shard boundaries (4 → 6 → 12)
    group = zarr.open_group(str(out), mode="r")
    rows = group["image_row"][...]
    assert rows.tolist() == [0, 1, 2, 3, 6, 7, 8, 9, 12, 13, 14, 15, 16, 17, 18]
    for i in (0, 5, 14):
        np.testing.assert_array_equal(group["images"][rows[i]], cohort.read_image(i, None))
    info = cohort.info
    assert info["n_scans"] == 15
    assert [a["first_row"] for a in info["appended"]] == [6, 12]
    ledger = read_ledger(out)
    assert sorted(r["store_index"] for r in ledger) == list(range(15))
    assert all(r["status"] == "ok" for r in ledger)
    assert (tmp_path / "cohort_qc" / "index.html").read_text().count("sub-05") >= 1
    assert not list(tmp_path.glob("cohort.zarr.*"))     # no wave, staging or old copy left

    # nothing new: a no-op that says so
    assert convert_cohort(waves(3), out, S, append=True, progress=False).n_converted == 0
    assert shard_hashes(out) == after


@pytest.mark.parametrize("change, key", [({"dtype": "float32"}, "dtype"),
                                         ({"shape": S + 2}, "shape"),
                                         ({"codec": "zstd"}, "codec")])
def test_append_with_other_settings_is_refused(waves, tmp_path, change, key):
    out = tmp_path / "cohort.zarr"
    convert_cohort(waves(1), out, S, scans_per_shard=PER_SHARD, progress=False,
                   qc_report=False)
    before = shard_hashes(out)
    args = {"shape": S, **change}
    with pytest.raises(ConversionError, match=f"{key}: the store has"):
        convert_cohort(waves(2), out, args.pop("shape"), append=True, progress=False, **args)
    assert shard_hashes(out) == before and len(CohortStore(out)) == 4


def test_append_to_a_missing_store_says_what_to_do(waves, tmp_path):
    with pytest.raises(ConversionError, match="without --append"):
        convert_cohort(waves(1), tmp_path / "none.zarr", S, append=True, progress=False)


def test_a_merge_killed_between_its_renames_is_finished_by_the_rerun(waves, tmp_path,
                                                                     monkeypatch):
    out = tmp_path / "cohort.zarr"
    convert_cohort(waves(1), out, S, scans_per_shard=PER_SHARD, progress=False,
                   qc_report=False)
    real_rename = append_module.os.rename

    def rename(src, dst):
        if str(src).endswith(".appending"):  # the store moved aside, the merged one not yet in
            raise KeyboardInterrupt("killed")
        real_rename(src, dst)

    monkeypatch.setattr(append_module.os, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        convert_cohort(waves(2), out, S, append=True, progress=False, qc_report=False)
    monkeypatch.setattr(append_module.os, "rename", real_rename)
    assert not out.exists()                  # the worst moment: only the two copies exist
    report = convert_cohort(waves(2), out, S, append=True, progress=False, qc_report=False)
    assert report.n_converted == 0           # the merge was complete: the rerun finishes it
    reference = convert_cohort(waves(2), tmp_path / "all.zarr", S, scans_per_shard=PER_SHARD,
                               progress=False, qc_report=False).out
    assert_same_scans(out, reference)
    assert not list(tmp_path.glob("cohort.zarr.*"))


def test_an_append_in_blocks_equals_the_local_one(waves, tmp_path):
    """The Slurm array's path (plan, blocks in any order, the assembling step) with --append."""
    out = tmp_path / "cohort.zarr"
    convert_cohort(waves(1), out, S, scans_per_shard=PER_SHARD, progress=False,
                   qc_report=False)
    before = shard_hashes(out)
    plan = plan_conversion(waves(3), out, S, tasks=2, append=True)
    assert plan.append_to == str(out) and plan.n_candidates == 11
    for block in reversed(range(len(plan.blocks))):
        convert_block(plan, block)
    report = finish_conversion(plan, qc_report=False)
    assert report.n_converted == 11 and report.out == out
    after = shard_hashes(out)
    assert {k: after[k] for k in before} == before
    reference = convert_cohort(waves(3), tmp_path / "all.zarr", S, scans_per_shard=PER_SHARD,
                               progress=False, qc_report=False).out
    assert_same_scans(out, reference)
    assert not list(tmp_path.glob("cohort.zarr.*"))
    with pytest.raises(NothingToAppend):
        plan_conversion(waves(3), out, S, tasks=2, append=True)
