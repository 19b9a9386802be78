"""Where LSOR's SOM phase starts: the grid G from the latents of all training scans, and ΔG.

* `kmeans_grid_init` (``lsor.init: kmeans``, the paper and the official code): k-means with
  K = Nr·Nc, centroids placed on the grid so that grid neighbours are latent neighbours
  (`reorder_to_grid`).
* `pca_grid_init` (``lsor.init: pca``): Kohonen's linear initialisation — the nodes on a
  regular Nr×Nc lattice in the plane of the latents' first two principal components, centred
  on their mean, the grid's long side along the first component; each axis spans ±√3 standard
  deviations (the range of a uniform distribution of that variance). The grid's orientation is
  then fixed by the data's main direction of variation instead of by which k-means
  centroids happen to be neighbours.
* `init_reference_trajectories`: ΔG, the mean Δz of the pairs whose z_u falls in each node.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from hpcbrain.methods.som import squared_distances

__all__ = ["grid_neighbour_cost", "reorder_to_grid", "kmeans_grid_init", "pca_grid_init",
           "init_reference_trajectories"]


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


def pca_grid_init(latents: Tensor, grid: tuple[int, int], first_axis: Tensor | None = None) -> Tensor:
    """Nodes [Nr·Nc, D] (float32, row-major, CPU) on a plane through the mean of ``latents``
    [N, D]: node (r, c) = mean + a_c·s1·v1 + b_r·s2·v2, a and b evenly spaced on [−√3, √3],
    s1, s2 the standard deviations of the latents along v1, v2, columns along v1 when Nc ≥ Nr
    (else rows).

    Without ``first_axis`` v1, v2 are the first two principal components, signs following
    their largest-magnitude coordinate (deterministic). With ``first_axis`` [D] (``lsor.init:
    longitudinal``: the mean Δz of the training pairs) v1 is that direction, kept in its sign
    so the long side runs young → old, and v2 the first principal component of what is left
    after removing v1."""
    x = _as_numpy(latents)
    if x.ndim != 2 or x.shape[0] < 3:
        raise ValueError(f"pca_grid_init: need latents [N ≥ 3, D], got shape {x.shape}")
    n_rows, n_cols = int(grid[0]), int(grid[1])
    mean = x.mean(axis=0)
    centred = x - mean
    if first_axis is None:
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        axes = vt[:2] * np.sign(vt[:2][np.arange(2), np.abs(vt[:2]).argmax(axis=1)])[:, None]
    else:
        v1 = _as_numpy(first_axis).reshape(-1)
        norm = np.linalg.norm(v1)
        if v1.shape[0] != x.shape[1] or not np.isfinite(norm) or norm == 0:
            raise ValueError("pca_grid_init: first_axis must be a finite non-zero vector of the "
                             f"latent size {x.shape[1]}")
        v1 = v1 / norm
        rest = centred - np.outer(centred @ v1, v1)
        _, _, vt = np.linalg.svd(rest, full_matrices=False)
        v2 = vt[0] * np.sign(vt[0][np.abs(vt[0]).argmax()])
        axes = np.stack([v1, v2])
    std = (centred @ axes.T).std(axis=0, ddof=1)
    long_side, short_side = (n_cols, n_rows) if n_cols >= n_rows else (n_rows, n_cols)
    along = np.linspace(-np.sqrt(3), np.sqrt(3), long_side) * std[0]
    across = np.linspace(-np.sqrt(3), np.sqrt(3), short_side) * std[1] if short_side > 1 \
        else np.zeros(1)
    nodes = np.empty((n_rows, n_cols, x.shape[1]))
    for r in range(n_rows):
        for c in range(n_cols):
            i, j = (c, r) if n_cols >= n_rows else (r, c)     # (long index, short index)
            nodes[r, c] = mean + along[i] * axes[0] + across[j] * axes[1]
    return torch.from_numpy(nodes.reshape(n_rows * n_cols, -1)).to(torch.float32)


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


