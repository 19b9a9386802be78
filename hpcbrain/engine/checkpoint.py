"""Atomic, resumable checkpoints in a run folder.

A checkpoint is written to a temporary file and renamed into place, so a job killed while
saving leaves the previous checkpoint intact and never a half-written one under a real name.
"""
from __future__ import annotations

import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHECKPOINT_DIR = "checkpoints"
_NAME = re.compile(r"^step-(\d{9})\.pt$")


def checkpoint_path(run_dir: Path, global_step: int) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR / f"step-{global_step:09d}.pt"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if _NAME.match(p.name))


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def save_atomic(payload: dict[str, Any], path: Path, keep_last: int = 2) -> Path:
    """torch.save to a temporary name, fsync, rename; then drop all but the newest `keep_last`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as handle:
        torch.save(payload, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    for old in list_checkpoints(path.parent.parent)[:-keep_last]:
        old.unlink(missing_ok=True)
    return path


def load(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    # weights_only=False: checkpoints hold RNG states and plain config dicts written by us.
    return torch.load(path, map_location=map_location, weights_only=False)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
