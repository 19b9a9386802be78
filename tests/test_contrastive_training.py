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

    def record_encoder(self, encoder, example, extra_files=None):   # skip the slow logging
        logged.append(encoder(example).shape)
        assert not extra_files        # only LSOR ships files (its SOM) with its encoder
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
        "contrastive.ridge_seeds=2", "contrastive.ridge_cv=2",
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
