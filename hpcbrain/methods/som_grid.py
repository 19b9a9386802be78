"""How big LSOR's SOM grid is when the config says `auto`: sized to the training subjects.

A node's mean age is the mean of the scans mapped to it, so with too few subjects behind a node
it carries those subjects' brain-age gaps rather than the age the grid should order
(docs/lsor-decisions.md, "Subjects per node": 4 × 8 on cohorts of 40 subjects — 34 training
subjects, 1.1 a node — fell to dCor(grid, age) 0.60 on an unseen cohort and 0.77 on two seeds;
on cohorts of 80 — 68 training subjects, 2.1 a node — it held on all five). The rule: the
paper's 1 : 2 aspect, the largest grid with at least `MIN_SUBJECTS_PER_NODE` training subjects a
node, between 2 × 4 and the paper's 4 × 8 (its grid for ~600 ADNI subjects; a larger cohort
keeps it: more subjects a node only steadies the node means). The demo's 68 training subjects
keep 4 × 8.
"""
from __future__ import annotations

import math

__all__ = ["MIN_SUBJECTS_PER_NODE", "SMALLEST", "LARGEST", "auto_grid", "subjects_per_node"]

MIN_SUBJECTS_PER_NODE = 2.0
SMALLEST = (2, 4)
LARGEST = (4, 8)


def auto_grid(n_subjects: int) -> tuple[int, int]:
    """(rows, cols) for `n_subjects` training subjects: rows × 2·rows nodes, each with at
    least MIN_SUBJECTS_PER_NODE subjects, within SMALLEST … LARGEST."""
    rows = math.floor(math.sqrt(max(int(n_subjects), 0) / (2 * MIN_SUBJECTS_PER_NODE)))
    rows = min(max(rows, SMALLEST[0]), LARGEST[0])
    return rows, 2 * rows


def subjects_per_node(n_subjects: int, grid: tuple[int, int]) -> float:
    return int(n_subjects) / (grid[0] * grid[1])
