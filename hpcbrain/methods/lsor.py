"""LSOR: Longitudinally-consistent Self-Organized Representation learning (Ouyang et al. 2023).

A 3D conv autoencoder whose latent space holds a soft self-organizing map: an Nr×Nc grid G of
SOM nodes (row-major, node k = row·Nc + col) and, per node, a reference trajectory ΔG kept as an
EMA of the batch-mean trajectory Δz = (z_v − z_u)/Δt of the pairs whose z_u falls in that node.

Training losses for a batch of pairs (``lsor_losses``; reductions follow the official code so the
published λ's keep their meaning):

* recon  = mean_voxels (x − H(z))² + mean_voxels (x − H(g_ε))², both scans of the pair
* commit = mean_{b,d} (z − g_ε)²                              (moves both z and g_ε)
* som    = mean_{b,k} w_bk · ‖sg[z_b] − g_k‖²,  w = som_weights(ε_b, grid, τ)
* dir    = mean_b 1 − cos(Δz_b, sg[ΔG[ε_u,b]])
* loss   = λ_recon·recon + λ_commit·commit + λ_som·som + λ_dir·dir

Schedule: ``warmup_epochs`` reconstruction-only epochs (on z; G/ΔG untouched), then at the start
of the SOM phase a k-means of the latents of all training scans initialises G (reordered so grid
neighbours are latent neighbours, see `reorder_to_grid`) and ΔG (mean Δz per node), then all
losses with τ decaying geometrically from τmax to τmin over the SOM phase's steps.

Distributed: `ema_update` all-reduces per-node sums and counts once (every rank ends with the
update a single process would compute on the global batch); the k-means init gathers the
latents to rank 0, runs there and broadcasts G and ΔG. Paper-vs-official-code decisions are in
docs/lsor-decisions.md.
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import Tensor, nn

from hpcbrain.methods.base import Method, register_method
from hpcbrain.models.autoencoder import ConvAutoencoder

__all__ = [
    "som_weights",
    "tau_at",
    "similarity_grid",
    "ema_update",
    "grid_distances",
    "squared_distances",
    "lsor_losses",
    "som_health_sums",
    "som_health",
    "batch_norm_mode",
    "grid_neighbour_cost",
    "reorder_to_grid",
    "kmeans_grid_init",
    "init_reference_trajectories",
    "LSOR",
]

_EPS = 1e-12
log = logging.getLogger(__name__)
#: Optional keys of a pair batch holding global scan indices of x_u / x_v; when present the SOM
#: initialisation de-duplicates scans (k-means sees each scan once) and pairs.
SCAN_INDEX_KEYS = ("index_u", "index_v")


#: The SOM file registered with an LSOR encoder (`LSOR.registry_files`, read by `hpcbrain embed`).
SOM_FILE = "som.npz"
#: BatchNorm statistics the k-means initialisation encodes with (see `LSOR.initialise_som`).
INIT_BN_MODES = ("batch", "running")


@contextlib.contextmanager
def batch_norm_mode(module: nn.Module, use_batch_statistics: bool):
    """No-grad encoding context: every BatchNorm normalises with its batch's statistics
    (``use_batch_statistics``) or with its running statistics (eval mode); dropout-like layers
    are in eval mode either way. Running statistics and training modes are restored on exit, so
    encoding never changes the model."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [{k: v.clone() for k, v in m.named_buffers(recurse=False)} for m in norms]
    modes = {m: m.training for m in module.modules()}
    module.eval()
    if use_batch_statistics:
        for m in norms:
            m.train()
    try:
        yield
    finally:
        for m, state in zip(norms, saved):
            for key, value in state.items():
                getattr(m, key).copy_(value)
        for m, mode in modes.items():
            m.training = mode


def _dist_ready() -> bool:
    return dist.is_available() and dist.is_initialized()


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
    if _dist_ready():
        dist.all_reduce(stats, op=dist.ReduceOp.SUM)
    counts = stats[:, dim:]
    mean = stats[:, :dim] / counts.clamp_min(1.0)
    old = ref.detach().to(acc)
    new = torch.where(counts > 0, alpha * old + (1.0 - alpha) * mean, old)
    return new.to(ref.dtype)


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


