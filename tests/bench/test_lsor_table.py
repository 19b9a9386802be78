"""bench/science/lsor_table.py --preset smoke: all six methods trained, evaluated on both tasks,
the table written with four metrics each and DeLong's p against LSOR."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from hpcbrain.config import PROJECT_ROOT

pytestmark = [pytest.mark.slow, pytest.mark.minutes]


def test_smoke_table_has_every_method_and_metric(make_store, tmp_path):
    groups = np.repeat(["sMCI", "pMCI", "NC", "AD"] * 5, 2)            # 20 subjects × 2 visits
    store = make_store(tmp_path, subjects=20, visits=2, size=16, columns={"group": groups})
    out = tmp_path / "table"
    proc = subprocess.run([sys.executable, "-m", "bench.science.lsor_table", "--preset", "smoke",
                           "--store", str(store), "--out", str(out)],
                          capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = json.loads((out / "table.json").read_text())
    # no synthetic truth in this store: the oracle row is skipped, the voxel row is not
    assert list(table["methods"]) == ["lsor", "ae", "vae", "simclr", "lssl", "lne",
                                      "raw voxels 8³"]
    for name, metrics in table["methods"].items():
        assert set(metrics) == {"bacc", "auc", "r2", "rmse"}, name
        assert all(set(v) == {"mean", "std"} for v in metrics.values()), name
        assert 0 <= metrics["auc"]["mean"] <= 1 and metrics["rmse"]["mean"] > 0, name
    # the linear probe's row of each method, from the same folds
    assert list(table["linear_probe"]) == list(table["methods"])
    assert all(set(m) == {"bacc", "auc", "r2", "rmse"} for m in table["linear_probe"].values())
    others = {"ae", "vae", "simclr", "lssl", "lne", "raw voxels 8³"}
    assert set(table["delong_vs_lsor"]) == others == set(table["lsor_minus"])
    assert all(0 <= p <= 1 for p in table["delong_vs_lsor"].values())
    for row in table["lsor_minus"].values():
        for key in ("bacc", "r2"):
            assert row[key]["low"] <= row[key]["high"]
    text = (out / "table.md").read_text()
    assert text.count("| lne |") == 3          # MLP table, linear-probe table, LSOR minus lne
