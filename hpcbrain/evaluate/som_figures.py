"""LSOR's paper figures, drawn from a trained model and a cohort store.

* Fig. 2 (d) / S1 -- ``fig2d_node_images.png``: per grid node, the mean of the 20 scans nearest
  to it in latent space, in three views (axial, coronal, sagittal), for every grid row;
* Fig. 3 -- ``fig3_similarity_by_age_and_group.png``: the mean similarity grid ρ of the scans of
  each age bin × diagnostic group;
* Fig. 4 -- ``fig4_latent_pca.png``: the latents in their first two principal components, each
  subject's consecutive visits joined by its Δz arrow, the SOM grid (nodes and grid edges) and
  the reference trajectories ΔG drawn from their nodes.

The Fig. 2 (a)-(c) heatmaps live in `interpretability.plot_heatmaps`.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from hpcbrain.data.store import CohortStore

NEAREST_SCANS = 20
AGE_BINS = 4


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def nearest_scans_per_node(latents: np.ndarray, nodes: np.ndarray, k: int) -> np.ndarray:
    """[K, min(k, N)] positions of the k latents nearest to each node (closest first)."""
    d = ((latents[None, :, :] - nodes[:, None, :]) ** 2).sum(-1)
    return np.argsort(d, axis=1, kind="stable")[:, :min(k, latents.shape[0])]


def plot_node_images(store: CohortStore, indices: np.ndarray, latents: np.ndarray,
                     nodes: np.ndarray, grid: tuple[int, int], path: Path) -> Path:
    rows, cols = grid
    nearest = nearest_scans_per_node(latents, nodes, NEAREST_SCANS)
    cache: dict[int, np.ndarray] = {}

    def image(position: int) -> np.ndarray:
        if position not in cache:
            cache[position] = np.asarray(store.read_image(int(indices[position])), np.float32)
        return cache[position]

    plt = _pyplot()
    views = ("axial", "coronal", "sagittal")
    fig, axes = plt.subplots(rows * len(views), cols, figsize=(1.3 * cols, 1.3 * rows * 3),
                             squeeze=False)
    for node in range(rows * cols):
        mean = np.mean([image(p) for p in nearest[node]], axis=0)
        centre = [s // 2 for s in mean.shape]
        slices = (mean[:, :, centre[2]], mean[:, centre[1], :], mean[centre[0], :, :])
        r, c = divmod(node, cols)
        for v, (view, section) in enumerate(zip(views, slices)):
            ax = axes[r * len(views) + v, c]
            ax.imshow(np.rot90(section), cmap="gray")
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(f"row {r}\n{view}", fontsize=6)
            if r == 0 and v == 0:
                ax.set_title(f"col {c}", fontsize=7)
    fig.suptitle(f"Mean of the {NEAREST_SCANS} scans nearest each SOM node (LSOR Fig. 2d / S1)",
                 fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def plot_similarity_by_age_and_group(similarity: np.ndarray, ages: np.ndarray,
                                     groups: np.ndarray, grid: tuple[int, int],
                                     path: Path) -> Path:
    rows, cols = grid
    edges = np.quantile(ages, np.linspace(0, 1, AGE_BINS + 1))
    bins = np.clip(np.searchsorted(edges, ages, side="right") - 1, 0, AGE_BINS - 1)
    names = [g for g in ("NC", "sMCI", "pMCI", "AD", "CN", "MCI") if g in set(groups)] \
        or sorted(set(groups))
    plt = _pyplot()
    fig, axes = plt.subplots(len(names), AGE_BINS, figsize=(2.6 * AGE_BINS, 1.5 * len(names)),
                             squeeze=False)
    vmax = float(similarity.max()) if similarity.size else 1.0
    for gi, group in enumerate(names):
        for b in range(AGE_BINS):
            ax = axes[gi, b]
            members = (groups == group) & (bins == b)
            ax.set_xticks([])
            ax.set_yticks([])
            if members.any():
                ax.imshow(similarity[members].mean(0).reshape(rows, cols), cmap="viridis",
                          vmin=0, vmax=vmax)
            ax.set_title(f"{group}, {edges[b]:.0f}-{edges[b + 1]:.0f} y (n={members.sum()})",
                         fontsize=7)
    fig.suptitle("Mean similarity grid ρ per age bin × group (LSOR Fig. 3)", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def consecutive_pairs(subjects: np.ndarray, ages: np.ndarray) -> list[tuple[int, int]]:
    """(earlier, later) positions of each subject's consecutive visits."""
    pairs = []
    for subject in np.unique(subjects):
        visits = np.flatnonzero(subjects == subject)
        visits = visits[np.argsort(ages[visits], kind="stable")]
        pairs.extend(zip(visits[:-1], visits[1:]))
    return pairs