# ---------------------------------------------------------------------------------------------
# SOM initialisation: k-means, grid reordering, reference trajectories
# ---------------------------------------------------------------------------------------------
def _grid_edges(grid: tuple[int, int]) -> list[tuple[int, int]]:
    n_rows, n_cols = int(grid[0]), int(grid[1])
    edges = []
    for r in range(n_rows):
        for c in range(n_cols):
            k = r * n_cols + c
            if c + 1 < n_cols:
                edges.append((k, k + 1))
            if r + 1 < n_rows:
                edges.append((k, k + n_cols))
    return edges


def _as_numpy(x: Tensor | np.ndarray) -> np.ndarray:
    if isinstance(x, Tensor):
        return x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def grid_neighbour_cost(nodes: Tensor | np.ndarray, grid: tuple[int, int]) -> float:
    """Σ over grid-adjacent node pairs (4-neighbourhood) of the Euclidean latent distance."""
    g = _as_numpy(nodes)
    return float(sum(np.linalg.norm(g[a] - g[b]) for a, b in _grid_edges(grid)))


def reorder_to_grid(centroids: Tensor | np.ndarray, grid: tuple[int, int], max_sweeps: int = 1000) -> Tensor:
    """A permutation ``perm`` [K] placing centroid ``perm[k]`` at grid node k (row-major) so that
    grid neighbours are latent neighbours. Deterministic.

    1. Seed: the two leading principal components of the centroids (signs fixed so the largest
       |loading| is positive). The longer grid axis follows PC1: centroids sorted by PC1 are cut
       into consecutive groups, one per line along that axis, and each group is sorted by PC2
       across the other axis. A lattice embedded linearly in latent space is recovered exactly.
    2. Refinement: best-improvement pairwise swaps minimising `grid_neighbour_cost` (the Σ of
       latent distances over grid-adjacent pairs) until no swap lowers it (ties → lowest pair);
       each accepted swap lowers the cost strictly, so it terminates at a swap-local optimum.
    """
    c = _as_numpy(centroids)
    n_rows, n_cols = int(grid[0]), int(grid[1])
    n_nodes = n_rows * n_cols
    if c.shape[0] != n_nodes:
        raise ValueError(f"reorder_to_grid: {c.shape[0]} centroids for a {n_rows}×{n_cols} grid")

    # 1. PCA seed
    centred = c - c.mean(axis=0, keepdims=True)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    comps = np.zeros((2, c.shape[1]))
    comps[: min(2, vt.shape[0])] = vt[:2]
    for i in range(2):
        if comps[i].any() and comps[i][np.argmax(np.abs(comps[i]))] < 0:
            comps[i] = -comps[i]
    proj = centred @ comps.T  # [K, 2]
    order1 = np.argsort(proj[:, 0], kind="stable")
    perm = np.empty(n_nodes, dtype=np.int64)
    long_is_cols = n_cols >= n_rows
    n_lines, line_len = (n_cols, n_rows) if long_is_cols else (n_rows, n_cols)
    for line in range(n_lines):
        members = order1[line * line_len:(line + 1) * line_len]
        members = members[np.argsort(proj[members, 1], kind="stable")]
        for pos, m in enumerate(members):
            r, col = (pos, line) if long_is_cols else (line, pos)
            perm[r * n_cols + col] = m

    # 2. swap refinement
    dist_mx = np.linalg.norm(c[:, None, :] - c[None, :, :], axis=-1)
    neigh: list[list[int]] = [[] for _ in range(n_nodes)]
    for a, b in _grid_edges(grid):
        neigh[a].append(b)
        neigh[b].append(a)

    def local_cost(p: np.ndarray, positions: tuple[int, int]) -> float:
        seen = set()
        total = 0.0
        for pos in positions:
            for nb in neigh[pos]:
                edge = (min(pos, nb), max(pos, nb))
                if edge not in seen:
                    seen.add(edge)
                    total += dist_mx[p[edge[0]], p[edge[1]]]
        return total

    for _ in range(max_sweeps):
        best_gain, best_pair = 1e-12, None
        for a in range(n_nodes):
            for b in range(a + 1, n_nodes):
                before = local_cost(perm, (a, b))
                perm[a], perm[b] = perm[b], perm[a]
                gain = before - local_cost(perm, (a, b))
                perm[a], perm[b] = perm[b], perm[a]
                if gain > best_gain:
                    best_gain, best_pair = gain, (a, b)
        if best_pair is None:
            break
        a, b = best_pair
        perm[a], perm[b] = perm[b], perm[a]
    return torch.from_numpy(perm)


