"""The official LSOR code's training step, for timing beside ours (`train_throughput.py --official`).

Reads `DIR/src/model.py` of a checkout of github.com/ouyangjiahong/longitudinal-som-single-modality
and builds its `SOMPairVisit` with `src/config_pair.yaml`'s settings (4×8 grid, 1024-d latent,
LNE direction loss with the grid EMA). One step is the body of `main_pair.py`'s training loop in
the SOM phase, in its order: `forward_pair_z`, the five losses, `loss.backward()`, its
per-parameter finiteness check, the snapshot of nodes, encoder and decoder to numpy it takes
before every `optimizer.step()`, the step (Adam, amsgrad, as its optimiser), `zero_grad()` and
the snapshot after it (the loop prints the mean change of each). With
``snapshots=False`` the step leaves the snapshot out (it only feeds debugging output), to show
what it costs. Nothing of the official code is copied here: it is imported from DIR.

Two shims let it run on today's torch without changing what it computes: the official model.py
imports h5py (for its data files, unused by the step), so where h5py is not installed an empty
module stands in for it; and its grid distances are made contiguous before compute_som_loss
`.view()`s them (torch 2.x returns that broadcast non-contiguous, and the view fails).
"""
from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path
from typing import Callable

import torch

GRID = (4, 8)


def load_official_model(checkout: Path):
    path = Path(checkout) / "src" / "model.py"
    if not path.is_file():
        raise SystemExit(f"--official {checkout}: no src/model.py there; pass a checkout of "
                         f"github.com/ouyangjiahong/longitudinal-som-single-modality")
    try:
        import h5py  # noqa: F401
    except ImportError:
        sys.modules.setdefault("h5py", types.ModuleType("h5py"))
    spec = importlib.util.spec_from_file_location("lsor_official_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def official_step(checkout: Path, batch: int, size: int, device: torch.device,
                  snapshots: bool = True, seed: int = 0) -> Callable[[], None]:
    """A function running one official SOM-phase training step on a fixed random batch."""
    if size != 64:
        raise SystemExit("the official LSOR model is built for 64³ inputs (its Encoder's "
                         "img_size); run --official with --size 64")
    module = load_official_model(checkout)
    torch.manual_seed(seed)
    config = {"device": device, "latent_size": 1024, "embedding_size": list(GRID),
              "dataset_name": "ADNI", "init_emb": "pretrained-kmeans-switch",
              "dir_reg": "LNE", "is_grid_ema": True, "grid_ema_rate": 0.99, "Tmax": 1.0,
              "Tmin": 0.1, "lambda_recon": 1.0, "lambda_recon_zq": 1.0, "lambda_commit": 0.5,
              "commit_ratio": 1.0, "lambda_som": 1.0, "lambda_dir": 0.1}
    class SOMPairVisit(module.SOMPairVisit):
        # torch 2.x returns the broadcast grid distances non-contiguous, and compute_som_loss's
        # .view() of them fails; the official code ran on a torch where it was contiguous
        def compute_manhattan_distance(self, k):
            return super().compute_manhattan_distance(k).contiguous()

    model = SOMPairVisit(config).to(device)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-4, betas=(0.9, 0.999),
                                 weight_decay=1e-5, amsgrad=True)
    g = torch.Generator().manual_seed(seed)
    image1 = torch.randn(batch, 1, size, size, size, generator=g).to(device)
    image2 = torch.randn(batch, 1, size, size, size, generator=g).to(device)
    interval = (0.5 + torch.rand(batch, generator=g)).to(device)
    iteration = {"k": 0}

    def snapshot():
        return (model.embeddings.detach().cpu().numpy(),
                torch.cat([p.view(-1) for p in model.encoder.parameters()]).detach().cpu().numpy(),
                torch.cat([p.view(-1) for p in model.decoder.parameters()]).detach().cpu().numpy())

    def step() -> None:
        recons, zs = model.forward_pair_z(image1, image2, interval)
        (recon_ze1, recon_ze2), (recon_zq1, recon_zq2) = recons
        (z_e1, z_e2, z_e_diff), (z_q1, z_q2), (k1, k2), _ = zs
        it, it_max = iteration["k"], 1000
        loss = config["lambda_recon"] * 0.5 * (model.compute_recon_loss(image1, recon_ze1)
                                               + model.compute_recon_loss(image2, recon_ze2))
        loss = loss + config["lambda_recon_zq"] * 0.5 * (
            model.compute_recon_loss(image1, recon_zq1) + model.compute_recon_loss(image2, recon_zq2))
        loss = loss + config["lambda_commit"] * 0.5 * (
            model.compute_commit_loss(z_e1, z_q1) + model.compute_commit_loss(z_e2, z_q2))
        loss = loss + config["lambda_som"] * 0.5 * (
            model.compute_som_loss(z_e1, k1, it, it_max) + model.compute_som_loss(z_e2, k2, it, it_max))
        loss_dir = model.compute_lne_grid_ema_direction_loss(z_e_diff, k1)
        model.update_grid_dz_ema(z_e_diff, k1)
        loss = loss + config["lambda_dir"] * loss_dir
        loss.item()                                      # the loop logs every loss term
        loss.backward()
        for param in model.parameters():
            if param.grad is not None:
                torch.isfinite(param.grad).all()
        before = snapshot() if snapshots else None
        optimizer.step()
        optimizer.zero_grad()
        if snapshots:                                    # it prints the mean change of each
            for old, new in zip(before, snapshot()):
                abs(new - old).mean()
        iteration["k"] += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return step
