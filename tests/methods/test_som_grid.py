"""LSOR's grid sized to the cohort (`lsor.grid_rows/grid_cols: auto`): the rule's choices
pinned, the config's checks, and the warning for an explicit grid too large for the cohort."""
from __future__ import annotations

import pytest
from conftest import tiny_config

from hpcbrain.config import ConfigError
from hpcbrain.methods.base import TrainingSetSize
from hpcbrain.methods.lsor import LSOR
from hpcbrain.methods.som_grid import auto_grid, subjects_per_node


@pytest.mark.parametrize("subjects, grid", [
    (5, (2, 4)), (12, (2, 4)), (17, (2, 4)), (26, (2, 4)), (27, (3, 6)), (34, (3, 6)),
    (47, (3, 6)), (48, (4, 8)), (51, (4, 8)), (68, (4, 8)), (136, (4, 8)), (600, (4, 8)),
    (4000, (4, 8))])
def test_the_rule_keeps_1_5_subjects_a_node_the_1_to_2_aspect_and_the_papers_4x8(subjects, grid):
    """Training subjects: 17, 34, 51, 68 = cohorts of 20, 40, 60, 80 less demo.yaml's
    validation share (0.15), the four sizes the rule was measured on; 68 (the demo's) keeps the
    paper's 4 × 8."""
    assert auto_grid(subjects) == grid
    assert grid[1] == 2 * grid[0]
    if subjects >= 12:                     # the smallest grid is the floor below 12 subjects
        assert subjects_per_node(subjects, grid) >= 1.5


def test_auto_is_resolved_from_the_training_subjects_and_explicit_grids_warn(caplog):
    cfg = tiny_config("lsor.yaml", **{"data.input_size": 16})
    assert (cfg.lsor.grid_rows, cfg.lsor.grid_cols) == ("auto", "auto")
    with pytest.raises(ValueError, match="still 'auto'"):
        LSOR.from_config(cfg)
    LSOR.resolve_config(cfg.lsor, TrainingSetSize(items=300, scans=150, subjects=40))
    assert (cfg.lsor.grid_rows, cfg.lsor.grid_cols) == (3, 6)        # 2.2 subjects a node
    explicit = tiny_config("lsor.yaml", **{"lsor.grid_rows": 4, "lsor.grid_cols": 8})
    with caplog.at_level("WARNING", logger="hpcbrain.methods.lsor"):
        LSOR.resolve_config(explicit.lsor, TrainingSetSize(items=300, scans=150, subjects=40))
    assert (explicit.lsor.grid_rows, explicit.lsor.grid_cols) == (4, 8)   # the user's wins
    assert "1.2 training subjects a node (fewer than 1.5)" in caplog.text
    assert "would give 3 × 6" in caplog.text


@pytest.mark.parametrize("rows, cols", [("auto", 8), (4, "auto"), (0, 8), ("big", "auto")])
def test_a_half_auto_or_bad_grid_is_refused_naming_the_key(rows, cols):
    with pytest.raises(ConfigError, match="lsor.grid_"):
        tiny_config("lsor.yaml", **{"lsor.grid_rows": rows, "lsor.grid_cols": cols})
