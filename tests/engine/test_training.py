"""The single-process trainer end to end on a tiny real store with the real LSOR method:
resume after a kill equals an uninterrupted run, a NaN stops cleanly, the registry round trip."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import lsor_run_config

from hpcbrain.engine import checkpoint
from hpcbrain.engine.backends import NonFiniteLossError
from hpcbrain.job import run_training

pytestmark = pytest.mark.slow


@pytest.fixture()
def store(age_contrast_store):
    return age_contrast_store

def final_state(run_dir):
    state = checkpoint.load(checkpoint.latest_checkpoint(run_dir))
    return state["engine"]["method"], state


class Killed(BaseException):
    """Stands in for SIGKILL: escapes every `except Exception`."""


@pytest.mark.parametrize("kill_at", [(2, 0), (2, 2)], ids=["epoch-end", "mid-epoch"])
def test_resume_after_kill_gives_the_parameters_of_an_uninterrupted_run(store, tmp_path,
                                                                        monkeypatch, kill_at):
    every = "train.checkpoint_every_steps=2"
    uninterrupted = run_training(lsor_run_config(store, tmp_path / "runs", "straight", every))
    assert uninterrupted.epochs == 4

    real_save = checkpoint.save_atomic

    def save_then_die(payload, path, keep_last=2):
        real_save(payload, path, keep_last)
        progress = payload["progress"]
        if (progress["epoch"], progress["step_in_epoch"]) == kill_at:
            raise Killed()

    monkeypatch.setattr(checkpoint, "save_atomic", save_then_die)
    with pytest.raises(Killed):
        run_training(lsor_run_config(store, tmp_path / "runs", "killed", every))
    monkeypatch.setattr(checkpoint, "save_atomic", real_save)
    killed_dir = tmp_path / "runs" / "killed"
    saved = final_state(killed_dir)[1]["progress"]
    assert (saved["epoch"], saved["step_in_epoch"]) == kill_at

    resumed = run_training(lsor_run_config(store, tmp_path / "runs", "killed", every))
    assert resumed.global_step == uninterrupted.global_step

    expected, _ = final_state(uninterrupted.run_dir)
    got, _ = final_state(killed_dir)
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-6, msg=key)
    # The SOM phase really ran: the grid was initialised and the EMA moved.
    assert bool(got["initialised"])
    assert got["dG"].abs().sum() > 0


def test_augmenting_on_the_device_trains_the_model_the_workers_train(store, tmp_path):
    """data.augment_on=device (the default) against =workers, flips and rotations at p 1 on a
    real LSOR run: the same draws reach the same scans, so the final parameters agree."""
    augment = ["data.augment.flip=true", "data.augment.rotation_deg=6",
               "data.augment.translation_vox=1", "data.augment.p=1.0"]
    states = {}
    for where in ("device", "workers"):
        result = run_training(lsor_run_config(store, tmp_path / "runs", where, *augment,
                                              f"data.augment_on={where}"))
        states[where] = final_state(result.run_dir)[0]
    plain = run_training(lsor_run_config(store, tmp_path / "runs", "plain"))
    for key, value in states["workers"].items():
        torch.testing.assert_close(states["device"][key], value, rtol=1e-4, atol=1e-5, msg=key)
    # and the augmentation did something: without it the encoder ends elsewhere
    weights = [k for k in value_keys(states["workers"]) if "encoder" in k]
    assert any(not torch.allclose(states["workers"][k], final_state(plain.run_dir)[0][k],
                                  atol=1e-4) for k in weights)


def value_keys(state):
    return [k for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point()]


def test_nan_loss_stops_with_clear_error_and_keeps_last_good_checkpoint(store, tmp_path,
                                                                       monkeypatch):
    from hpcbrain.methods.lsor import LSOR

    real_forward = LSOR.forward

    def nan_in_second_epoch(self, batch):
        losses = real_forward(self, batch)
        if self.epoch == 1:
            losses["loss"] = losses["loss"] * float("nan")
        return losses

    monkeypatch.setattr(LSOR, "forward", nan_in_second_epoch)
    cfg = lsor_run_config(store, tmp_path / "runs", "nan")
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at epoch 1, step 0.*"
                                                 r"last good checkpoint is .*step-0+\d+\.pt"):
        run_training(cfg)
    run_dir = tmp_path / "runs" / "nan"
    saved = checkpoint.list_checkpoints(run_dir)
    assert len(saved) == 1
    state = checkpoint.load(saved[0])
    assert state["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["engine"]["method"].values()
               if v.is_floating_point())
    assert not list((run_dir / checkpoint.CHECKPOINT_DIR).glob(".*tmp*"))


def test_registry_round_trip_and_tracked_metrics(store, tmp_path):
    import mlflow
    import mlflow.artifacts
    import mlflow.pytorch

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = lsor_run_config(store, tmp_path / "runs", "tracked", "tracking.enabled=true",
                      f"tracking.uri={uri}", "tracking.registered_model=test-encoder",
                      "tracking.alias=champion", "train.epochs=3")
    result = run_training(cfg)
    assert result.model_uri == "models:/test-encoder@champion"

    mlflow.set_tracking_uri(uri)
    encoder = mlflow.pytorch.load_model(result.model_uri)
    method_state, _ = final_state(result.run_dir)
    from hpcbrain.methods.lsor import LSOR

    reference = LSOR.from_config(cfg)
    reference.load_state_dict(method_state)
    reference.eval()
    for batch_size in (2, 3, 5):
        volumes = torch.randn(batch_size, 1, 16, 16, 16)
        latents = encoder(volumes)
        assert latents.shape == (batch_size, reference.latent_dim)
        torch.testing.assert_close(latents, reference.encoder()(volumes), rtol=1e-4, atol=1e-4)

    run = mlflow.get_run(result.run_id)
    assert run.data.params["train.epochs"] == "3"
    for name in ("train/loss", "train/recon", "train/som", "train/dir", "schedule/tau",
                 "schedule/lr", "throughput/samples_per_s", "epoch/val_loss",
                 "som/dcor_age", "som/dcor_adas_cog", "som/dcor_pmci_ad_percent",
                 "som/dcor_age_p", "som/occupied_nodes",
                 # SOM health, per epoch
                 "som/quantisation_error", "som/topographic_error", "som/latent_drift",
                 "som/node_movement", "som/latent_spread",
                 # counted FLOPs against this CPU's measured peak
                 "throughput/tflops", "throughput/mfu"):
        assert name in run.data.metrics, name
    assert run.data.metrics["throughput/tflops"] > 0 and run.data.metrics["throughput/mfu"] > 0
    # health is logged at every epoch end (latent drift from the second epoch on)
    history = mlflow.MlflowClient().get_metric_history(result.run_id, "som/latent_drift")
    assert len(history) == 2
    p_values = [run.data.metrics[k] for k in run.data.metrics if k.startswith("som/dcor_")
                and k.endswith("_p")]
    assert p_values and all(1 / 1001 <= p <= 1 for p in p_values)
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(result.run_id)}
    assert "config.yaml" in artifacts and "figures" in artifacts
    logged = {a.path for a in mlflow.MlflowClient().list_artifacts(result.run_id, "figures")}
    for figure in ("fig2_som_heatmaps.png", "fig2d_node_images.png",
                   "fig3_similarity_by_age_and_group.png", "fig4_latent_pca.png"):
        assert (result.run_dir / "figures" / figure).stat().st_size > 1000
        assert f"figures/{figure}" in logged
    # the registered model carries its SOM grid
    from hpcbrain.methods.lsor import SOM_FILE

    model_dir = Path(mlflow.artifacts.download_artifacts(artifact_uri=result.model_uri))
    with np.load(model_dir / "extra_files" / SOM_FILE) as som:
        np.testing.assert_array_equal(som["nodes"], reference.G.detach().numpy())
        assert tuple(som["grid"]) == (2, 2)
    # ... and how its inputs were made: the store's preparation, read back as what to do
    from mlflow.models import Model

    from hpcbrain.data.store import CohortStore
    from hpcbrain.evaluate.model_inputs import required_preparation

    inputs = Model.load(str(model_dir / "MLmodel")).metadata["hpcbrain"]["inputs"]
    trained_on = CohortStore(store)
    assert inputs["shape"] == list(trained_on.shape) and inputs["orientation"] == "RAS+"
    assert inputs["preprocessing"] == trained_on.info["preprocessing"]
    preparation = required_preparation(model_dir, 16)
    assert (preparation.grid.shape, preparation.grid.fixed, preparation.register) == \
        ((16, 16, 16), False, False)

    # Rerunning a finished run (the demo twice, a requeue after the end) registers nothing new.
    again = run_training(cfg)
    assert again.model_uri == result.model_uri and again.global_step == result.global_step
    versions = mlflow.MlflowClient().search_model_versions("name='test-encoder'")
    assert len(versions) == 1


def test_embed_command_preprocesses_new_scans_like_the_converter(store, tmp_path, monkeypatch):
    import nibabel as nib

    from hpcbrain.cli import main
    from hpcbrain.data.preprocess import load_scan

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = lsor_run_config(store, tmp_path / "runs", "embed", "tracking.enabled=true",
                      f"tracking.uri={uri}", "tracking.registered_model=embed-encoder",
                      "train.epochs=2")
    result = run_training(cfg)
    rng = np.random.default_rng(1)
    scans = []
    for k in range(3):   # new scans, in another size and orientation than the store's
        path = tmp_path / f"new{k}.nii.gz"
        nib.save(nib.Nifti1Image(rng.random((20, 18, 22)).astype(np.float32),
                                 np.diag([-2.0, 2.0, 2.0, 1.0])), path)
        scans.append(path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    out = tmp_path / "latents.csv"
    assert main(["embed", result.model_uri, *map(str, scans), "--out", str(out),
                 "--batch-size", "2", "--similarity"]) == 0
    with open(out, newline="") as handle:
        reader = csv.DictReader(handle)
        header, rows = reader.fieldnames, list(reader)
    latent_columns = [c for c in header if c.startswith("z")]
    rho_columns = [f"rho_{r}_{c}" for r in range(2) for c in range(2)]
    assert header == ["path", *latent_columns, "som_row", "som_col", "som_rows", "som_cols",
                      *rho_columns]
    assert {(r["som_rows"], r["som_cols"]) for r in rows} == {("2", "2")}   # the model's grid
    assert len(rows) == 3 and [r["path"] for r in rows] == list(map(str, scans))

    from hpcbrain.methods.lsor import LSOR

    method = LSOR.from_config(cfg)
    method.load_state_dict(final_state(result.run_dir)[0])
    method.eval()
    volumes = torch.from_numpy(np.stack([load_scan(s, 16)[0] for s in scans]))[:, None]
    expected = method.encoder()(volumes).detach()
    got = torch.tensor([[float(r[c]) for c in latent_columns] for r in rows])
    np.testing.assert_allclose(got[2].numpy(), expected[2].numpy(), rtol=1e-4, atol=1e-4)
    # the best-matching node and the similarity grid of the registered model's own SOM
    bmu = method.bmu(expected)
    assert [int(r["som_row"]) * 2 + int(r["som_col"]) for r in rows] == bmu.tolist()
    rho = np.array([[float(r[c]) for c in rho_columns] for r in rows])
    np.testing.assert_allclose(rho, method.similarity(expected).numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(rho.sum(axis=1), 1.0, atol=1e-4)

    plain = tmp_path / "plain.csv"
    assert main(["embed", result.model_uri, str(scans[0]), "--out", str(plain)]) == 0
    assert plain.read_text().splitlines()[0].endswith("som_row,som_col,som_rows,som_cols")

    bad = tmp_path / "bad.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4, 3), np.float32), np.eye(4)), bad)
    assert main(["embed", result.model_uri, str(bad), "--out", str(tmp_path / "x.npy")]) == 2