def plot_latent_pca(latents: np.ndarray, ages: np.ndarray, subjects: np.ndarray,
                    nodes: np.ndarray, trajectories: np.ndarray, grid: tuple[int, int],
                    path: Path) -> Path:
    rows, cols = grid
    mean = latents.mean(0)
    _, _, vt = np.linalg.svd(latents - mean, full_matrices=False)
    axes2 = vt[:2].T
    points = (latents - mean) @ axes2
    node_points = (nodes - mean) @ axes2
    flow = trajectories @ axes2
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 6))
    scatter = ax.scatter(points[:, 0], points[:, 1], c=ages, cmap="viridis", s=10, zorder=2)
    for u, v in consecutive_pairs(subjects, ages):
        ax.annotate("", xy=points[v], xytext=points[u],
                    arrowprops=dict(arrowstyle="->", color="0.55", lw=0.6), zorder=1)
    for k in range(rows * cols):
        r, c = divmod(k, cols)
        for nb in ([k + 1] if c + 1 < cols else []) + ([k + cols] if r + 1 < rows else []):
            ax.plot(*zip(node_points[k], node_points[nb]), color="tab:red", lw=0.8, zorder=3)
    ax.scatter(node_points[:, 0], node_points[:, 1], color="tab:red", s=18, zorder=4,
               label="SOM nodes G")
    # ΔG is per year; scale so the longest arrow spans a tenth of the plot
    span = float(np.ptp(points, axis=0).max()) or 1.0
    longest = float(np.linalg.norm(flow, axis=1).max()) or 1.0
    scale = 0.1 * span / longest
    ax.quiver(node_points[:, 0], node_points[:, 1], flow[:, 0] * scale, flow[:, 1] * scale,
              color="black", angles="xy", scale_units="xy", scale=1, width=0.004, zorder=5,
              label="reference trajectories ΔG")
    fig.colorbar(scatter, ax=ax, label="age (years)")
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.legend(fontsize=8, loc="best")
    ax.set_title("Latents (arrows: Δz of consecutive visits), grid and ΔG (LSOR Fig. 4)",
                 fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


@torch.no_grad()
def paper_figures(method, store: CohortStore, indices: np.ndarray, latents: torch.Tensor,
                  bmu: np.ndarray, per_scan: dict[str, np.ndarray],
                  figure_dir: Path) -> list[Path]:
    """Figures 2 (d), 3 and 4 for a trained LSOR `method` over the scans `indices`."""
    grid = tuple(method.grid)
    nodes = method.nodes.detach().to("cpu", torch.float64).numpy()
    trajectories = method.dG.detach().to("cpu", torch.float64).numpy()
    z = latents.to(torch.float64).numpy()
    meta = store.metadata.iloc[np.asarray(indices)]
    ages = per_scan["age"]
    groups = (meta["group"] if "group" in meta else meta.get("diagnosis", None))
    groups = np.asarray(groups.astype(str)) if groups is not None else np.array(["all"] * len(z))
    similarity = method.similarity(latents.to(method.G.device)).cpu().numpy()
    figure_dir = Path(figure_dir)
    return [
        plot_node_images(store, indices, z, nodes, grid, figure_dir / "fig2d_node_images.png"),
        plot_similarity_by_age_and_group(similarity, ages, groups, grid,
                                         figure_dir / "fig3_similarity_by_age_and_group.png"),
        plot_latent_pca(z, ages, np.asarray(meta["subject"].astype(str)), nodes, trajectories,
                        grid, figure_dir / "fig4_latent_pca.png"),
    ]
