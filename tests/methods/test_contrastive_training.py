"""AdapN end to end: `run_training` on a tiny store with MLflow tracking to a tmp sqlite — the
NN_nb and lr schedules are logged, the ridge age MAE and the comparison table land in MLflow."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from hpcbrain.config import load_config
from hpcbrain.job import run_training

pytestmark = pytest.mark.slow


@pytest.fixture()
def store(age_contrast_store):
    return age_contrast_store

def test_adapn_run_training_with_tracking(store, tmp_path, monkeypatch):
    import mlflow

    from hpcbrain.tracking import MlflowTracker

    logged = []

    def record_encoder(self, encoder, example, extra_files=None, metadata=None):
        logged.append(encoder(example).shape)            # (skips the slow logging)
        assert not extra_files        # only LSOR ships files (its SOM) with its encoder
        assert metadata["hpcbrain"]["inputs"]["shape"] == [16, 16, 16]   # how inputs are made
        return None

    monkeypatch.setattr(MlflowTracker, "log_encoder", record_encoder)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config(["adapn.yaml"], [
        f"data.store={store}", "data.input_size=16", "data.n_folds=4", "data.val_fraction=0.2",
        "data.num_workers=0", "model.resnet_width=2", "model.projection_dim=16",
        "train.epochs=3", "train.batch_size=4", "train.max_steps_per_epoch=2",
        "train.log_every_steps=1", "train.precision=fp32", "train.num_threads=1",
        "train.lr_step_every_epochs=1", "train.lr_gamma=0.5",
        "contrastive.nn_final=2", "contrastive.augment.cutout_size=4",
        "evaluate.ridge_seeds=2", "evaluate.ridge_cv=2",
        f"run.root={tmp_path / 'runs'}", "run.name=adapn-tiny",
        "tracking.enabled=true", f"tracking.uri={uri}", "tracking.experiment=adapn-test"])
    result = run_training(cfg)
    assert result.epochs == 3 and result.global_step == 6
    assert logged == [torch.Size([2, 16])]          # features after the projection
    assert np.isfinite(result.metrics["ridge/test_mae_mean"])

    client = mlflow.MlflowClient(uri)
    run = client.get_run(result.run_id)
    assert run.data.params["method"] == "adapn"
    for name in ("train/loss", "epoch/val_loss", "ridge/test_mae_mean", "ridge/test_mae_std",
                 "ridge/test_mae_seed1", "ridge/alpha_seed0"):
        assert name in run.data.metrics, name
    # NN_nb: batch 4 → 3 (int(4 − 1)) → 2 over the three epochs; lr 1e-4 halved every epoch
    nn = [m.value for m in sorted(client.get_metric_history(result.run_id, "schedule/nn_nb"),
                                  key=lambda m: m.step)]
    lr = [m.value for m in sorted(client.get_metric_history(result.run_id, "schedule/lr"),
                                  key=lambda m: m.step)]
    assert nn == [4, 4, 3, 3, 2, 2]
    assert lr == pytest.approx([1e-4, 1e-4, 5e-5, 5e-5, 2.5e-5, 2.5e-5])
    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"ridge_comparison.md", "ridge_comparison.csv", "ridge.json"} <= artifacts
    table = (result.run_dir / "ridge_comparison.md").read_text()
    assert "| adapn-tiny | adapn | resnet18 |" in table


def test_registered_age_predictor_round_trip(store, tmp_path, monkeypatch):
    """The run registers encoder + ridge as one model; `hpcbrain predict-age` on NIfTI files
    gives what the ridge, refitted here on the run's training split, predicts from the
    encoder's features of the same scans."""
    import csv

    import nibabel as nib

    from hpcbrain.cli import main
    from hpcbrain.data.preprocess import load_scan
    from hpcbrain.data.store import CohortStore
    from hpcbrain.engine import checkpoint
    from hpcbrain.evaluate.ridge import extract_features, fit_ridge
    from hpcbrain.job import build_datasets
    from hpcbrain.methods import build_method

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config(["adapn.yaml"], [
        f"data.store={store}", "data.input_size=16", "data.n_folds=1", "data.val_fraction=0.25",
        "data.num_workers=0", "model.resnet_width=2", "model.projection_dim=8",
        "train.epochs=2", "train.batch_size=4", "train.max_steps_per_epoch=2",
        "train.precision=fp32", "train.num_threads=1", "contrastive.nn_final=2",
        "evaluate.ridge_seeds=1", "evaluate.ridge_cv=2",
        f"run.root={tmp_path / 'runs'}", "run.name=age", f"tracking.uri={uri}",
        "tracking.registered_model=t-encoder", "tracking.registered_age_model=t-age"])
    result = run_training(cfg)
    assert result.age_model_uri == "models:/t-age@current"

    rng = np.random.default_rng(3)
    scans = []
    for k in range(3):   # new files, another grid than the store's
        path = tmp_path / f"scan{k}.nii.gz"
        nib.save(nib.Nifti1Image(rng.random((18, 20, 17)).astype(np.float32),
                                 np.diag([2.0, 2.0, 2.0, 1.0])), path)
        scans.append(path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    out = tmp_path / "ages.csv"
    assert main(["predict-age", result.age_model_uri, *map(str, scans), "--out", str(out)]) == 0
    with open(out, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["path"] for r in rows] == list(map(str, scans))
    got = np.array([float(r["predicted_age"]) for r in rows])

    method = build_method(cfg)
    state = checkpoint.load(checkpoint.latest_checkpoint(result.run_dir))
    method.load_state_dict(state["engine"]["method"])
    method.eval()
    cohort = CohortStore(store)
    split, _, _ = build_datasets(cfg, cohort, "scans")
    train_x = extract_features(method.encoder(), cohort, split.train, torch.device("cpu"))
    ages = np.asarray(cohort.column("age"), dtype=np.float64)
    subjects = np.asarray(cohort.column("subject")).astype(str)
    ridge = fit_ridge(train_x, ages[split.train], groups=subjects[split.train], seed=0,
                      alphas=list(cfg.evaluate.ridge_alphas), cv=2)
    volumes = torch.from_numpy(np.stack([load_scan(s, 16)[0] for s in scans]))[:, None]
    with torch.no_grad():
        expected = ridge.predict(method.encoder()(volumes).double().numpy())
    assert not method.backbone.training        # extract_features left the eval mode alone
    np.testing.assert_allclose(got, expected, atol=2e-3)

    # the encoder is no age model: a clear error instead of a CSV of feature vectors
    assert main(["predict-age", result.model_uri, str(scans[0]), "--out",
                 str(tmp_path / "bad.csv")]) == 2
    assert not (tmp_path / "bad.csv").exists()


def test_age_predictor_equals_the_fitted_ridge():
    from hpcbrain.evaluate.age_predictor import AgePredictor
    from hpcbrain.evaluate.ridge import fit_ridge

    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 5)) * [1, 10, 0.1, 3, 1] + [0, 5, -2, 0, 1]
    y = x @ [1.0, 0.2, -3.0, 0.5, 0.0] + 70 + rng.normal(size=40)
    groups = np.repeat(np.arange(10), 4)
    ridge = fit_ridge(x, y, groups=groups, cv=3)
    predictor = AgePredictor.from_ridge(torch.nn.Identity(), ridge)
    got = predictor(torch.from_numpy(x).float()).numpy()
    np.testing.assert_allclose(got, ridge.predict(x), rtol=1e-5, atol=1e-3)
    plain = fit_ridge(x, y, groups=groups, cv=3, standardize=False)
    np.testing.assert_allclose(AgePredictor.from_ridge(torch.nn.Identity(), plain)(
        torch.from_numpy(x).float()).numpy(), plain.predict(x), rtol=1e-5, atol=1e-3)
