"""The BIDS-App group level's SOM outputs, true to the model's grid: the grid shape comes from the
participant files (`som_rows`, `som_cols`, written from the model's `som.npz`), never from the
nodes the scans happen to occupy.

    group/somnode_counts.tsv        scans per node, the model's rows × cols
    group/somnodes.png              the same as a picture
    group/som_trajectories.tsv      each participant's nodes in visit order
    group/som_trajectories.png      those paths on the grid (LSOR's Fig. 4 idea), coloured by age
    group/som_similarity_by_age.png mean similarity ρ to every node per age bin (LSOR's Fig. 3),
                                    when the scans' ages are known
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hpcbrain.atomic import atomic_write

__all__ = ["NodeRow", "grid_shape", "som_group_outputs", "save_figure", "write_table"]


@dataclass(frozen=True)
class NodeRow:
    """One scan's row of the participant level's _somnode.tsv."""

    participant: str
    session: str
    row: int
    col: int
    age: float | None
    similarity: np.ndarray | None      # [rows, cols], from its _similarity.tsv when present


def grid_shape(rows: list[NodeRow], shapes: set[tuple[int, int]]) -> tuple[int, int]:
    """The one grid shape the participant files record; ValueError when they record none (files
    of an older hpcbrain) or several (two models' outputs in one folder)."""
    if not shapes:
        raise ValueError("the _somnode.tsv files record no grid shape (som_rows, som_cols): "
                         "they were written by an older hpcbrain; run the participant level "
                         "again")
    if len(shapes) > 1:
        raise ValueError(f"the _somnode.tsv files record several grid shapes {sorted(shapes)}: "
                         f"one model's outputs per folder")
    (shape,) = shapes
    outside = [r for r in rows if not (0 <= r.row < shape[0] and 0 <= r.col < shape[1])]
    if outside:
        raise ValueError(f"{outside[0].participant} {outside[0].session}: node "
                         f"({outside[0].row}, {outside[0].col}) lies outside the {shape[0]} × "
                         f"{shape[1]} grid")
    return shape


def _visit_order(visits: list[NodeRow]) -> list[NodeRow]:
    """By age when every visit has one, else by session label."""
    if all(v.age is not None for v in visits):
        return sorted(visits, key=lambda v: (v.age, v.session))
    return sorted(visits, key=lambda v: v.session)


def write_table(path: Path, header: list[str], rows: list[list]) -> Path:
    """A group-level TSV, written atomically (the BIDS-App's group tables use it too)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "w", what="a group table") as handle:
        handle.write("\t".join(header) + "\n")
        handle.writelines("\t".join(str(c) for c in row) + "\n" for row in rows)
    return path


def save_figure(figure, path: Path, plt) -> Path:
    """A group-level figure as PNG, then closed (the BIDS-App's brain-age figures use it too)."""
    figure.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(figure)
    return path


def som_group_outputs(rows: list[NodeRow], shape: tuple[int, int], group: Path,
                      plt) -> list[Path]:
    """Every file of the module doc that the rows allow; the paths written."""
    n_rows, n_cols = shape
    counts = np.zeros(shape, dtype=np.int64)
    for r in rows:
        counts[r.row, r.col] += 1
    written = [write_table(group / "somnode_counts.tsv", [f"col{c}" for c in range(n_cols)],
                          counts.tolist())]
    aspect = max(2.5, 6 * n_rows / max(n_cols, 1))
    figure, axis = plt.subplots(figsize=(6, aspect))
    image = axis.imshow(counts, cmap="viridis", vmin=0)
    axis.set_title(f"scans per SOM node ({n_rows} × {n_cols} grid, {len(rows)} scans)")
    axis.set_xticks(range(n_cols))
    axis.set_yticks(range(n_rows))
    figure.colorbar(image, ax=axis)
    written.append(save_figure(figure, group / "somnodes.png", plt))

    by_participant: dict[str, list[NodeRow]] = {}
    for r in rows:
        by_participant.setdefault(r.participant, []).append(r)
    paths = {p: _visit_order(v) for p, v in sorted(by_participant.items())}
    written.append(write_table(
        group / "som_trajectories.tsv", ["participant_id", "visits", "nodes", "ages"],
        [[p, len(v), " → ".join(f"({x.row},{x.col})" for x in v),
          ", ".join("n/a" if x.age is None else f"{x.age:g}" for x in v)]
         for p, v in paths.items()]))
    written.append(_trajectory_figure(paths, counts, group, plt))
    aged = [r for r in rows if r.age is not None and r.similarity is not None]
    if len(aged) >= 2:
        written.append(_similarity_by_age(aged, shape, group, plt))
    return written


def _trajectory_figure(paths: dict[str, list[NodeRow]], counts: np.ndarray, group: Path,
                       plt) -> Path:
    """Each participant's visits joined in order on the grid; points coloured by age (by visit
    number when ages are unknown); a small offset per participant keeps shared nodes apart."""
    n_rows, n_cols = counts.shape
    figure, axis = plt.subplots(figsize=(max(6, 0.8 * n_cols + 2), max(3, 0.8 * n_rows + 1)))
    axis.imshow(counts, cmap="Greys", alpha=0.35, vmin=0)
    ages = [v.age for visits in paths.values() for v in visits if v.age is not None]
    colour_by_age = len(ages) == sum(len(v) for v in paths.values()) and ages
    low, high = (min(ages), max(ages)) if colour_by_age else (0, 1)
    cmap = plt.get_cmap("viridis")
    rng = np.random.default_rng(0)
    for visits in paths.values():
        dx, dy = rng.uniform(-0.25, 0.25, 2)
        xs = [v.col + dx for v in visits]
        ys = [v.row + dy for v in visits]
        axis.plot(xs, ys, "-", color="0.4", lw=0.8, alpha=0.8)
        for k, (x, y, visit) in enumerate(zip(xs, ys, visits)):
            value = visit.age if colour_by_age else k / max(len(visits) - 1, 1)
            axis.plot(x, y, "o", ms=4, color=cmap((value - low) / max(high - low, 1e-9)))
    axis.set_xlim(-0.5, n_cols - 0.5)
    axis.set_ylim(n_rows - 0.5, -0.5)
    axis.set_xticks(range(n_cols))
    axis.set_yticks(range(n_rows))
    axis.set_title(f"{len(paths)} participants' visits on the {n_rows} × {n_cols} grid, "
                   + ("coloured by age" if colour_by_age else "coloured by visit order"))
    mappable = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(low, high))
    figure.colorbar(mappable, ax=axis, label="age (years)" if colour_by_age else "visit order")
    return save_figure(figure, group / "som_trajectories.png", plt)


def _similarity_by_age(rows: list[NodeRow], shape: tuple[int, int], group: Path, plt) -> Path:
    """Mean similarity grid per age bin (up to four bins of equal scan counts)."""
    ages = np.array([r.age for r in rows])
    bins = min(4, len(np.unique(ages)))
    edges = np.unique(np.quantile(ages, np.linspace(0, 1, bins + 1)))
    which = np.clip(np.searchsorted(edges, ages, side="right") - 1, 0, len(edges) - 2)
    figure, axes = plt.subplots(1, len(edges) - 1, figsize=(3.2 * (len(edges) - 1), 2.8),
                                squeeze=False)
    for b, axis in enumerate(axes[0]):
        members = [r.similarity for r, w in zip(rows, which) if w == b]
        mean = np.mean(members, axis=0) if members else np.full(shape, np.nan)
        axis.imshow(mean, cmap="viridis")
        axis.set_title(f"age {edges[b]:.0f}–{edges[b + 1]:.0f} ({len(members)} scans)",
                       fontsize=9)
        axis.set_xticks([])
        axis.set_yticks([])
    figure.suptitle("mean similarity ρ to every node, by age")
    return save_figure(figure, group / "som_similarity_by_age.png", plt)