def kmeans_grid_init(
    latents: Tensor,
    grid: tuple[int, int],
    seed: int = 0,
    max_iter: int = 300,
    n_init: int = 3,
) -> Tensor:
    """k-means (sklearn, K = Nr·Nc) of ``latents`` [N, D], centroids reordered onto the grid
    with `reorder_to_grid`. Returns G [K, D] (float32, row-major grid order, CPU)."""
    from sklearn.cluster import KMeans

    n_nodes = int(grid[0]) * int(grid[1])
    x = _as_numpy(latents)
    if x.ndim != 2:
        raise ValueError(f"kmeans_grid_init: latents must be [N, D], got shape {x.shape}")
    n_distinct = np.unique(x, axis=0).shape[0] if x.shape[0] else 0
    if n_distinct < n_nodes:
        raise ValueError(
            f"kmeans_grid_init: {n_distinct} distinct latents for {n_nodes} SOM nodes "
            f"({grid[0]}×{grid[1]} grid); need at least as many scans as nodes"
        )
    km = KMeans(n_clusters=n_nodes, n_init=n_init, max_iter=max_iter, random_state=seed)
    km.fit(x)
    centroids = km.cluster_centers_
    perm = reorder_to_grid(centroids, grid).numpy()
    return torch.from_numpy(centroids[perm]).to(torch.float32)


def init_reference_trajectories(z_u: Tensor, dz: Tensor, G: Tensor) -> Tensor:
    """ΔG [K, D]: mean Δz of the pairs whose z_u has node k as nearest node of G (the same BMU
    rule as training, so pairing follows the reordered grid); nodes without pairs get the global
    mean Δz."""
    z_u64 = z_u.detach().to("cpu", torch.float64)
    dz64 = dz.detach().to("cpu", torch.float64)
    G64 = G.detach().to("cpu", torch.float64)
    n_nodes, dim = G64.shape
    if z_u64.shape[0] == 0:
        raise ValueError("init_reference_trajectories: no pairs")
    bmu = squared_distances(z_u64, G64).argmin(dim=1)
    sums = torch.zeros(n_nodes, dim, dtype=torch.float64).index_add_(0, bmu, dz64)
    counts = torch.bincount(bmu, minlength=n_nodes).to(torch.float64).unsqueeze(1)
    global_mean = dz64.mean(dim=0, keepdim=True).expand(n_nodes, dim)
    out = torch.where(counts > 0, sums / counts.clamp_min(1.0), global_mean)
    return out.to(torch.float32)


# ---------------------------------------------------------------------------------------------
# Distributed helpers for the initialisation
# ---------------------------------------------------------------------------------------------
def _gather_rows_to_rank0(local: Tensor) -> Optional[Tensor]:
    """[n_r, C] on each rank → [Σ n_r, C] on rank 0 in rank order (None on the others).
    Per-rank row counts may differ: sizes are all-gathered first and rows padded to the max."""
    world, rank = dist.get_world_size(), dist.get_rank()
    n = torch.tensor([local.shape[0]], dtype=torch.long, device=local.device)
    sizes_t = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes_t, n)
    sizes = [int(s.item()) for s in sizes_t]
    padded = local.new_zeros((max(max(sizes), 1), local.shape[1]))
    padded[: local.shape[0]] = local
    if rank == 0:
        bufs = [torch.empty_like(padded) for _ in range(world)]
        dist.gather(padded, bufs, dst=0)
        return torch.cat([b[:s] for b, s in zip(bufs, sizes)], dim=0)
    dist.gather(padded, None, dst=0)
    return None


# ---------------------------------------------------------------------------------------------
# The method
# ---------------------------------------------------------------------------------------------
def _cfg(cfg: Any, key: str, default: Any) -> Any:
    value = OmegaConf.select(cfg, key, default=default) if OmegaConf.is_config(cfg) else default
    return default if value is None else value


