"""Conversion at cohort scale through the Slurm array, on the dev cluster.

For each cohort size (synthetic cohorts, `hpcbrain synth --voxel-size 4`, made once and kept):
`launch/submit.py --convert … --tasks T --wait` on the dev cluster (slurm/devcluster/, started
and stopped here; needs root), then from every task's own report (`ConvertBlockTask`'s result)
and the store: scans/s per task, the tasks' balance (slowest / mean task time), the peak resident
memory per task (which must stay flat as the cohort grows: a task holds one shard at a time),
wall time of the array and of the assembling step, and the ledger's completeness (one row per
discovered scan, every scan ok).

    .venv/bin/python -m bench.convert_scale --subjects 140 560 --tasks 4 --shape 32

Prints a table and writes OUT/convert_scale.json. The dev cluster's two nodes share this
machine's cores, so scans/s per task is a per-core figure only with --tasks ≤ the cores.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bench.common import ROOT

VENV = ROOT / ".venv" / "bin"


def start_cluster() -> None:
    proc = subprocess.run([str(ROOT / "slurm" / "devcluster" / "start.sh")], capture_output=True,
                          text=True, check=True)
    os.environ["SLURM_CONF"] = re.search(r"export SLURM_CONF=(\S+)", proc.stdout).group(1)


def stop_cluster() -> None:
    subprocess.run([str(ROOT / "slurm" / "devcluster" / "stop.sh")], capture_output=True)


def task_reports(log_root: Path, array_id: str) -> list[dict]:
    """Each array task's returned dict, from submitit's result files."""
    reports = []
    for path in sorted(log_root.glob(f"{array_id}_*/{array_id}_*_0_result.pkl")):
        with open(path, "rb") as handle:
            status, value = pickle.load(handle)
        if status == "success":
            reports.append(value)
    return reports


def one_size(out: Path, subjects: int, tasks: int, shape: int) -> dict:
    from hpcbrain.data.ledger import read_ledger

    bids = out / f"bids{subjects}"
    if not (bids / "participants.tsv").exists():
        subprocess.run([VENV / "hpcbrain", "synth", "--out", bids, "--subjects", str(subjects),
                        "--seed", "7", "--voxel-size", "4", "--quiet"], check=True)
    store = out / f"cohort{subjects}.zarr"
    for leftover in (store, out / f"cohort{subjects}_qc",
                     store.with_name(store.name + ".partial")):
        subprocess.run(["rm", "-rf", str(leftover)], check=True)
    logs = out / f"logs{subjects}"
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "submit.py"), "--convert",
                           str(bids), str(store), "--shape", str(shape), "--tasks", str(tasks),
                           "--wait", f"slurm.log_dir={logs}/%j", f"run.root={out}"],
                          capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"conversion failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    array_id = re.search(r"submitted job array (\d+)", proc.stdout).group(1)
    reports = task_reports(logs, array_id)
    seconds = np.array([r["seconds"] for r in reports])
    ledger = read_ledger(store)
    return {"subjects": subjects, "scans": sum(r["scans"] for r in reports), "tasks": len(reports),
            "wall_s": round(wall, 1),
            "task_scans_per_s": [round(r["scans"] / r["seconds"], 2) for r in reports],
            "task_seconds": seconds.round(1).tolist(),
            "balance": round(float(seconds.max() / seconds.mean()), 3),
            "peak_rss_mb": [r["peak_rss_mb"] for r in reports],
            "ledger_rows": len(ledger),
            "ledger_ok": int(sum(r["status"] == "ok" for r in ledger)),
            "ledger_with_metrics": int(sum(np.isfinite(r["template_corr"]) for r in ledger)),
            # drawn by the tasks as they convert (data/qc_report.py), linked by the report
            "qc_figures": len(list((out / f"cohort{subjects}_qc" / "figures").rglob("*.png"))),
            "slowest_task_s": round(float(seconds.max()), 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, nargs="+", default=[140, 560])
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--shape", type=int, default=32)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench" / "convert_scale")
    args = parser.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    start_cluster()
    try:
        rows = [one_size(out, n, args.tasks, args.shape) for n in args.subjects]
    finally:
        stop_cluster()
    lines = ["| subjects | scans | tasks | wall (s) | slowest task (s) | scans/s per task | "
             "slowest / mean task | peak RSS per task (MB) | ledger rows / ok / with QC | "
             "QC figures |", "|---" * 10 + "|"]
    for r in rows:
        lines.append(f"| {r['subjects']} | {r['scans']} | {r['tasks']} | {r['wall_s']} | "
                     f"{r['slowest_task_s']} | "
                     f"{min(r['task_scans_per_s'])}–{max(r['task_scans_per_s'])} | "
                     f"{r['balance']} | {min(r['peak_rss_mb'])}–{max(r['peak_rss_mb'])} | "
                     f"{r['ledger_rows']} / {r['ledger_ok']} / {r['ledger_with_metrics']} | "
                     f"{r['qc_figures']} |")
    print("\n".join(lines))
    (out / "convert_scale.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
