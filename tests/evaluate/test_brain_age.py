"""Brain age a lab can publish, end to end: a contrastive run registers its age model with a
calibration fitted on non-test subjects only, and `hpcbrain predict-age` writes intervals,
extrapolation flags and (with known ages) the raw and corrected gaps."""
from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest
from conftest import build_age_contrast_store, tiny_config

from hpcbrain.cli import main
from hpcbrain.data.store import CohortStore
from hpcbrain.evaluate.age_calibration import CALIBRATION_FILE, load_calibration, read_calibration
from hpcbrain.job import build_datasets, run_training

pytestmark = pytest.mark.slow

POISON = 1000.0     # added to the test fold's ages: any test scan in a calibration shows


def _config(store, tmp_path, name, *extra, tracking=False):
    overrides = {
        "data.store": store, "data.input_size": 16, "data.n_folds": 4, "data.val_fraction": 0.3,
        "data.num_workers": 0, "model.resnet_width": 2, "model.projection_dim": 8,
        "train.epochs": 1, "train.batch_size": 4, "train.max_steps_per_epoch": 2,
        "train.precision": "fp32", "train.num_threads": 1, "contrastive.nn_final": 2,
        "evaluate.ridge_seeds": 1, "evaluate.ridge_cv": 2, "evaluate.age_calibration_folds": 3,
        "run.root": tmp_path / "runs", "run.name": name,
        "tracking.enabled": str(tracking).lower(),
        "tracking.uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "tracking.registered_model": "t-encoder", "tracking.registered_age_model": "t-age"}
    overrides.update(dict(item.split("=", 1) for item in extra))
    return tiny_config("adapn.yaml", **overrides)


@pytest.fixture
def poisoned(tmp_path):
    """A 16-subject store whose test-fold scans (fold 0 of 4) are 1000 years older."""
    import zarr

    store = build_age_contrast_store(tmp_path / "store", subjects=16, visits=2)
    split, _, _ = build_datasets(_config(store, tmp_path, "x"), CohortStore(store), "scans")
    group = zarr.open_group(store, mode="r+")
    ages = group["age"][...]
    ages[split.test] += POISON
    group["age"][...] = ages
    return store, split


@pytest.mark.parametrize("source, method, part", [
    ("auto", "adapn", "val"), ("auto", "simclr", "train"), ("both", "adapn", "both")])
def test_no_test_subject_enters_the_age_calibration(poisoned, tmp_path, source, method, part):
    store, split = poisoned
    cfg = _config(store, tmp_path, f"{source}-{method}", f"method={method}",
                  f"evaluate.age_calibration_subjects={source}")
    result = run_training(cfg)
    calibration = read_calibration(result.run_dir / "registry" / "age_model" / CALIBRATION_FILE)
    expected = {"val": len(split.val), "train": len(split.train),
                "both": len(split.val) + len(split.train)}[part]
    assert calibration.calibration_scans == expected
    assert calibration.training_scans == len(split.train)
    assert calibration.training_age_max < POISON and max(calibration.residuals) < POISON / 2
    # AdapN trains on ages: auto calibrates on held-out subjects, SimCLR's on cross-fitting
    assert ("validation" in calibration.source) == (part in ("val", "both"))
    assert ("cross-fitted" in calibration.source) == (part in ("train", "both"))


def test_encoder_folds_calibrate_every_subject_with_a_model_that_never_saw_it(tmp_path):
    """evaluate.age_calibration_subjects=encoder-folds: K fold runs, each predicting exactly its
    test fold; the registered model trains on every subject and its calibration is the union of
    those held-out predictions; a rerun retrains nothing."""
    from hpcbrain.evaluate.encoder_folds import PREDICTIONS_FILE
    from hpcbrain.job import age_calibration_fold_configs

    store = build_age_contrast_store(tmp_path / "store", subjects=12, visits=2)
    cfg = _config(store, tmp_path, "folds", "data.n_folds=1", "data.val_fraction=0",
                  "evaluate.age_calibration_subjects=encoder-folds")
    result = run_training(cfg)
    cohort = CohortStore(store)
    ages = np.asarray(cohort.column("age"), np.float64)
    subjects = np.asarray(cohort.column("subject")).astype(str)
    predicted = np.full(len(cohort), np.nan)
    fold_cfgs = age_calibration_fold_configs(cfg)
    assert len(fold_cfgs) == 3
    for fold_cfg in fold_cfgs:
        split, _, _ = build_datasets(fold_cfg, cohort, "scans")
        assert not set(subjects[split.test]) & set(subjects[split.train])
        folder = tmp_path / "runs" / "folds" / "age-calibration" / fold_cfg.run.name
        with open(folder / PREDICTIONS_FILE, newline="") as handle:
            rows = list(csv.DictReader(handle, delimiter="\t"))
        # the fold run predicted its own test fold, and nothing else
        assert sorted(int(r["store_row"]) for r in rows) == sorted(split.test.tolist())
        for row in rows:
            assert np.isnan(predicted[int(row["store_row"])])
            predicted[int(row["store_row"])] = float(row["predicted_age"])
    assert np.isfinite(predicted).all()              # every scan predicted exactly once
    calibration = read_calibration(result.run_dir / "registry" / "age_model" / CALIBRATION_FILE)
    assert calibration.calibration_scans == calibration.training_scans == len(cohort)
    assert calibration.residuals == pytest.approx(np.sort(np.abs(predicted - ages)).tolist())
    alpha, beta = np.polyfit(ages, predicted - ages, 1)
    assert (calibration.bias_alpha, calibration.bias_beta) == pytest.approx((alpha, beta))
    assert "encoder-and-ridge fold runs" in calibration.source

    stamps = {c.run.name: (tmp_path / "runs" / "folds" / "age-calibration" / c.run.name
                           / "result.json").stat().st_mtime_ns for c in fold_cfgs}
    run_training(_config(store, tmp_path, "folds", "data.n_folds=1", "data.val_fraction=0",
                         "evaluate.age_calibration_subjects=encoder-folds"))
    assert stamps == {c.run.name: (tmp_path / "runs" / "folds" / "age-calibration" / c.run.name
                                   / "result.json").stat().st_mtime_ns for c in fold_cfgs}


def test_encoder_folds_refuse_a_config_with_its_own_test_fold(tmp_path):
    from hpcbrain.config_checks import ConfigError

    with pytest.raises(ConfigError, match="data.n_folds=1"):
        _config(tmp_path / "store", tmp_path, "x", "data.n_folds=4",
                "evaluate.age_calibration_subjects=encoder-folds")


def _bids(root, ages):
    """A BIDS dataset of sub-01 (ses-01, ses-02) and a session-less sub-02, with `ages`
    {(subject, session): text} in the sessions.tsv / participants.tsv."""
    rng = np.random.default_rng(3)
    scans = []
    for sub, ses in (("sub-01", "ses-01"), ("sub-01", "ses-02"), ("sub-02", None)):
        anat = root / sub / (ses or "") / "anat"
        anat.mkdir(parents=True, exist_ok=True)
        path = anat / f"{sub}{'_' + ses if ses else ''}_T1w.nii.gz"
        nib.save(nib.Nifti1Image(rng.random((18, 20, 17)).astype(np.float32),
                                 np.diag([2.0, 2.0, 2.0, 1.0])), path)
        scans.append(path)
    (root / "dataset_description.json").write_text('{"Name": "t", "BIDSVersion": "1.9.0"}')
    (root / "sub-01" / "sub-01_sessions.tsv").write_text(
        "session_id\tage\n" + "".join(f"{s}\t{ages[('sub-01', s)]}\n" for s in ("ses-01",
                                                                                 "ses-02")))
    (root / "participants.tsv").write_text(
        f"participant_id\tage\nsub-01\t70\nsub-02\t{ages[('sub-02', None)]}\n")
    return scans


def test_predict_age_writes_intervals_flags_and_gaps(age_contrast_store, tmp_path,
                                                     monkeypatch, capsys):
    cfg = _config(age_contrast_store, tmp_path, "registered", "data.n_folds=1",
                  "data.val_fraction=0.5", tracking=True)     # 12 calibration scans: ≥ 9
    result = run_training(cfg)
    assert result.age_model_uri == "models:/t-age@current"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")

    import mlflow.artifacts
    from mlflow.models import Model

    model_dir = mlflow.artifacts.download_artifacts(artifact_uri=result.age_model_uri)
    card = Model.load(f"{model_dir}/MLmodel").metadata["hpcbrain"]["age_model"]
    calibration = load_calibration(model_dir)
    assert card["training_scans"] == calibration.training_scans
    assert card["correction"] == "beheshti" and card["level"] == 0.9
    assert "(1 + bias_alpha)" not in card["correction_formula"]
    assert "Training cohort" in open(f"{model_dir}/extra_files/model_card.md").read()

    scans = _bids(tmp_path / "bids", {("sub-01", "ses-01"): "71.5", ("sub-01", "ses-02"): "73",
                                      ("sub-02", None): "64"})
    out = tmp_path / "ages.csv"
    assert main(["predict-age", result.age_model_uri, *map(str, scans), "--out", str(out)]) == 0
    with open(out, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["path", "predicted_age", "interval_low", "interval_high",
                             "extrapolated", "age", "brain_age_gap", "brain_age_gap_corrected"]
    assert [float(r["age"]) for r in rows] == [71.5, 73.0, 64.0]
    radius = calibration.radius()
    for row in rows:
        predicted = float(row["predicted_age"])
        assert float(row["interval_low"]) == pytest.approx(predicted - radius, abs=2e-4)
        assert float(row["interval_high"]) == pytest.approx(predicted + radius, abs=2e-4)
        gap = predicted - float(row["age"])
        assert float(row["brain_age_gap"]) == pytest.approx(gap, abs=2e-4)
        expected = gap - (calibration.bias_alpha * float(row["age"]) + calibration.bias_beta)
        assert float(row["brain_age_gap_corrected"]) == pytest.approx(expected, abs=2e-4)
        outside = not (calibration.training_age_min <= predicted
                       <= calibration.training_age_max)
        assert row["extrapolated"] == ("true" if outside else "false")

    # another level and the other correction; an ages table by participant/session wins
    table = tmp_path / "ages.tsv"
    table.write_text("participant_id\tsession_id\tage\n01\t01\t60\nsub-01\tses-02\t61\n"
                     "sub-02\tses-01\t62\n")
    out2 = tmp_path / "ages2.csv"
    assert main(["predict-age", result.age_model_uri, *map(str, scans), "--out", str(out2),
                 "--ages", str(table), "--level", "0.5", "--correction", "delange"]) == 0
    with open(out2, newline="") as handle:
        rows2 = list(csv.DictReader(handle))
    assert [float(r["age"]) for r in rows2] == [60.0, 61.0, 62.0]
    half = calibration.radius(0.5)
    assert float(rows2[0]["interval_high"]) - float(rows2[0]["predicted_age"]) == \
        pytest.approx(half, abs=2e-4)
    predicted, age = float(rows2[0]["predicted_age"]), 60.0
    assert float(rows2[0]["brain_age_gap_corrected"]) == pytest.approx(
        (predicted - calibration.bias_beta) / (1 + calibration.bias_alpha) - age, abs=1e-3)

    # scans outside BIDS without --ages: predictions and intervals only
    loose = tmp_path / "loose.nii.gz"
    loose.write_bytes(scans[0].read_bytes())
    out3 = tmp_path / "ages3.csv"
    assert main(["predict-age", result.age_model_uri, str(loose), "--out", str(out3)]) == 0
    assert out3.read_text().splitlines()[0] == \
        "path,predicted_age,interval_low,interval_high,extrapolated"


@pytest.mark.parametrize("table, message", [
    ("participant_id\tsession_id\tage\nsub-01\tses-01\t70\n",
     r"sub-01_ses-02_T1w.nii.gz: no row for sub-01 ses-02 in .*ages.tsv"),
    ("participant_id\tsession_id\tage\nsub-01\tses-01\t70\nsub-01\tses-02\tabc\n"
     "sub-02\tses-01\t60\n", r"sub-01_ses-02_T1w.nii.gz: age 'abc' in .*ages.tsv line 3 is not "
                             r"a number"),
    ("subject\tage\nsub-01\t70\n", r"needs a column 'age' and either 'path' or"),
])
def test_ages_table_errors_name_the_scan_and_the_file(tmp_path, table, message):
    from hpcbrain.evaluate.scan_ages import AgeLookupError, chronological_ages

    scans = _bids(tmp_path / "bids", {("sub-01", "ses-01"): "70", ("sub-01", "ses-02"): "71",
                                      ("sub-02", None): "60"})
    path = tmp_path / "ages.tsv"
    path.write_text(table)
    with pytest.raises(AgeLookupError, match=message):
        chronological_ages(scans, path)


def test_bids_ages_and_their_errors(tmp_path):
    from hpcbrain.evaluate.scan_ages import AgeLookupError, chronological_ages

    scans = _bids(tmp_path / "a", {("sub-01", "ses-01"): "70", ("sub-01", "ses-02"): "71.25",
                                   ("sub-02", None): "60"})
    assert chronological_ages(scans).tolist() == [70.0, 71.25, 60.0]
    by_path = tmp_path / "paths.csv"
    by_path.write_text("path,age\n" + "".join(f"{s},{50 + k}\n" for k, s in enumerate(scans)))
    assert chronological_ages(scans, by_path).tolist() == [50.0, 51.0, 52.0]
    bad = _bids(tmp_path / "b", {("sub-01", "ses-01"): "70", ("sub-01", "ses-02"): "n/a",
                                 ("sub-02", None): "60"})
    with pytest.raises(AgeLookupError, match=r"sub-01_ses-02_T1w.nii.gz: age is missing .* in "
                                             r".*sub-01_sessions.tsv line 3"):
        chronological_ages(bad)
    assert chronological_ages([tmp_path / "elsewhere.nii.gz"]) is None


def test_bids_app_writes_the_brain_age_columns_and_group_figures(age_contrast_store, tmp_path):
    cfg = _config(age_contrast_store, tmp_path, "app", "data.n_folds=1",
                  "data.val_fraction=0.5", tracking=True)
    result = run_training(cfg)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    bids = tmp_path / "bids"
    _bids(bids, {("sub-01", "ses-01"): "71.5", ("sub-01", "ses-02"): "73",
                 ("sub-02", None): "64"})
    out = tmp_path / "derivatives"
    assert main(["bids-app", str(bids), str(out), "participant", "--model",
                 result.age_model_uri, "--tracking-uri", uri]) == 0
    stem = out / "sub-01" / "ses-02" / "anat" / "sub-01_ses-02_desc-hpcbrain_brainage"
    header, row = (line.split("\t") for line in stem.with_suffix(".tsv").read_text()
                   .splitlines())
    assert header == ["predicted_age", "interval_low", "interval_high", "extrapolated", "age",
                      "brain_age_gap", "brain_age_gap_corrected"]
    values = dict(zip(header, row))
    assert float(values["age"]) == 73.0
    assert float(values["brain_age_gap"]) == pytest.approx(float(values["predicted_age"]) - 73,
                                                           abs=1e-3)
    sidecar = json.loads(stem.with_suffix(".json").read_text())
    assert set(header) <= set(sidecar) and sidecar["IntervalLevel"] == 0.9
    assert sidecar["ModelCard"]["correction"] == "beheshti"
    assert main(["bids-app", str(bids), str(out), "group"]) == 0
    table = (out / "group" / "brainage.tsv").read_text().splitlines()
    assert table[0].split("\t")[:4] == ["participant_id", "session_id", "source",
                                        "predicted_age"] and len(table) == 4
    for figure in ("brainage.png", "brainage_gap.png"):
        assert (out / "group" / figure).stat().st_size > 5000
