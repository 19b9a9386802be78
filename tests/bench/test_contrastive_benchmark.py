"""The contrastive benchmark's scoring (bench/science/contrastive_table.py) on a tiny cohort:
its baselines against hand formulas, the density bins, the paired intervals."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]


def load_table_module():
    from bench.science import contrastive_table  # the project root is on pytest's path

    return contrastive_table


def test_density_classes_hand_case():
    table = load_table_module()
    # 5-year bins from 60: [60,65) 4 scans, [65,70) 0, [70,75) 1, [75,80) 0, [80,85] 3;
    # median of the non-empty counts (4, 1, 3) is 3: only the scan at 70 is in a sparse bin
    ages = np.array([60, 61, 62, 63, 70, 80, 81, 82], dtype=float)
    assert table.density_classes(ages).tolist() == ["dense"] * 4 + ["sparse"] + ["dense"] * 3


def test_bootstrap_interval_brackets_the_mean_and_collapses_on_constants():
    table = load_table_module()
    assert table.bootstrap_interval(np.full(6, -0.5)) == (-0.5, -0.5)
    values = np.array([-1.0, -0.2, 0.1, -0.6, -0.4])
    lo, hi = table.bootstrap_interval(values)
    assert lo < values.mean() < hi and lo >= values.min() and hi <= values.max()


def test_summary_claims_an_ordering_only_when_the_interval_excludes_zero():
    table = load_table_module()
    ages = np.linspace(60, 90, 10)
    rows = []
    for fold in range(5):
        for method, mae in (("constant", 9.0), ("exponential", 5.0), ("adapn", 4.0 + 0.1 * fold),
                            ("simclr", 5.0 + (-1) ** fold)):
            rows.append({"method": method, "features": "-" if method == "constant" else "backbone",
                         "fold": fold, "seed": 0, "mae": mae, "test": [fold], "errors": [mae]})
    text, summary = table.summarise(rows, ages)
    assert summary["adapn / backbone"]["delta_hi"] < 0                 # always 0.6–1.0 better
    assert "(better)" in next(line for line in text.splitlines() if line.startswith("| adapn"))
    simclr = summary["simclr / backbone"]
    assert simclr["delta_lo"] < 0 < simclr["delta_hi"]                 # ±1: not resolved
    assert summary["adapn / backbone"]["mae_mean"] == pytest.approx(4.2)
    assert "× constant" in text and "0.47" in text                     # 4.2 / 9
    few = [r for r in rows if r["fold"] < 3]                            # 3 paired runs only
    assert "(3 runs: no claim)" in table.summarise(few, ages)[0]


@pytest.mark.slow
@pytest.mark.minutes
def test_baselines_and_a_trained_loss_on_a_tiny_cohort(age_contrast_store, tmp_path):
    from hpcbrain.data.store import CohortStore
    from hpcbrain.job import build_datasets

    table = load_table_module()
    # NNCLR: its queue is capped to the tiny training set when it trains, and scoring must
    # rebuild it with that cap (the run's saved config), not the config file's 1,024
    preset = table.Preset(subjects=8, folds=2, seeds=[0], methods=["exponential", "nnclr"],
                          configs=[],
                          input_size=16, overrides=[
                              "model.resnet_width=2", "model.projection_dim=8",
                              "train.epochs=1", "train.batch_size=4", "data.num_workers=0",
                              "train.precision=fp32", "train.num_threads=1"])
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    configs = [table.run_config(preset, method, age_contrast_store, fold, 0, tmp_path, uri)
               for method in preset.methods for fold in range(2)]
    table.train_all(configs, use_slurm=False)
    assert all(table.is_complete(cfg) for cfg in configs)
    rows = table.score(preset, age_contrast_store, tmp_path, uri)
    kinds = {(r["method"], r["features"]) for r in rows}
    assert kinds == {("constant", "-"), ("ridge on raw voxels", "-"),
                     ("untrained encoder", "backbone"), ("untrained encoder", "projection"),
                     ("exponential", "backbone"), ("exponential", "projection"),
                     ("nnclr", "backbone"), ("nnclr", "projection")}
    store = CohortStore(age_contrast_store)
    ages = np.asarray(store.column("age"), dtype=float)
    for fold in range(2):
        split, _, _ = build_datasets(configs[fold], store, "scans")
        constant = next(r for r in rows if r["method"] == "constant" and r["fold"] == fold)
        assert constant["test"] == split.test.tolist()
        expected = np.abs(ages[split.test] - ages[split.train].mean()).mean()
        assert constant["mae"] == pytest.approx(expected)
        # the tiny cohort's contrast grows linearly with age: raw voxels nearly solve it
        raw = next(r for r in rows if r["method"] == "ridge on raw voxels" and r["fold"] == fold)
        assert raw["mae"] < constant["mae"] / 3
    text, summary = table.summarise(rows, ages)
    assert summary["exponential / projection"]["runs"] == 2
    assert "| constant | - | 2 |" in text
