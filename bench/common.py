"""What the benchmarks share: the project root and its environment, running a command from the
root, a synthetic cohort converted to a 32³ store (made once, reused when it exists), the ridge
age scoring every science row goes through, the host a figure was measured on, and a markdown
table of result rows."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".venv" / "bin"


def run(cmd: list[str], env: dict | None = None) -> None:
    """Run `cmd` in the project root (echoed, long argument lists shortened); raise on failure."""
    shown = " ".join(map(str, cmd))
    print("+", shown if len(shown) < 400 else f"{shown[:400]} … ({len(cmd)} arguments)", flush=True)
    subprocess.run(list(map(str, cmd)), check=True, cwd=ROOT, env={**os.environ, **(env or {})})


def make_cohort(folder: Path, seed: int, subjects: int, synth_args: list[str],
                shape: int = 32) -> Path:
    """`hpcbrain synth` (4 mm voxels) + `hpcbrain convert --shape SHAPE` into
    FOLDER/bids<seed> and FOLDER/cohort<seed>.zarr, unless the store exists."""
    bids, store = folder / f"bids{seed}", folder / f"cohort{seed}.zarr"
    if not (store / "zarr.json").exists():
        run([VENV / "hpcbrain", "synth", "--out", bids, "--subjects", subjects, "--seed", seed,
             "--voxel-size", "4", "--quiet", *synth_args])
        run([VENV / "hpcbrain", "convert", bids, "--out", store, "--shape", shape,
             "--workers", "2", "--quiet"])
    return store


def ridge_errors(train_x, train_y, groups, test_x, test_y) -> np.ndarray:
    """|predicted − true age| per test scan of the ridge the job's evaluation fits
    (`hpcbrain.evaluate.ridge.fit_ridge`: standardised features, alpha by subject-grouped CV)."""
    from hpcbrain.evaluate.ridge import fit_ridge

    ridge = fit_ridge(train_x, train_y, groups=groups, seed=0)
    return np.abs(ridge.predict(test_x) - test_y)


def host() -> str:
    """The CPU (and GPU, if any) a figure was measured on, as the README's tables name it."""
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next(line.split(":", 1)[1].strip() for line in handle
                       if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return f"{cpu}, {os.cpu_count()} cores{gpu}"


def markdown_table(rows: list[dict], columns: list[str] | None = None) -> str:
    """`rows` (dicts) as a markdown table over `columns` (default: the first row's keys);
    floats with 3 significant digits."""
    columns = columns or list(rows[0])

    def cell(value) -> str:
        return f"{value:.3g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"
