"""Is the SOM grid organised by brain age? LSOR's Fig. 2 and its distance correlations.

Each scan is assigned to its best-matching grid node. Per node we take the mean age, the mean
ADAS-Cog, the share of scans from pMCI or AD subjects and, on synthetic cohorts, the mean true
brain age; the distance correlation between the nodes' grid coordinates and those means says how
smoothly the grid orders them (LSOR reports dCor 0.92 with age on ADNI). Each dCor comes with
the number of occupied nodes and a permutation p-value, since dCor over few nodes is high by
chance.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from hpcbrain.data.store import CohortStore
from hpcbrain.evaluate.dcor import distance_correlation
from hpcbrain.evaluate.truth import synthetic_brain_age

PROGRESSIVE_GROUPS = ("pMCI", "AD")
PERMUTATIONS = 1000


@dataclass
class SomReport:
    metrics: dict[str, float]
    node_means: dict[str, np.ndarray]          # name -> (rows, cols), NaN for empty nodes
    figures: list[Path] = field(default_factory=list)


@torch.no_grad()
def encode_scans(encoder: torch.nn.Module, store: CohortStore, indices: np.ndarray,
                 device: torch.device, batch_size: int = 16) -> torch.Tensor:
    was_training = encoder.training
    encoder.eval()
    latents = []
    for start in range(0, len(indices), batch_size):
        chunk = indices[start:start + batch_size]
        x = torch.from_numpy(np.stack([store.read_image(i) for i in chunk]))[:, None]
        latents.append(encoder(x.to(device)).float().cpu())
    encoder.train(was_training)
    return torch.cat(latents)


def node_statistics(bmu: np.ndarray, values: np.ndarray, n_nodes: int) -> np.ndarray:
    """Mean of `values` per node (NaN where a node has no scan or only NaN values)."""
    bmu = np.asarray(bmu)
    values = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(values)
    counts = np.bincount(bmu[finite], minlength=n_nodes).astype(np.float64)
    sums = np.bincount(bmu[finite], weights=values[finite], minlength=n_nodes)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def grid_dcor(node_means: np.ndarray, rows: int, cols: int) -> float:
    """dCor between (row, col) and the node means, over nodes that have a value."""
    coords = np.array([(k // cols, k % cols) for k in range(rows * cols)], dtype=float)
    keep = np.isfinite(node_means)
    if keep.sum() < 3:
        return float("nan")
    return distance_correlation(coords[keep], node_means[keep])


def grid_dcor_test(bmu: np.ndarray, values: np.ndarray, rows: int, cols: int,
                   n_permutations: int = PERMUTATIONS, seed: int = 0) -> tuple[float, float]:
    """dCor(grid, node means) and its permutation p-value.

    The null shuffles the node labels over the scans (occupancy kept, any link between a scan's
    node and its value broken) and recomputes the node means and dCor;
    p = (1 + #{null dCor >= observed}) / (1 + n_permutations). dCor over a few occupied nodes is
    high by chance (7 random nodes average 0.64): p says whether the grid beats that."""
    bmu = np.asarray(bmu)
    values = np.asarray(values, dtype=np.float64)
    keep = np.isfinite(values)
    bmu, values = bmu[keep], values[keep]
    n_nodes = rows * cols
    observed = grid_dcor(node_statistics(bmu, values, n_nodes), rows, cols)
    if not np.isfinite(observed):
        return observed, float("nan")
    rng = np.random.default_rng(seed)
    exceed = 0
    for _ in range(n_permutations):
        null = grid_dcor(node_statistics(rng.permutation(bmu), values, n_nodes), rows, cols)
        exceed += bool(null >= observed - 1e-12)
    return observed, (1 + exceed) / (1 + n_permutations)


def scan_values(store: CohortStore, indices: np.ndarray) -> dict[str, np.ndarray]:
    """The per-scan quantities the grid is scored against: age, and where the cohort has them
    ADAS-Cog, % pMCI+AD (of the subject's group) and the true brain age (synthetic cohorts)."""
    meta = store.metadata.iloc[np.asarray(indices)]
    values = {"age": meta["age"].to_numpy(dtype=float)}
    if "adas_cog" in meta:
        values["adas_cog"] = meta["adas_cog"].to_numpy(dtype=float)
    if "group" in meta:
        values["pmci_ad_percent"] = 100.0 * meta["group"].isin(PROGRESSIVE_GROUPS).to_numpy(float)
    brain_age = synthetic_brain_age(store, indices)
    if brain_age is not None:
        values["brain_age"] = brain_age
    return values


def score_grid(bmu: np.ndarray, values: dict[str, np.ndarray], rows: int, cols: int,
               n_permutations: int = PERMUTATIONS, seed: int = 0) -> dict[str, float]:
    """`som/occupied_nodes`, and per quantity `som/dcor_<name>` with `som/dcor_<name>_p`."""
    metrics = {"som/occupied_nodes": float(len(np.unique(bmu)))}
    for name, per_scan in values.items():
        dcor, p = grid_dcor_test(bmu, per_scan, rows, cols, n_permutations, seed)
        metrics[f"som/dcor_{name}"] = dcor
        metrics[f"som/dcor_{name}_p"] = p
    return metrics


def evaluate_som(method, store: CohortStore, indices: np.ndarray,
                 figure_dir: Path | None = None) -> SomReport | None:
    """Grid quality over the scans `indices` (encoded in eval mode, as `hpcbrain embed` does);
    with `figure_dir`, LSOR's Figures 2-4 too. None for methods without a SOM grid."""
    if not method.som_evaluation:
        return None
    rows, cols = method.grid
    indices = np.asarray(indices)
    device = next(method.parameters()).device
    latents = encode_scans(method.encoder(), store, indices, device)
    bmu = method.bmu(latents.to(device)).cpu().numpy()
    per_scan = scan_values(store, indices)
    metrics = score_grid(bmu, per_scan, rows, cols)
    node_means = {name: node_statistics(bmu, values, rows * cols).reshape(rows, cols)
                  for name, values in per_scan.items()}
    report = SomReport(metrics, node_means)
    if figure_dir is not None:
        from hpcbrain.evaluate import som_figures

        figure_dir = Path(figure_dir)
        report.figures.append(plot_heatmaps(report, figure_dir / "fig2_som_heatmaps.png"))
        report.figures.extend(som_figures.paper_figures(method, store, indices, latents, bmu,
                                                        per_scan, figure_dir))
    return report


TITLES = {"age": "mean age (years)", "adas_cog": "mean ADAS-Cog",
          "pmci_ad_percent": "% pMCI + AD", "brain_age": "mean true brain age (years)"}


def plot_heatmaps(report: SomReport, path: Path) -> Path:
    """One heatmap per node statistic, as in LSOR's Fig. 2."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report.node_means)
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 2.8), squeeze=False)
    for ax, name in zip(axes[0], names):
        grid = report.node_means[name]
        image = ax.imshow(np.ma.masked_invalid(grid), cmap="viridis")
        dcor = report.metrics.get(f"som/dcor_{name}", float("nan"))
        p = report.metrics.get(f"som/dcor_{name}_p", float("nan"))
        ax.set_title(f"{TITLES.get(name, name)}\ndCor with grid = {dcor:.2f} (p = {p:.3g})",
                     fontsize=9)
        ax.set_xticks(range(grid.shape[1]))
        ax.set_yticks(range(grid.shape[0]))
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
