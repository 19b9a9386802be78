"""Does LSOR's grid organise by brain age on cohorts it was never tuned on? (issue: LSOR Fig. 2)

For each seed: a synthetic cohort (`hpcbrain synth`, the demo's size), its 32³ store, LSOR trained
with the demo's settings (configs/lsor.yaml + configs/demo.yaml), the registered encoder applied
to every scan's NIfTI file with `hpcbrain embed` (as a user would), and the grid scored from the
embed output alone: occupied nodes, dCor(grid, node mean age / true brain age) and their
permutation p-values (node labels shuffled over scans, 1000 times). Beside them the "oracle
grid": the same scores for scans binned by true brain age along the grid's long side, what a
perfect brain-age map would reach on that cohort.

    .venv/bin/python -m bench.science.lsor_grid_seeds --seeds 0 1 2 3 --out runs/bench/lsor-grid

Writes OUT/table.json and OUT/table.md and prints the table. Each seed takes ~5 minutes on a
2-core CPU; a seed whose result.json exists is not retrained.
"""
from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bench.common import ROOT

#: occupied: the share of the grid's nodes some scan maps to (28 of 4 × 8 before grids were
#: sized to the cohort; issue 28 asks ≥ 90 %)
TARGETS = {"occupied": 0.90, "dcor_age": 0.80, "dcor_brain_age": 0.90, "p": 0.01}


def run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def score_seed(seed: int, out: Path, subjects: int, extra: list[str],
               synth_args: list[str]) -> dict:
    from hpcbrain.data.store import CohortStore
    from hpcbrain.evaluate.interpretability import scan_values, score_grid

    venv = ROOT / ".venv" / "bin"
    folder = out / f"seed{seed}"
    bids, store = folder / "bids", folder / "cohort.zarr"
    if not (store / "zarr.json").exists():
        run([str(venv / "hpcbrain"), "synth", "--out", str(bids), "--subjects", str(subjects),
             "--seed", str(seed), "--quiet", *synth_args])
        run([str(venv / "hpcbrain"), "convert", str(bids), "--out", str(store), "--shape", "32",
             "--workers", "2", "--quiet"])
    uri = f"sqlite:///{out.resolve()}/mlflow.db"
    model = f"bench-lsor-grid-seed{seed}"
    started = time.perf_counter()
    run([str(venv / "python"), "launch/submit.py", "--cfg", "lsor.yaml", "--cfg", "demo.yaml",
         "--local", f"data.store={store}", f"run.root={folder}", "run.name=lsor",
         f"tracking.uri={uri}", f"tracking.registered_model={model}", *extra])
    train_s = time.perf_counter() - started
    store_ = CohortStore(store)
    scans = [str(p) for p in store_.metadata["source_path"]]
    latents = folder / "latents.csv"
    env_uri = {"MLFLOW_TRACKING_URI": uri}
    import os

    subprocess.run([str(venv / "hpcbrain"), "embed", f"models:/{model}@current", *scans,
                    "--out", str(latents)], check=True, cwd=ROOT, env={**os.environ, **env_uri})
    with open(latents, newline="") as handle:
        rows = list(csv.DictReader(handle))
    by_path = {row["path"]: row for row in rows}
    # the model's grid, as embed reports it (lsor.grid_rows/cols may be auto)
    n_rows, cols = int(rows[0]["som_rows"]), int(rows[0]["som_cols"])
    bmu = np.array([int(by_path[p]["som_row"]) * cols + int(by_path[p]["som_col"])
                    for p in scans])
    values = scan_values(store_, np.arange(len(scans)))
    metrics = score_grid(bmu, {k: values[k] for k in ("age", "brain_age")}, n_rows, cols)
    oracle = score_grid(oracle_nodes(values["brain_age"], n_rows, cols),
                        {k: values[k] for k in ("age", "brain_age")}, n_rows, cols)
    return {"seed": seed, "scans": len(scans), "train_s": round(train_s, 1),
            "subjects": int(np.unique(store_.column("subject")).size), "grid": [n_rows, cols],
            **{k.replace("som/", ""): v for k, v in metrics.items()},
            **{k.replace("som/", "oracle_"): v for k, v in oracle.items()}}


def oracle_nodes(brain_age: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """The grid a perfect brain-age map would give: scans in rows·cols equal-count bins of true
    brain age, bin b at node (b mod rows, b div rows), brain age rising along the long side."""
    ranks = np.argsort(np.argsort(brain_age, kind="stable"), kind="stable")
    bins = ranks * (rows * cols) // len(brain_age)
    return (bins % rows) * cols + bins // rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--subjects", type=int, default=80)   # the demo's
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench" / "lsor-grid")
    parser.add_argument("--preset", default="registered", choices=["registered", "raw"])
    parser.add_argument("--age-distribution", default="normal",
                        choices=["normal", "uniform", "bimodal"])
    parser.add_argument("overrides", nargs="*", help="config overrides for every training run")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    synth_args = ["--preset", args.preset, "--age-distribution", args.age_distribution]
    results = [score_seed(s, args.out, args.subjects, args.overrides, synth_args)
               for s in args.seeds]
    lines = ["| seed | subjects | scans | grid | occupied | dCor age | p | dCor brain age | p "
             "| train s | oracle grid: dCor age / brain age |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        nodes = r["grid"][0] * r["grid"][1]
        lines.append(f"| {r['seed']} | {r['subjects']} | {r['scans']} | "
                     f"{r['grid'][0]} × {r['grid'][1]} | {r['occupied_nodes']:.0f}/{nodes} | "
                     f"{r['dcor_age']:.3f} | {r['dcor_age_p']:.4f} | {r['dcor_brain_age']:.3f} | "
                     f"{r['dcor_brain_age_p']:.4f} | {r['train_s']:.0f} | "
                     f"{r['oracle_dcor_age']:.3f} / {r['oracle_dcor_brain_age']:.3f} |")
    ok = all(r["occupied_nodes"] >= TARGETS["occupied"] * r["grid"][0] * r["grid"][1]
             and r["dcor_age"] >= TARGETS["dcor_age"]
             and r["dcor_brain_age"] >= TARGETS["dcor_brain_age"]
             and max(r["dcor_age_p"], r["dcor_brain_age_p"]) < TARGETS["p"] for r in results)
    lines.append("")
    lines.append(f"targets (≥ {100 * TARGETS['occupied']:g} % of nodes, dCor age ≥ "
                 f"{TARGETS['dcor_age']}, "
                 f"brain age ≥ {TARGETS['dcor_brain_age']}, p < {TARGETS['p']}): "
                 f"{'met on every seed' if ok else 'NOT met on every seed'}")
    table = "\n".join(lines)
    (args.out / "table.md").write_text(table + "\n")
    (args.out / "table.json").write_text(json.dumps({"results": results, "targets": TARGETS,
                                                     "overrides": args.overrides,
                                                     "synth": synth_args}, indent=2))
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
