"""LSOR's mathematics: the soft self-organizing map in the latent space, its losses, the
reference-trajectory EMA and the SOM's initialisation (Ouyang et al., MICCAI 2023).

An Nr×Nc grid G of SOM nodes (row-major, node k = row·Nc + col) and, per node, a reference
trajectory ΔG kept as an EMA of the batch-mean trajectory Δz = (z_v − z_u)/Δt of the pairs whose
z_u falls in that node. Losses for a batch of pairs (``lsor_losses``; reductions follow the
official code so the published λ's keep their meaning):

* recon  = mean_voxels (x − H(z))² + mean_voxels (x − H(g_ε))², both scans of the pair
* commit = mean_{b,d} (z − g_ε)²                              (moves both z and g_ε)
* som    = mean_{b,k} w_bk · ‖sg[z_b] − g_k‖²,  w = som_weights(ε_b, grid, τ)
* dir    = mean_b 1 − cos(Δz_b, sg[ΔG[ε_u,b]])

The SOM phase starts from the grid `hpcbrain.methods.som_init` builds from the latents of all
training scans, ΔG the mean Δz per node; τ decays geometrically from τmax to τmin (`tau_at`).
The `Method` that drives all this is `hpcbrain.methods.lsor.LSOR`.

Distributed: `ema_update` all-reduces per-node sums and counts once (every rank ends with the
update a single process would compute on the global batch); `som_health_sums` are additive, so
ranks sum them in one all-reduce.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from hpcbrain import dist

__all__ = [
    "som_weights",
    "tau_at",
    "similarity_grid",
    "ema_update",
    "centre_update",
    "grid_distances",
    "squared_distances",
    "lsor_losses",
    "som_health_sums",
    "som_health",
]

_EPS = 1e-12


# ---------------------------------------------------------------------------------------------
# Public functions (conventions fixed by DESIGN.md)
# ---------------------------------------------------------------------------------------------
def grid_distances(bmu: Tensor, grid: tuple[int, int]) -> Tensor:
    """Manhattan grid distance [B, Nr·Nc] from each BMU (row-major index) to every node."""
    n_rows, n_cols = int(grid[0]), int(grid[1])
    k = torch.arange(n_rows * n_cols, device=bmu.device)
    bmu = bmu.reshape(-1, 1).long()
    return (bmu // n_cols - k // n_cols).abs() + (bmu % n_cols - k % n_cols).abs()


def som_weights(bmu: Tensor, grid: tuple[int, int], t: float) -> Tensor:
    """Neighbourhood weights [B, Nr·Nc]: w_k ∝ exp(−d_k² / (2·Nr·Nc·t²)), summing to 1 per row.

    d_k is the Manhattan grid distance from node k to the BMU, t the kernel width (the std
    before the Nr·Nc scaling), nodes numbered row-major.
    """
    if not t > 0:
        raise ValueError(f"som_weights: kernel width t must be > 0, got {t}")
    n_nodes = int(grid[0]) * int(grid[1])
    d = grid_distances(bmu, grid).to(torch.float32)
    logits = -(d ** 2) / (2.0 * n_nodes * float(t) ** 2)
    return torch.softmax(logits, dim=1)  # = exp(logits) / Σ exp(logits)


def tau_at(step: int, total_steps: int, tau_min: float, tau_max: float) -> float:
    """τmax·(τmin/τmax)^(step/total): τmax at step 0, τmin at step = total (clamped to [0, total]).

    ``total_steps <= 0`` (no SOM phase) gives τmin.
    """
    if not (tau_min > 0 and tau_max > 0):
        raise ValueError(f"tau_at: tau_min and tau_max must be > 0, got {tau_min}, {tau_max}")
    if total_steps <= 0:
        return float(tau_min)
    frac = min(max(float(step) / float(total_steps), 0.0), 1.0)
    return float(tau_max * (tau_min / tau_max) ** frac)


def squared_distances(z: Tensor, G: Tensor) -> Tensor:
    """‖z_b − g_k‖² [B, K], computed exactly (no ‖a‖²−2ab+‖b‖² cancellation)."""
    return ((z.unsqueeze(1) - G.unsqueeze(0)) ** 2).sum(-1)


def similarity_grid(z: Tensor, G: Tensor) -> Tensor:
    """ρ = softmax(−d/γ) over nodes, d_k = ‖z − g_k‖², γ = torch.std(d) (unbiased) over nodes."""
    d = squared_distances(z, G)
    gamma = d.std(dim=1, keepdim=True).clamp_min(_EPS)
    return torch.softmax(-d / gamma, dim=1)


def _acc_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


def ema_update(ref: Tensor, dz: Tensor, cluster: Tensor, alpha: float) -> Tensor:
    """One EMA step of the reference trajectories; returns a new [K, D] tensor (ref untouched).

    Nodes with members in the (global) batch get α·ref + (1−α)·mean(dz of members); the others
    keep ref. Per-node sums of dz and member counts are accumulated in float64; when a process
    group is up they are all-reduced (SUM) in ONE collective on a concatenated [sums | counts]
    tensor, so every rank applies the update a single process would compute on the concatenated
    global batch, whatever the per-rank batch sizes.
    """
    n_nodes, dim = ref.shape
    acc = _acc_dtype(ref.device)
    cluster = cluster.reshape(-1).to(device=ref.device, dtype=torch.long)
    dz = dz.detach().reshape(cluster.numel(), dim).to(device=ref.device, dtype=acc)
    stats = torch.zeros(n_nodes, dim + 1, dtype=acc, device=ref.device)
    stats[:, :dim].index_add_(0, cluster, dz)
    stats[:, dim].index_add_(0, cluster, torch.ones(cluster.numel(), dtype=acc, device=ref.device))
    stats = dist.all_reduce_sum(stats)
    counts = stats[:, dim:]
    mean = stats[:, :dim] / counts.clamp_min(1.0)
    old = ref.detach().to(acc)
    new = torch.where(counts > 0, alpha * old + (1.0 - alpha) * mean, old)
    return new.to(ref.dtype)


def centre_update(centre: Tensor, z: Tensor, momentum: float) -> Tensor:
    """One EMA step of the latent centre the nodes ride on (``lsor.centred_nodes``); returns a
    new [D] tensor: momentum·centre + (1 − momentum)·mean(z) over the global batch.

    The sum and count are accumulated in float64 and, when a process group is up, all-reduced
    (SUM) in one collective, so every rank gets the centre one process would compute on the
    concatenated batch, whatever the per-rank batch sizes."""
    acc = _acc_dtype(centre.device)
    z = z.detach().reshape(-1, centre.numel()).to(device=centre.device, dtype=acc)
    stats = torch.cat([z.sum(0), torch.tensor([float(z.shape[0])], dtype=acc, device=centre.device)])
    stats = dist.all_reduce_sum(stats)
    count = stats[-1]
    old = centre.detach().to(acc)
    # no host sync on the count: an empty global batch leaves the centre where it was
    new = momentum * old + (1.0 - momentum) * stats[:-1] / count.clamp_min(1.0)
    return torch.where(count > 0, new, old).to(centre.dtype)


def som_health_sums(z: Tensor, G: Tensor, grid: tuple[int, int]) -> Tensor:
    """Additive SOM-health statistics of latents z [B, D] against nodes G [K, D], as one float64
    vector (so ranks can all-reduce it in one collective):
    [count per node (K) | Σ‖z − g_bmu‖ | Σ topographic errors | B | Σz (D) | Σ‖z‖²].

    A topographic error is a latent whose two nearest nodes are not grid neighbours
    (Manhattan grid distance ≠ 1, the 4-neighbourhood the SOM kernel is built on)."""
    z = z.detach().to(torch.float64)
    G = G.detach().to(device=z.device, dtype=torch.float64)
    n_nodes = G.shape[0]
    d = squared_distances(z, G)
    if n_nodes >= 2:
        nearest = d.topk(2, dim=1, largest=False).indices
        bmu, second = nearest[:, 0], nearest[:, 1]
        apart = grid_distances(bmu, grid).gather(1, second.reshape(-1, 1)).reshape(-1) != 1
    else:
        bmu = d.argmin(dim=1)
        apart = torch.zeros_like(bmu, dtype=torch.bool)
    counts = torch.bincount(bmu, minlength=n_nodes).to(torch.float64)
    qe = d.gather(1, bmu.reshape(-1, 1)).clamp_min(0).sqrt().sum()
    return torch.cat([counts, qe.reshape(1), apart.sum().to(torch.float64).reshape(1),
                      torch.tensor([float(z.shape[0])], dtype=torch.float64, device=z.device),
                      z.sum(dim=0), (z ** 2).sum().reshape(1)])


def som_health(sums: Tensor, n_nodes: int) -> dict[str, Any]:
    """Occupancy, quantisation error (mean distance to the BMU), topographic error (share),
    latent mean and spread (rms distance to the mean) from `som_health_sums` (summed over
    batches and ranks)."""
    sums = sums.to(torch.float64)
    counts = sums[:n_nodes]
    qe, te, n = (float(v) for v in sums[n_nodes:n_nodes + 3])
    z_sum, z_sq = sums[n_nodes + 3:-1], float(sums[-1])
    n = max(n, 1.0)
    mean = z_sum / n
    spread = max(z_sq / n - float((mean ** 2).sum()), 0.0) ** 0.5
    return {"occupied_nodes": int((counts > 0).sum()), "quantisation_error": qe / n,
            "topographic_error": te / n, "latent_mean": mean, "latent_spread": spread,
            "counts": counts}


# ---------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------
def lsor_losses(
    x_u: Tensor,
    x_v: Tensor,
    z_u: Tensor,
    z_v: Tensor,
    dt: Tensor,
    decode: Callable[[Tensor], Tensor],
    G: Tensor,
    dG: Tensor,
    t: float,
    grid: tuple[int, int],
) -> dict[str, Tensor]:
    """The unweighted LSOR losses of a batch of pairs (SOM phase).

    x_u, x_v: volumes [B, ...]; z_u, z_v: their latents [B, D]; dt: [B] years; decode: latent
    batch → volume batch; G: nodes [K, D] (row-major grid); dG: reference trajectories [K, D];
    t: SOM kernel width. Returns recon (= recon_z + recon_g), recon_z, recon_g, commit, som, dir
    (scalar tensors with their graphs) and bmu_u, bmu_v [B] (long), dz [B, D].
    """
    n = z_u.shape[0]
    x = torch.cat([x_u, x_v], dim=0)
    z = torch.cat([z_u, z_v], dim=0)
    # BMU and L_som see sg[z]; the BMU index carries no gradient anyway.
    d_sg = squared_distances(z.detach(), G)
    bmu = d_sg.detach().argmin(dim=1)
    g = G.index_select(0, bmu)
    # Reconstructions from z (encoder + decoder) and from g_ε (G + decoder). Separate decoder
    # calls, as the official code, so BatchNorm statistics are not mixed between the two.
    recon_z = F.mse_loss(decode(z), x)
    recon_g = F.mse_loss(decode(g), x)
    commit = ((z - g) ** 2).mean()
    w = som_weights(bmu, grid, t).to(d_sg.dtype)
    som = (w * d_sg).mean()
    # Δz in at least float32 (z may come out of a bf16 autocast region)
    acc = torch.promote_types(z.dtype, torch.float32)
    dz = (z_v.to(acc) - z_u.to(acc)) / dt.reshape(-1, 1).to(acc)
    ref = dG.detach().index_select(0, bmu[:n])
    cos = (dz * ref).sum(1) / ((dz.norm(dim=1) + _EPS) * (ref.norm(dim=1) + _EPS))
    direction = (1.0 - cos).mean()
    return {
        "recon": recon_z + recon_g,
        "recon_z": recon_z,
        "recon_g": recon_g,
        "commit": commit,
        "som": som,
        "dir": direction,
        "bmu_u": bmu[:n],
        "bmu_v": bmu[n:],
        "dz": dz,
    }
