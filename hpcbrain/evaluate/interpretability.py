"""Is the SOM grid organised by brain age? LSOR's Fig. 2 and its distance correlations.

Each training scan is assigned to its best-matching grid node. Per node we take the mean age,
the mean ADAS-Cog and the share of scans from pMCI or AD subjects; the distance correlation
between the nodes' grid coordinates and those means says how smoothly the grid orders them
(LSOR reports dCor 0.92 with age on ADNI).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from hpcbrain.data.store import CohortStore
from hpcbrain.evaluate.dcor import distance_correlation

PROGRESSIVE_GROUPS = ("pMCI", "AD")


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
    means = np.full(n_nodes, np.nan)
    for node in range(n_nodes):
        member_values = values[(bmu == node) & np.isfinite(values)]
        if len(member_values):
            means[node] = member_values.mean()
    return means


def grid_dcor(node_means: np.ndarray, rows: int, cols: int) -> float:
    """dCor between (row, col) and the node means, over nodes that have a value."""
    coords = np.array([(k // cols, k % cols) for k in range(rows * cols)], dtype=float)
    keep = np.isfinite(node_means)
    if keep.sum() < 3:
        return float("nan")
    return distance_correlation(coords[keep], node_means[keep])


def evaluate_som(method, store: CohortStore, indices: np.ndarray,
                 figure_dir: Path | None = None) -> SomReport | None:
    """None for methods without a SOM grid."""
    if not hasattr(method, "bmu"):
        return None
    rows, cols = method.grid
    device = next(method.parameters()).device
    latents = encode_scans(method.encoder(), store, np.asarray(indices), device)
    bmu = method.bmu(latents.to(device)).cpu().numpy()
    meta = store.metadata.iloc[np.asarray(indices)]
    per_scan = {"age": meta["age"].to_numpy(dtype=float)}
    if "adas_cog" in meta:
        per_scan["adas_cog"] = meta["adas_cog"].to_numpy(dtype=float)
    if "group" in meta:
        per_scan["pmci_ad_percent"] = 100.0 * meta["group"].isin(PROGRESSIVE_GROUPS).to_numpy(float)
    node_means = {name: node_statistics(bmu, values, rows * cols)
                  for name, values in per_scan.items()}
    metrics = {f"som/dcor_{name}": grid_dcor(means, rows, cols)
               for name, means in node_means.items()}
    metrics["som/occupied_nodes"] = float(len(np.unique(bmu)))
    report = SomReport(metrics, {k: v.reshape(rows, cols) for k, v in node_means.items()})
    if figure_dir is not None:
        report.figures.append(plot_heatmaps(report, Path(figure_dir) / "som_heatmaps.png"))
    return report


TITLES = {"age": "mean age (years)", "adas_cog": "mean ADAS-Cog",
          "pmci_ad_percent": "% pMCI + AD"}


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
        ax.set_title(f"{TITLES.get(name, name)}\ndCor with grid = {dcor:.2f}", fontsize=9)
        ax.set_xticks(range(grid.shape[1]))
        ax.set_yticks(range(grid.shape[0]))
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