@register_method("lsor")
class LSOR(Method):
    """LSOR as a `Method`: pair batches {x_u, x_v: [B,1,S,S,S], dt: [B] years, (index_u, index_v)}.

    State carried by ``state_dict()``: ``G`` (parameter [K, D], the SOM nodes), ``dG`` (buffer
    [K, D], reference trajectories), ``initialised`` (bool buffer: SOM phase active).
    """

    batch_kind = "pairs"
    # G gets no gradient during the recon-only warm-up (DDP: find_unused_parameters=True).
    find_unused_parameters = True
    # The reference-trajectory EMA must not be rounded to bf16 by a mixed-precision engine.
    fp32_buffers = ("dG",)

    def __init__(self, cfg: Any) -> None:
        super().__init__()
        self.input_size = int(cfg.data.input_size)
        self.widths = [int(w) for w in cfg.model.widths]
        self.epochs = int(cfg.train.epochs)
        self.seed = int(cfg.train.seed)
        c = cfg.lsor
        self.grid = (int(c.grid_rows), int(c.grid_cols))
        self.warmup_epochs = int(c.warmup_epochs)
        self.lambda_recon = float(c.lambda_recon)
        self.lambda_commit = float(c.lambda_commit)
        self.lambda_som = float(c.lambda_som)
        self.lambda_dir = float(c.lambda_dir)
        self.tau_max = float(c.tau_max)
        self.tau_min = float(c.tau_min)
        self.ema_alpha = float(c.ema_alpha)
        self.kmeans_max_iter = int(c.kmeans_max_iter)
        self.kmeans_n_init = int(_cfg(cfg, "lsor.kmeans_n_init", 3))
        self.init_bn_mode = str(_cfg(cfg, "lsor.init_bn_mode", "batch"))
        self.node_lr_scale = float(_cfg(cfg, "lsor.node_lr_scale", 1.0))
        if not self.node_lr_scale > 0:
            raise ValueError(f"lsor.node_lr_scale must be > 0, got {self.node_lr_scale}")
        if self.init_bn_mode not in INIT_BN_MODES:
            raise ValueError(f"lsor.init_bn_mode must be one of {', '.join(INIT_BN_MODES)}, "
                             f"got {self.init_bn_mode!r}")
        if min(self.grid) < 1:
            raise ValueError(f"lsor.grid_rows/grid_cols must be >= 1, got {self.grid}")
        if not 0 <= self.warmup_epochs <= self.epochs:
            raise ValueError(f"lsor.warmup_epochs={self.warmup_epochs} must lie in [0, train.epochs={self.epochs}]")
        tau_at(0, 1, self.tau_min, self.tau_max)  # validates τ's

        self.net = ConvAutoencoder(self.widths, self.input_size)
        self.latent_dim = self.net.latent_dim
        n_nodes = self.grid[0] * self.grid[1]
        # Random small nodes until the k-means initialisation overwrites them.
        self.G = nn.Parameter(0.05 * torch.randn(n_nodes, self.latent_dim))
        self.register_buffer("dG", torch.zeros(n_nodes, self.latent_dim))
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))
        self._tau = self.tau_max
        self._som_step = 0
        # (latent mean, G) at the last epoch end, for the drift-vs-node-movement health metric
        self._previous_epoch_state: Optional[tuple[Tensor, Tensor]] = None

    # --- interface ----------------------------------------------------------------------------
    def encoder(self) -> nn.Module:
        return self.net.encoder

    def som_active(self) -> bool:
        return bool(self.initialised.item())

    def set_progress(self, epoch: int, step_in_epoch: int, steps_per_epoch: int) -> None:
        super().set_progress(epoch, step_in_epoch, steps_per_epoch)
        total = self.steps_per_epoch * (self.epochs - self.warmup_epochs)
        step = (self.epoch - self.warmup_epochs) * self.steps_per_epoch + self.step_in_epoch
        self._som_step = max(step, 0)
        self._tau = tau_at(self._som_step, total, self.tau_min, self.tau_max)

    @property
    def tau(self) -> float:
        return self._tau

    def scalars(self) -> dict[str, float]:
        return {"tau": float(self._tau), "phase": 1.0 if self.som_active() else 0.0}

    def on_epoch_start(self, epoch: int, encode_batches: Callable[[], Iterable[dict]]) -> None:
        super().on_epoch_start(epoch, encode_batches)
        # ">=" also covers a resume after the transition epoch from a pre-init checkpoint; a
        # checkpoint taken after init carries initialised=True and never re-runs k-means.
        if epoch >= self.warmup_epochs and not self.som_active():
            self.initialise_som(encode_batches)

    @torch.no_grad()
    def on_epoch_end(self, epoch: int, encode_batches: Callable[[], Iterable[dict]]) -> dict[str, float]:
        """SOM health over the training scans, encoded as evaluation and `hpcbrain embed` see
        them (running BatchNorm statistics): occupied nodes, quantisation and topographic
        error, and how far the latent cloud moved this epoch against how far the nodes moved.
        Scans are taken as the pair batches hold them (a scan in several pairs counts once per
        pair). A collective when a process group is up (one all-reduce)."""
        n_nodes = self.grid[0] * self.grid[1]
        with batch_norm_mode(self, use_batch_statistics=False):
            sums = None
            for batch in encode_batches():
                x_u, x_v, _ = self._unpack(batch)
                z = self.net.encoder(torch.cat([x_u, x_v], dim=0))
                part = som_health_sums(z, self.G, self.grid)
                sums = part if sums is None else sums + part
        if sums is None:
            sums = torch.zeros(n_nodes + self.latent_dim + 4, dtype=torch.float64,
                               device=self.G.device)
        if _dist_ready() and dist.get_world_size() > 1:
            dist.all_reduce(sums, op=dist.ReduceOp.SUM)
        health = som_health(sums, n_nodes)
        nodes = self.G.detach().to(torch.float64)
        metrics = {"latent_spread": health["latent_spread"]}
        previous = self._previous_epoch_state
        if previous is not None:
            metrics["latent_drift"] = float((health["latent_mean"] - previous[0]).norm())
            metrics["node_movement"] = float((nodes - previous[1]).norm(dim=1).mean())
        self._previous_epoch_state = (health["latent_mean"], nodes.clone())
        if self.som_active():
            metrics.update(occupied_nodes=float(health["occupied_nodes"]),
                           quantisation_error=health["quantisation_error"],
                           topographic_error=health["topographic_error"],
                           centroid_gap=float((nodes.mean(0) - health["latent_mean"]).norm()))
            # While τ is broad (first half of the SOM phase) the whole grid is pulled towards
            # the latents' mean and occupancy may dip; it should recover as τ shrinks.
            late = epoch + 1 - self.warmup_epochs >= (self.epochs - self.warmup_epochs) / 2
            if late and health["occupied_nodes"] < n_nodes / 2:
                log.warning(
                    "SOM health after epoch %d: only %d of %d nodes are any training scan's "
                    "best-matching node (latents moved %.3g, nodes %.3g this epoch; τ %.3g). "
                    "The grid is collapsing: train without augmentation (data.augment.flip=false "
                    "data.augment.rotation_deg=0 data.augment.translation_vox=0), keep "
                    "lsor.init_bn_mode=batch, and let the nodes keep up: the paper has ~1,900 "
                    "SOM steps, so with fewer raise lsor.node_lr_scale (the demo: 10) or give "
                    "the SOM phase more steps; see docs/lsor-decisions.md",
                    epoch + 1, health["occupied_nodes"], n_nodes,
                    metrics.get("latent_drift", float("nan")),
                    metrics.get("node_movement", float("nan")), self._tau)
        return {f"som/{key}": value for key, value in metrics.items()}

    def forward(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        return self._losses(batch, update_ema=self.training)

    @torch.no_grad()
    def validation_step(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        was_training = self.training
        self.eval()  # BatchNorm running stats must not move either
        try:
            return self._losses(batch, update_ema=False)
        finally:
            self.train(was_training)

    def parameter_groups(self) -> list[dict[str, Any]]:
        """The SOM nodes G at ``lsor.node_lr_scale`` × train.lr, everything else at train.lr
        (docs/lsor-decisions.md: Adam moves a node by about lr per coordinate and step)."""
        others = [p for name, p in self.named_parameters() if name != "G"]
        return [{"params": others, "lr_scale": 1.0},
                {"params": [self.G], "lr_scale": self.node_lr_scale}]

    def registry_files(self, folder: Path) -> list[Path]:
        """``som.npz`` (G, ΔG, grid shape) beside the registered encoder: `hpcbrain embed` reads it
        to give each scan its best-matching node and similarity grid."""
        path = Path(folder) / SOM_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, nodes=self.G.detach().to("cpu", torch.float32).numpy(),
                 trajectories=self.dG.detach().to("cpu", torch.float32).numpy(),
                 grid=np.array(self.grid, dtype=np.int64))
        return [path]

    # --- evaluation helpers ---------------------------------------------------------------------
    @torch.no_grad()
    def bmu(self, z: Tensor) -> Tensor:
        """Row-major index [B] of the nearest SOM node of each latent."""
        return squared_distances(z.to(self.G), self.G.detach()).argmin(dim=1)

    @torch.no_grad()
    def similarity(self, z: Tensor) -> Tensor:
        """Similarity grid [B, K] (`similarity_grid` against G); reshape to (Nr, Nc) row-major."""
        return similarity_grid(z.to(self.G), self.G.detach())

    # --- internals --------------------------------------------------------------------------------
    def _unpack(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor]:
        ref = next(self.net.encoder.parameters())
        x_u = batch["x_u"].to(device=ref.device, dtype=ref.dtype, non_blocking=True)
        x_v = batch["x_v"].to(device=ref.device, dtype=ref.dtype, non_blocking=True)
        dt = torch.as_tensor(batch["dt"]).to(device=ref.device, dtype=torch.float32).reshape(-1)
        if x_u.shape[0] != x_v.shape[0] or dt.shape[0] != x_u.shape[0]:
            raise ValueError(f"pair batch sizes differ: x_u {x_u.shape[0]}, x_v {x_v.shape[0]}, dt {dt.shape[0]}")
        return x_u, x_v, dt

    def _losses(self, batch: dict[str, Any], update_ema: bool) -> dict[str, Tensor]:
        x_u, x_v, dt = self._unpack(batch)
        n = x_u.shape[0]
        z = self.net.encoder(torch.cat([x_u, x_v], dim=0))
        if not self.som_active():
            # Warm-up: reconstruction from z only; G and ΔG are not touched.
            recon = F.mse_loss(self.net.decoder(z), torch.cat([x_u, x_v], dim=0))
            zero = torch.zeros((), device=recon.device, dtype=recon.dtype)
            return {"loss": self.lambda_recon * recon, "recon": recon.detach(),
                    "commit": zero, "som": zero.clone(), "dir": zero.clone()}
        parts = lsor_losses(x_u, x_v, z[:n], z[n:], dt, self.net.decoder, self.G, self.dG, self._tau, self.grid)
        loss = (self.lambda_recon * parts["recon"] + self.lambda_commit * parts["commit"]
                + self.lambda_som * parts["som"] + self.lambda_dir * parts["dir"])
        if update_ema:
            with torch.no_grad():
                self.dG.copy_(ema_update(self.dG, parts["dz"].detach(), parts["bmu_u"], self.ema_alpha))
        out = {"loss": loss}
        for key in ("recon", "commit", "som", "dir"):
            out[key] = parts[key].detach()
        return out

    @torch.no_grad()
    def _collect_rows(self, encode_batches: Callable[[], Iterable[dict]]) -> Tensor:
        """Rows [n, 2D+3] = [z_u | z_v | dt | index_u | index_v] (float32, so scan indices are exact
        below 2**24; −1 when the batch has no index keys)."""
        rows = []
        device = self.G.device
        for batch in encode_batches():
            x_u, x_v, dt = self._unpack(batch)
            n = x_u.shape[0]
            z = self.net.encoder(torch.cat([x_u, x_v], dim=0)).to(torch.float32)
            idx = []
            for key in SCAN_INDEX_KEYS:
                if key in batch:
                    idx.append(torch.as_tensor(batch[key]).to(device=device, dtype=torch.float32).reshape(-1, 1))
                else:
                    idx.append(torch.full((n, 1), -1.0, device=device))
            rows.append(torch.cat([z[:n], z[n:], dt.reshape(-1, 1), *idx], dim=1))
        if not rows:
            return torch.zeros(0, 2 * self.latent_dim + 3, device=device)
        return torch.cat(rows, dim=0)

    def _init_from_rows(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        """G, ΔG from the gathered rows (runs on one process)."""
        rows = rows.detach().to("cpu", torch.float64)
        d = self.latent_dim
        if rows.shape[0] == 0:
            raise ValueError("LSOR SOM initialisation: encode_batches() yielded no pairs")
        z_u, z_v, dt = rows[:, :d], rows[:, d:2 * d], rows[:, 2 * d]
        idx_u, idx_v = rows[:, 2 * d + 1].numpy(), rows[:, 2 * d + 2].numpy()
        if (idx_u >= 0).all() and (idx_v >= 0).all():
            # each scan once for k-means; each (u, v) pair once for ΔG (samplers may repeat)
            _, first = np.unique(np.concatenate([idx_u, idx_v]), return_index=True)
            scans = torch.cat([z_u, z_v], dim=0)[torch.from_numpy(np.sort(first))]
            _, pfirst = np.unique(np.stack([idx_u, idx_v], axis=1), axis=0, return_index=True)
            keep = torch.from_numpy(np.sort(pfirst))
            z_u, z_v, dt = z_u[keep], z_v[keep], dt[keep]
        else:
            scans = torch.cat([z_u, z_v], dim=0)
        dz = (z_v - z_u) / dt.unsqueeze(1)
        G = kmeans_grid_init(scans, self.grid, seed=self.seed, max_iter=self.kmeans_max_iter, n_init=self.kmeans_n_init)
        dG = init_reference_trajectories(z_u, dz, G)
        return G, dG

    def initialise_som(self, encode_batches: Callable[[], Iterable[dict]]) -> None:
        """Encode all training pairs (no grad), k-means → G, ΔG; identical on every rank
        (gathered to rank 0, computed there, broadcast). Sets ``initialised``.

        ``lsor.init_bn_mode``: "batch" (default, as the official code) encodes with BatchNorm's
        batch statistics -- the latents the SOM phase's training steps see, which differ from
        the running-statistics latents by 74 % of their spread at this point -- without moving
        the running statistics; "running" encodes in eval mode."""
        with batch_norm_mode(self, use_batch_statistics=self.init_bn_mode == "batch"):
            rows = self._collect_rows(encode_batches)
        n_nodes = self.grid[0] * self.grid[1]
        if _dist_ready() and dist.get_world_size() > 1:
            device = self.G.device
            gathered = _gather_rows_to_rank0(rows.to(device))
            packed = torch.zeros(2 * n_nodes, self.latent_dim, dtype=torch.float32, device=device)
            status = torch.zeros(1, dtype=torch.float32, device=device)
            error: Optional[BaseException] = None
            if dist.get_rank() == 0:
                try:
                    G, dG = self._init_from_rows(gathered)
                    packed.copy_(torch.cat([G, dG], dim=0).to(device))
                    status.fill_(1.0)
                except Exception as exc:  # every rank must learn about it, or they hang
                    error = exc
            dist.broadcast(status, src=0)
            if status.item() != 1.0:
                if error is not None:
                    raise error
                raise RuntimeError("LSOR SOM initialisation failed on rank 0 (see its log)")
            dist.broadcast(packed, src=0)
            G, dG = packed[:n_nodes], packed[n_nodes:]
        else:
            G, dG = self._init_from_rows(rows)
        self._assign_som(G, dG)

    @torch.no_grad()
    def _assign_som(self, G: Tensor, dG: Tensor) -> None:
        # G is a parameter written outside the optimizer. Engines whose optimizer keeps its own
        # copy of the parameters (DeepSpeed: fp32 master weights, ZeRO partitions) install a
        # `parameter_writer` that updates that copy too and resets G's optimizer moments;
        # a plain `.data.copy_` would be overwritten by the old master at the next step.
        writer = getattr(self, "parameter_writer", None)
        if writer is not None:
            writer(self.G, G)
        else:
            self.G.data.copy_(G.to(device=self.G.device, dtype=self.G.dtype))
        self.dG.copy_(dG.to(device=self.dG.device, dtype=self.dG.dtype))
        self.initialised.fill_(True)
        if self._previous_epoch_state is not None:
            # node movement is counted from the initialised grid, not from the random nodes
            self._previous_epoch_state = (self._previous_epoch_state[0],
                                          G.detach().to(self.G.device, torch.float64).clone())
