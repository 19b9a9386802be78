"""The per-scan side of a conversion: what a worker process (or an array task) does with one
scan — load, preprocess, check, measure its QC metrics, draw its QC figure — and the ordered
pool that runs it (`convert_in_order`), shared by `convert` and `convert_blocks`."""
from __future__ import annotations

import os
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from hpcbrain.data.preprocess import BadScanError, load_scan
from hpcbrain.volume_grid import VolumeGrid

__all__ = ["ScanTask", "Recipe", "scan_tasks", "convert_in_order"]


@dataclass(frozen=True)
class ScanTask:
    """One scan for a worker: its index among the discovered scans, its file, and where to
    draw its QC figure (`qc_report.scan_figure`) once converted, if anywhere."""

    index: int
    path: str
    figure: str | None = None
    title: str = ""


def scan_tasks(scans, indices, figures: Path | None) -> list[ScanTask]:
    """The tasks of the discovered `scans` at `indices`; with `figures` (a folder), each draws
    its QC figure there under `qc_report.figure_name`."""
    from hpcbrain.data.qc_report import figure_name

    return [ScanTask(i, str(scans[i].path),
                     None if figures is None else str(figures / figure_name(scans[i].subject,
                                                                            scans[i].path)),
                     f"{scans[i].subject} {scans[i].session}") for i in indices]


@dataclass(frozen=True)
class Recipe:
    """How each scan is turned into a store volume (sent to the worker processes)."""

    grid: VolumeGrid                  # the voxel grid of the store's volumes
    dtype: str
    register: bool = False


def _convert_one(task: ScanTask, recipe: Recipe):
    """Worker task: (volume as dtype, affine, voxel mm, None, ledger entry) or (None, None,
    None, reason, ledger entry); the entry holds the seconds it took and, for a converted
    scan, its QC metrics (`scan_qc`). Draws the scan's QC figure when the task says where:
    the workers (or array tasks) draw them, not the one process that writes the report."""
    from hpcbrain.data.scan_qc import qc_metrics, template_volume

    path, grid, dtype = task.path, recipe.grid, recipe.dtype
    template_volume(grid)             # made once per process, not timed as this scan's
    started = time.perf_counter()
    try:
        volume, affine, out_vox = load_scan(path, grid, register=recipe.register)
        volume = volume.astype(dtype)
        if not np.isfinite(volume).all():
            raise BadScanError(f"values overflow {dtype}")
        qc = qc_metrics(volume, grid)
        entry = _entry(started, qc)
        if task.figure:
            _draw_figure(task, volume, recipe)
        return volume, affine, out_vox, None, entry
    except BadScanError as exc:
        return None, None, None, str(exc), _entry(started)
    except Exception as exc:  # anything else a broken file can trigger
        return None, None, None, f"cannot convert: {type(exc).__name__}: {exc}", _entry(started)


def _draw_figure(task: ScanTask, volume: np.ndarray, recipe: Recipe) -> None:
    """The QC figure of a converted scan, as the report would draw it from the store; a failure
    here only leaves the figure to the report."""
    from hpcbrain.data.qc_report import scan_figure

    try:
        # before registration: on the field of view of the store's shape (an MNI box would
        # reject the unregistered scan)
        before = load_scan(task.path, VolumeGrid(recipe.grid.shape))[0] if recipe.register \
            else None
        scan_figure(Path(task.figure), volume.astype(np.float32), before, task.title,
                    recipe.grid)
    except Exception:  # noqa: BLE001 - a figure is never worth a scan
        pass


def _entry(started: float, qc: dict | None = None) -> dict:
    return {"seconds": round(time.perf_counter() - started, 4), "qc": qc}


def _exit_with_parent(parent_pid: int) -> None:
    """Worker initializer: end this worker when the converting process is gone (a SIGKILL
    leaves spawned workers blocked on their task queue for ever otherwise)."""
    import threading

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def convert_in_order(tasks: list[ScanTask], recipe: Recipe,
                     workers: int) -> Iterator[tuple[int, tuple]]:
    """Yield (index, _convert_one result) in task order, with a process pool if workers > 1."""
    workers = min(workers, len(tasks))
    if workers <= 1:
        for task in tasks:
            yield task.index, _convert_one(task, recipe)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    pool = ProcessPoolExecutor(max_workers=workers,
                               mp_context=multiprocessing.get_context("spawn"),
                               initializer=_exit_with_parent, initargs=(os.getpid(),))
    try:
        pending = deque()
        queue = iter(tasks)
        for task in queue:
            pending.append((task.index, pool.submit(_convert_one, task, recipe)))
            if len(pending) >= 3 * workers:
                break
        while pending:
            index, future = pending.popleft()
            try:
                result = future.result()
            except BrokenProcessPool as exc:
                raise RuntimeError(
                    "a conversion worker process died (out of memory? killed? or a script "
                    "calling convert_cohort(workers > 1) without an `if __name__ == "
                    "'__main__':` guard, which worker processes re-run); the partial store is "
                    "kept and rerunning the same command resumes") from exc
            nxt = next(queue, None)
            if nxt is not None:
                pending.append((nxt.index, pool.submit(_convert_one, nxt, recipe)))
            yield index, result
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
