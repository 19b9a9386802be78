"""How big LSOR's SOM grid is when the config says `auto`: sized to the training subjects.

A node's mean age is the mean of the scans mapped to it, so with too few subjects behind a node
it carries those subjects' brain-age gaps rather than the age the grid should order
(docs/lsor-decisions.md, "Subjects per node" and "A grid sized to the cohort"). Measured with
the demo's settings on cohorts used in no other decision: 4 × 8 at 1.1 training subjects a node
(34 subjects) fell to dCor(grid, age) 0.60 / 0.77; it held at 1.6 (51, two seeds) and 2.1
(68, five seeds); 3 × 6 held at 1.9 (34, three seeds). The rule: the paper's 1 : 2 aspect, the
largest grid with at least `MIN_SUBJECTS_PER_NODE` (1.5) training subjects a node, between
2 × 4 and the paper's 4 × 8 (its grid for ~600 ADNI subjects; a larger cohort keeps it: more
subjects a node only steadies the node means): 2 × 4 below 27 training subjects, 3 × 6 from
27, 4 × 8 from 48. The demo's 68 training subjects keep 4 × 8.
"""
from __future__ import annotations

import math

__all__ = ["MIN_SUBJECTS_PER_NODE", "SMALLEST", "LARGEST", "auto_grid", "subjects_per_node"]

MIN_SUBJECTS_PER_NODE = 1.5
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
