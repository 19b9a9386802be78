"""The synthetic cohort: a valid BIDS dataset whose images carry the ground-truth brain age."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage as ndi

from hpcbrain.data import synth, synth_subjects
from hpcbrain.data.synth import synthesize_cohort

N_SUBJECTS = 8
VOXEL_MM = 4.0
GROUPS = {"NC", "sMCI", "pMCI", "AD"}


def read_tsv(path: Path) -> tuple[list[str], list[dict]]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter="\t")
        return list(reader.fieldnames), list(reader)


def t1w_path(root: Path, participant: str, session: str) -> Path:
    return root / participant / session / "anat" / f"{participant}_{session}_T1w.nii.gz"


def files_of(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> tuple[Path, synth.SynthSummary]:
    out = tmp_path_factory.mktemp("synth") / "cohort"
    summary = synthesize_cohort(out, N_SUBJECTS, seed=0, voxel_size_mm=VOXEL_MM, progress=False)
    return out, summary


@pytest.fixture(scope="module")
def truth(cohort) -> list[dict]:
    root, _ = cohort
    return read_tsv(root / "derivatives" / "synth" / "brain_age.tsv")[1]


def by_subject(rows: list[dict]) -> dict[str, list[dict]]:
    subjects: dict[str, list[dict]] = {}
    for row in rows:
        subjects.setdefault(row["participant_id"], []).append(row)
    return subjects


# ----------------------------------------------------------------------------- layout

def test_summary_and_bids_files(cohort):
    root, summary = cohort
    assert summary.out_dir == root and summary.n_subjects == N_SUBJECTS
    assert summary.shape == (50, 59, 48) and summary.voxel_size_mm == VOXEL_MM
    description = json.loads((root / "dataset_description.json").read_text())
    assert description["DatasetType"] == "raw" and description["BIDSVersion"]
    assert description["GeneratedBy"][0]["Name"] == "hpcbrain"
    assert "seed=0" in description["GeneratedBy"][0]["Description"]
    derived = json.loads((root / "derivatives/synth/dataset_description.json").read_text())
    assert derived["DatasetType"] == "derivative"
    parameters = json.loads((root / synth.MARKER).read_text())
    assert parameters["seed"] == 0 and parameters["model"]["rate"]["AD"] > 1
    images = sorted(root.glob("sub-*/ses-*/anat/sub-*_ses-*_T1w.nii.gz"))
    assert len(images) == summary.n_scans
    assert not list(root.parent.glob(".cohort.synth-*")), "temporary folders left behind"


def test_tables_have_exactly_the_documented_columns(cohort):
    root, summary = cohort
    columns, participants = read_tsv(root / "participants.tsv")
    assert columns == ["participant_id", "sex", "group"]
    assert [p["participant_id"] for p in participants] == [f"sub-{k:03d}"
                                                           for k in range(1, N_SUBJECTS + 1)]
    assert {p["sex"] for p in participants} <= {"M", "F"}
    assert {p["group"] for p in participants} == GROUPS
    n_scans = 0
    for p in participants:
        columns, sessions = read_tsv(root / p["participant_id"]
                                     / f"{p['participant_id']}_sessions.tsv")
        assert columns == ["session_id", "age", "diagnosis", "adas_cog"]
        assert [s["session_id"] for s in sessions] == [f"ses-{v:02d}"
                                                       for v in range(1, len(sessions) + 1)]
        for s in sessions:
            assert t1w_path(root, p["participant_id"], s["session_id"]).is_file()
            assert 0.0 <= float(s["adas_cog"]) <= 70.0
            assert len(s["age"].split(".")[1]) == 2
        n_scans += len(sessions)
    assert n_scans == summary.n_scans
    columns, truth = read_tsv(root / "derivatives/synth/brain_age.tsv")
    assert columns[:4] == ["participant_id", "session_id", "group", "age"]
    assert {"brain_age", "ventricle_dilation_mm", "ventricle_volume_ml",
            "cortex_thinning"} <= set(columns)
    assert len(truth) == n_scans


def test_visits_ages_and_diagnoses(cohort):
    root, _ = cohort
    _, participants = read_tsv(root / "participants.tsv")
    for p in participants:
        _, sessions = read_tsv(root / p["participant_id"] / f"{p['participant_id']}_sessions.tsv")
        ages = np.array([float(s["age"]) for s in sessions])
        diagnoses = [s["diagnosis"] for s in sessions]
        assert 2 <= len(sessions) <= 5
        assert 60.0 <= ages[0] <= 90.0
        gaps = np.diff(ages)
        assert np.all(gaps >= 0.5 - 1e-9) and np.all(gaps <= 2.0 + 1e-9), gaps
        expected = {"NC": {"CN"}, "sMCI": {"MCI"}, "AD": {"AD"}}.get(p["group"])
        if expected:
            assert set(diagnoses) == expected
        else:   # pMCI: MCI at baseline, AD at the end, never back
            assert diagnoses[0] == "MCI" and diagnoses[-1] == "AD"
            assert diagnoses == sorted(diagnoses, key=["MCI", "AD"].index)


def test_group_assignment_follows_lsor_proportions():
    for n in range(4, 12):
        assert set(synth.assign_groups(n)) == GROUPS
    counts = {g: synth.assign_groups(632).count(g) for g in GROUPS}
    assert all(abs(counts[g] - synth.LSOR_GROUP_COUNTS[g]) <= 1 for g in GROUPS), counts
    assert synth.assign_groups(20)[:7] == synth.assign_groups(7)


# ----------------------------------------------------------------------------- images

def test_images_are_int16_with_a_scale_slope_and_read_back(cohort, truth):
    root, _ = cohort
    for row in truth[:6]:
        img = nib.load(t1w_path(root, row["participant_id"], row["session_id"]))
        assert img.get_data_dtype() == np.int16
        assert img.dataobj.slope == pytest.approx(synth.SCALE_SLOPE) and img.dataobj.slope != 1
        raw = np.asarray(img.dataobj.get_unscaled())
        data = img.get_fdata(dtype=np.float32)
        assert data.ndim == 3 and np.all(np.isfinite(data))
        np.testing.assert_allclose(data, raw * np.float32(synth.SCALE_SLOPE), rtol=1e-6)
        assert 500 < np.percentile(data[data > 0], 90) < 1500   # WM-ish, in image units


def test_some_subjects_are_stored_in_other_orientations_with_correct_affines(cohort, truth):
    root, _ = cohort
    centres, codes = {}, {}
    for row in truth:
        if row["session_id"] != "ses-01":
            continue
        img = nib.load(t1w_path(root, row["participant_id"], row["session_id"]))
        codes[row["participant_id"]] = "".join(nib.aff2axcodes(img.affine))
        assert codes[row["participant_id"]] == row["orientation"]
        canonical = nib.as_closest_canonical(img)
        assert canonical.shape == (50, 59, 48)
        data = canonical.get_fdata(dtype=np.float32)
        centre_voxel = ndi.center_of_mass(data > 0.5 * np.percentile(data[data > 0], 90))
        centres[row["participant_id"]] = nib.affines.apply_affine(canonical.affine, centre_voxel)
    assert codes["sub-005"] == "LAS"
    assert sum(code != "RAS" for code in codes.values()) == 1
    # the brain sits at the same place in world space whatever the storage orientation
    median = np.median(np.array(list(centres.values())), axis=0)
    for participant, centre in centres.items():
        assert np.linalg.norm(centre - median) < 12.0, (participant, centre, median)


# ----------------------------------------------------------------------------- ground truth

def test_brain_age_rises_faster_in_pmci_and_ad_than_in_nc(truth):
    slopes: dict[str, list[float]] = {}
    for rows in by_subject(truth).values():
        age = np.array([float(r["age"]) for r in rows])
        brain_age = np.array([float(r["brain_age"]) for r in rows])
        assert np.all(np.diff(brain_age) > 0)
        slope = (brain_age[-1] - brain_age[0]) / (age[-1] - age[0])
        slopes.setdefault(rows[0]["group"], []).append(slope)
    nc = np.mean(slopes["NC"])
    assert np.mean(slopes["pMCI"]) > nc + 0.4 and np.mean(slopes["AD"]) > nc + 0.4, slopes


def test_adas_cog_rises_with_the_brain_age_gap(cohort, truth):
    root, _ = cohort
    adas, gap, group = [], [], []
    for participant, rows in by_subject(truth).items():
        _, sessions = read_tsv(root / participant / f"{participant}_sessions.tsv")
        adas += [float(s["adas_cog"]) for s in sessions]
        gap += [float(r["brain_age_gap"]) for r in rows]
        group += [rows[0]["group"]] * len(rows)
    adas, gap, group = np.array(adas), np.array(gap), np.array(group)
    assert np.corrcoef(adas, gap)[0, 1] > 0.5
    assert adas[group == "AD"].mean() > adas[group == "NC"].mean() + 5


def dark_volume(path: Path) -> int:
    """Voxels darker than half the WM level inside the (eroded) brain, central half of it."""
    data = nib.as_closest_canonical(nib.load(path)).get_fdata(dtype=np.float32)
    brain = ndi.binary_erosion(ndi.binary_fill_holes(data > 0), iterations=2)
    dark = brain & (data < 0.5 * np.percentile(data[brain], 90))
    box = tuple(slice(s.start + (s.stop - s.start) // 4, s.stop - (s.stop - s.start) // 4)
                for s in ndi.find_objects(brain.astype(np.int8))[0])
    return int(dark[box].sum())


def test_ventricles_measured_by_thresholding_grow_with_brain_age(cohort, truth):
    root, _ = cohort
    within_volume, within_age = [], []
    for rows in by_subject(truth).values():
        brain_age = np.array([float(r["brain_age"]) for r in rows])
        true_ml = np.array([float(r["ventricle_volume_ml"]) for r in rows])
        assert np.all(np.diff(true_ml) > 0)
        measured = np.array([dark_volume(t1w_path(root, r["participant_id"], r["session_id"]))
                             for r in rows])
        for i in range(len(rows)):
            for j in range(i + 1, len(rows)):
                if brain_age[j] - brain_age[i] >= 2.0:
                    assert measured[j] > measured[i], (rows[0]["participant_id"], measured)
        within_volume += list(measured - measured.mean())
        within_age += list(brain_age - brain_age.mean())
    assert np.corrcoef(within_volume, within_age)[0, 1] > 0.8


# ----------------------------------------------------------------------------- determinism

def test_same_seed_gives_identical_files_and_other_seed_differs(cohort, tmp_path):
    root, _ = cohort
    again = synthesize_cohort(tmp_path / "again", N_SUBJECTS, seed=0, voxel_size_mm=VOXEL_MM,
                              progress=False)
    assert files_of(again.out_dir) == files_of(root)
    other = synthesize_cohort(tmp_path / "other", 4, seed=1, voxel_size_mm=VOXEL_MM,
                              progress=False)
    assert (other.out_dir / "participants.tsv").read_bytes() != \
        (root / "participants.tsv").read_bytes() or \
        (other.out_dir / "sub-001/sub-001_sessions.tsv").read_bytes() != \
        (root / "sub-001/sub-001_sessions.tsv").read_bytes()
    first = "sub-001/ses-01/anat/sub-001_ses-01_T1w.nii.gz"
    assert not np.array_equal(nib.load(other.out_dir / first).get_fdata(),
                              nib.load(root / first).get_fdata())


def test_subject_k_does_not_depend_on_how_many_follow(cohort, tmp_path):
    root, _ = cohort
    fewer = synthesize_cohort(tmp_path / "fewer", 5, seed=0, voxel_size_mm=VOXEL_MM,
                              progress=False)
    mine, theirs = files_of(fewer.out_dir), files_of(root)
    for name, content in mine.items():
        if name.startswith("sub-"):
            assert theirs[name] == content, name
    assert (fewer.out_dir / "participants.tsv").read_text().splitlines() == \
        (root / "participants.tsv").read_text().splitlines()[:6]
    # nor the subject's tables on the voxel size
    coarse = synthesize_cohort(tmp_path / "coarse", 2, seed=0, voxel_size_mm=8.0, progress=False)
    for name in ("sub-001/sub-001_sessions.tsv", "sub-002/sub-002_sessions.tsv"):
        assert (coarse.out_dir / name).read_bytes() == (root / name).read_bytes()


# ----------------------------------------------------------------------------- out_dir safety

def test_refuses_a_non_empty_folder_that_is_not_a_synth_output(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("precious")
    with pytest.raises(ValueError, match="not empty.*not a previous"):
        synthesize_cohort(foreign, 4, voxel_size_mm=VOXEL_MM, progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["mine"]
    assert (foreign / "notes.txt").read_text() == "precious"


def test_replaces_a_previous_synth_output_and_fills_an_empty_folder(tmp_path):
    out = tmp_path / "cohort"
    out.mkdir()
    synthesize_cohort(out, 3, seed=2, voxel_size_mm=8.0, progress=False)
    summary = synthesize_cohort(out, 2, seed=2, voxel_size_mm=8.0, progress=False)
    assert summary.n_subjects == 2 and not (out / "sub-003").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["cohort"]


def test_a_failed_run_leaves_nothing_under_the_final_name(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("killed")

    monkeypatch.setattr(synth, "_write_tables", fail)
    with pytest.raises(RuntimeError, match="killed"):
        synthesize_cohort(tmp_path / "cohort", 2, voxel_size_mm=8.0, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="n_subjects"):
        synthesize_cohort(tmp_path / "a", 0)
    with pytest.raises(ValueError, match="seed"):
        synthesize_cohort(tmp_path / "a", 2, seed=-1)
    with pytest.raises(ValueError, match="voxel_size_mm"):
        synthesize_cohort(tmp_path / "a", 2, voxel_size_mm=0.5)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- presets

def _baseline_ages(model, n=4000):
    rng = np.random.default_rng(0)
    return np.array([synth_subjects._baseline_age(rng, model) for _ in range(n)])


def test_age_distributions_have_their_documented_shape():
    lo, hi = 60.0, 90.0
    third = (hi - lo) / 3
    shares = {}
    for kind in synth.AGE_DISTRIBUTIONS:
        ages = _baseline_ages(synth.aging_model(age_distribution=kind, age_range=(lo, hi)))
        assert ages.min() >= lo and ages.max() <= hi
        shares[kind] = np.mean((ages > lo + third) & (ages < hi - third))
    # normal: sd = range / 4.3 = 6.98, the middle third is ±5 years = ±0.72 sd: 52.6 %;
    # uniform: a third; bimodal: two modes 2.6 sd from the middle third, which holds the
    # uniform 10 %'s third and the modes' tails: ~3.4 %
    assert shares["normal"] == pytest.approx(0.526, abs=0.03)
    assert shares["uniform"] == pytest.approx(1 / 3, abs=0.04)
    assert shares["bimodal"] == pytest.approx(0.034, abs=0.012)
    narrow = _baseline_ages(synth.aging_model(age_distribution="uniform", age_range=(20, 30)))
    assert narrow.min() >= 20 and narrow.max() <= 30


def test_presets_and_their_errors():
    registered, raw = synth.aging_model("registered"), synth.aging_model("raw")
    assert raw == synth.AgingModel(preset="raw")          # raw keeps the unregistered look
    assert registered.head_scale_mean == {"M": 1.0, "F": 1.0}
    assert registered.head_scale_sd < raw.head_scale_sd
    assert registered.rotation_sd_deg < raw.rotation_sd_deg
    assert registered.translation_sd_mm < raw.translation_sd_mm
    assert registered.deformation_rms_mm < raw.deformation_rms_mm
    assert synth.aging_model(brain_age_gap_sd=1.0).baseline_gap_sd == 1.0
    with pytest.raises(ValueError, match="unknown preset 'mni'"):
        synth.aging_model("mni")
    with pytest.raises(ValueError, match="unknown age distribution 'flat'"):
        synth.aging_model(age_distribution="flat")
    with pytest.raises(ValueError, match="LO < HI"):
        synth.aging_model(age_range=(80, 60))
    with pytest.raises(ValueError, match="gap sd"):
        synth.aging_model(brain_age_gap_sd=-1)


def test_cli_synth_rejects_a_bad_option_with_a_clear_error(tmp_path, capsys):
    from hpcbrain.cli import main

    assert main(["synth", "--out", str(tmp_path / "c"), "--subjects", "2", "--age-range",
                 "90", "60", "--quiet"]) == 2
    assert "LO < HI" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_rescans_are_extra_runs_of_the_same_visit_and_conversion_uses_run_1(tmp_path):
    """--rescans K: run-1 is byte for byte the scan a cohort without rescans has, run-2 … are
    new images of the same anatomy; convert takes run-1 unless the filter picks another."""
    from hpcbrain.data.convert import convert_cohort
    from hpcbrain.data.store import CohortStore

    plain = synthesize_cohort(tmp_path / "plain", 2, seed=3, voxel_size_mm=8.0, progress=False,
                              learnability=False)
    rescanned = synthesize_cohort(tmp_path / "re", 2, seed=3, voxel_size_mm=8.0, progress=False,
                                  learnability=False, rescans=2)
    assert rescanned.n_scans == 3 * plain.n_scans
    runs = sorted(p.name for p in (tmp_path / "re" / "sub-001" / "ses-01" / "anat").iterdir())
    assert runs == [f"sub-001_ses-01_run-{k}_T1w.nii.gz" for k in (1, 2, 3)]
    anat = tmp_path / "re" / "sub-001" / "ses-01" / "anat"
    first = (anat / "sub-001_ses-01_run-1_T1w.nii.gz").read_bytes()
    assert first == (tmp_path / "plain" / "sub-001" / "ses-01" / "anat" /
                     "sub-001_ses-01_T1w.nii.gz").read_bytes()
    images = [nib.load(anat / name).get_fdata() for name in runs]
    assert not np.array_equal(images[0], images[1]) and not np.array_equal(images[1], images[2])
    # same anatomy: a rescan is far closer to its visit's scan than to another subject's
    other = nib.load(next((tmp_path / "re" / "sub-002" / "ses-01" / "anat").glob("*run-1*"))
                     ).get_fdata()
    assert np.abs(images[1] - images[0]).mean() < 0.75 * np.abs(other - images[0]).mean()
    for spec, run in ((None, "run-1"), ('{"t1w": {"run": 2}}', "run-2")):
        store = CohortStore(convert_cohort(tmp_path / "re", tmp_path / f"{run}.zarr", 8,
                                           bids_filter=spec, progress=False).out)
        assert len(store) == plain.n_scans
        assert all(f"_{run}_" in p for p in store.metadata["source_path"])
    with pytest.raises(ValueError, match="rescans must be a non-negative integer"):
        synthesize_cohort(tmp_path / "bad", 2, rescans=-1)
