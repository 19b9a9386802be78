"""LSOR's baselines (ae, vae, lssl, lne): formulas on hand-worked cases, and each method trained
end to end with its config, registering an encoder that `hpcbrain embed` uses."""
from __future__ import annotations

import csv
import math

import pytest
import torch
from conftest import tiny_config

from hpcbrain.methods import build_method
from hpcbrain.methods.longitudinal import direction_loss, lne_neighbourhood_trajectories

TINY = {"data.input_size": 16, "model.widths": "[4,8]"}


def test_direction_loss_is_one_minus_cosine():
    dz = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0], [1.0, 1.0]])
    tau = torch.tensor([2.0, 0.0])
    expected = [0.0, 1.0, 2.0, 1 - 1 / math.sqrt(2)]
    torch.testing.assert_close(direction_loss(dz, tau), torch.tensor(expected), atol=1e-6, rtol=0)


def test_lne_trajectory_is_the_gaussian_mean_of_the_nearest_other_pairs():
    """4 pairs on a line, z_u = 0, 1, 3, 10; 2 neighbours, σ² = 2. Anchor 0's nearest others are
    1 (d² 1) and 2 (d² 9): weights e^−0.5, e^−4.5; anchor 3's are 2 (d² 49) and 1 (d² 81)."""
    z_u = torch.tensor([[0.0], [1.0], [3.0], [10.0]])
    dz = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [5.0, 5.0]])
    dh = lne_neighbourhood_trajectories(z_u, dz, torch.tensor([0, 3]), neighbours=2, sigma2=2.0)
    a, b = math.exp(-0.5), math.exp(-4.5)
    c, d = math.exp(-24.5), math.exp(-40.5)
    expected = torch.tensor([[(a * 0 + b * 1) / (a + b), (a * 1 + b * 1) / (a + b)],
                             [(c * 1 + d * 0) / (c + d), (c * 1 + d * 1) / (c + d)]])
    torch.testing.assert_close(dh, expected, rtol=1e-5, atol=1e-7)


def make_batch(b=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"x_u": torch.randn(b, 1, 16, 16, 16, generator=g),
            "x_v": torch.randn(b, 1, 16, 16, 16, generator=g),
            "dt": 0.5 + torch.rand(b, generator=g)}


def test_ae_loss_is_the_recon_of_both_scans():
    torch.manual_seed(0)
    method = build_method(tiny_config("ae.yaml", **TINY)).eval()
    batch = make_batch()
    losses = method(batch)
    with torch.no_grad():
        z_u, z_v = method.net.encode(batch["x_u"]), method.net.encode(batch["x_v"])
        recon = 0.5 * (((method.net.decode(z_u) - batch["x_u"]) ** 2).mean()
                       + ((method.net.decode(z_v) - batch["x_v"]) ** 2).mean())
    torch.testing.assert_close(losses["recon"], recon, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses["loss"], recon, rtol=1e-5, atol=1e-6)


def test_vae_kl_at_unit_variance_is_half_the_mean_squared_mean():
    """The log-variance head starts at zero (σ = 1): KL per dimension = ½ μ²."""
    torch.manual_seed(0)
    method = build_method(tiny_config("vae.yaml", **TINY, **{"baselines.vae_beta": 0.25})).eval()
    batch = make_batch()
    losses = method(batch)
    with torch.no_grad():
        mu = method.net.encode(torch.cat([batch["x_u"], batch["x_v"]]))
    torch.testing.assert_close(losses["kl"], 0.5 * (mu ** 2).mean(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(losses["loss"], losses["recon"] + 0.25 * losses["kl"])
    method.train()                       # training samples z: the recon differs from μ's
    assert not torch.allclose(method(batch)["recon"], losses["recon"])


def test_lssl_direction_is_weight_plus_bias_and_the_loss_uses_it():
    torch.manual_seed(0)
    method = build_method(tiny_config("lssl.yaml", **TINY)).eval()
    assert method.lambda_dir == 0.5                     # lssl.yaml: the official setting
    batch = make_batch()
    losses = method(batch)
    with torch.no_grad():
        z_u, z_v = method.net.encode(batch["x_u"]), method.net.encode(batch["x_v"])
        tau = method.direction.weight[:, 0] + method.direction.bias
        expected = direction_loss((z_v - z_u) / batch["dt"][:, None], tau).mean()
    torch.testing.assert_close(losses["dir"], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses["loss"], losses["recon"] + 0.5 * expected, rtol=1e-5,
                               atol=1e-6)


def test_lne_loss_on_one_process_uses_the_whole_batch():
    torch.manual_seed(0)
    method = build_method(tiny_config("lne.yaml", **TINY, **{"baselines.lne_neighbours": 2,
                                                            "baselines.lne_sigma2": 50.0})).eval()
    batch = make_batch(b=6)
    losses = method(batch)
    with torch.no_grad():
        z_u, z_v = method.net.encode(batch["x_u"]), method.net.encode(batch["x_v"])
        dz = (z_v - z_u) / batch["dt"][:, None]
        dh = lne_neighbourhood_trajectories(z_u, dz, torch.arange(6), 2, 50.0)
        expected = direction_loss(dz, dh).mean()
    torch.testing.assert_close(losses["dir"], expected, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def nifti_scans(tmp_path_factory):
    """Two new scans as NIfTI files, in another size and orientation than the store's."""
    import nibabel as nib
    import numpy as np

    folder = tmp_path_factory.mktemp("scans")
    rng = np.random.default_rng(2)
    paths = []
    for k in range(2):
        path = folder / f"scan{k}.nii.gz"
        nib.save(nib.Nifti1Image(rng.random((20, 18, 22)).astype(np.float32),
                                 np.diag([-2.0, 2.0, 2.0, 1.0])), path)
        paths.append(str(path))
    return paths


@pytest.mark.slow
# the fast tier trains one baseline end to end (they share the trainer and registry path); the
# full tier all four
@pytest.mark.parametrize("name", ["ae", *(pytest.param(n, marks=pytest.mark.minutes)
                                          for n in ("vae", "lssl", "lne"))])
def test_each_baseline_trains_with_smoke_registers_and_embeds(name, age_contrast_store, tmp_path,
                                                              nifti_scans, monkeypatch):
    """`--cfg METHOD.yaml --cfg smoke.yaml` trains, registers the encoder, and `hpcbrain
    embed` gives its latents for new NIfTI scans (no SOM columns: these have no grid)."""
    from hpcbrain.cli import main
    from hpcbrain.config import load_config
    from hpcbrain.job import run_training

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config([f"{name}.yaml", "smoke.yaml"], [
        f"data.store={age_contrast_store}", "data.input_size=16", "train.epochs=2",
        "train.precision=fp32", f"run.root={tmp_path / 'runs'}", "tracking.enabled=true",
        f"tracking.uri={uri}", f"tracking.registered_model=test-{name}"])
    result = run_training(cfg)
    assert result.model_uri == f"models:/test-{name}@current" and result.epochs == 2
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    out = tmp_path / "latents.csv"
    assert main(["embed", result.model_uri, *nifti_scans, "--out", str(out)]) == 0
    with open(out, newline="") as handle:
        rows = list(csv.DictReader(handle))
    latent_dim = build_method(cfg).latent_dim
    assert list(rows[0]) == ["path", *(f"z{k}" for k in range(latent_dim))]
    assert [r["path"] for r in rows] == nifti_scans
