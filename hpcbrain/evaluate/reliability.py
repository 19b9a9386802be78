"""Test–retest reliability: the same visit scanned again should get the same answer.

* `icc_2_1`: ICC(2,1) of Shrout & Fleiss (1979) — two-way random effects, absolute agreement,
  one measurement: the share of a measure's variance that is between visits, with the runs
  (rescans) as a random rater effect. What the field reports for brain age (Dörfel et al. 2023:
  0.94–0.98 for pyment and brainageR).
* `node_agreement`: for an LSOR grid, how often the rescans of one visit land in the same SOM
  node, or in the same or a grid-neighbouring one (Manhattan distance ≤ 1).
* `visits_of`: which scans are runs of one visit, from their BIDS file names.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from hpcbrain.data.bids_filter import entities

__all__ = ["icc_2_1", "node_agreement", "visits_of", "runs_table"]


def icc_2_1(values: np.ndarray) -> float:
    """ICC(2,1) of an [n targets, k raters] table (no missing cells; n ≥ 2, k ≥ 2)."""
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2 or x.shape[1] < 2 or not np.isfinite(x).all():
        raise ValueError(f"ICC needs a complete [targets, raters] table with at least 2 of "
                         f"each, got shape {x.shape}")
    n, k = x.shape
    grand = x.mean()
    ms_rows = k * np.sum((x.mean(axis=1) - grand) ** 2) / (n - 1)
    ms_cols = n * np.sum((x.mean(axis=0) - grand) ** 2) / (k - 1)
    residual = x - x.mean(axis=1, keepdims=True) - x.mean(axis=0, keepdims=True) + grand
    ms_error = np.sum(residual ** 2) / ((n - 1) * (k - 1))
    return float((ms_rows - ms_error)
                 / (ms_rows + (k - 1) * ms_error + k * (ms_cols - ms_error) / n))


def visits_of(paths: Sequence[str | Path]) -> tuple[list[tuple[str, str]], list[int]]:
    """(visit key (sub, ses), run number) per scan from its BIDS entities; a scan without a run
    entity is run 1."""
    keys, runs = [], []
    for path in paths:
        labels = entities(path)
        if "sub" not in labels:
            raise ValueError(f"{path}: no sub- entity in its name; cannot tell its visit")
        keys.append((labels["sub"], labels.get("ses", "01")))
        runs.append(int(labels.get("run", "1")))
    return keys, runs


def runs_table(paths: Sequence[str | Path], values: np.ndarray) -> np.ndarray:
    """[visits, runs] table of `values` (one per scan) for the visits scanned in every run."""
    keys, runs = visits_of(paths)
    all_runs = sorted(set(runs))
    cells: dict[tuple, dict[int, float]] = {}
    for key, run, value in zip(keys, runs, np.asarray(values)):
        cells.setdefault(key, {})[run] = value
    complete = [key for key in cells if len(cells[key]) == len(all_runs)]
    return np.array([[cells[key][r] for r in all_runs] for key in complete])


def node_agreement(paths: Sequence[str | Path], rows: np.ndarray, cols: np.ndarray
                   ) -> dict[str, float]:
    """Over every pair of runs of one visit: the share in the same node and the share within
    grid distance 1 (same or neighbouring node), and the number of pairs."""
    nodes = np.stack([np.asarray(rows), np.asarray(cols)], axis=1)
    keys, _ = visits_of(paths)
    by_visit: dict[tuple, list[int]] = {}
    for i, key in enumerate(keys):
        by_visit.setdefault(key, []).append(i)
    distances = [int(np.abs(nodes[a] - nodes[b]).sum())
                 for members in by_visit.values()
                 for j, a in enumerate(members) for b in members[j + 1:]]
    if not distances:
        raise ValueError("node agreement needs visits scanned more than once (rescans)")
    d = np.asarray(distances)
    return {"same_node": float(np.mean(d == 0)), "same_or_neighbour": float(np.mean(d <= 1)),
            "pairs": float(d.size)}
