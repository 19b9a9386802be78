"""NIfTI / BIDS cohorts → a cohort store (see `hpcbrain.data.store` for the layout).

``hpcbrain convert SRC --out STORE.zarr --shape S [--workers K] [--skip-bad]`` calls
`convert_cohort`: the scans `hpcbrain.data.discover` finds, preprocessed by
`hpcbrain.data.preprocess`, written shard by shard.

Writing: atomic, resumable
--------------------------
The store is written as ``OUT.partial`` next to ``OUT`` and renamed to ``OUT`` only once it is
complete. An existing ``OUT`` is never overwritten: delete it or pass another ``--out``.
The main process writes whole shards (``scans_per_shard`` scans) in scan order and, after each,
records in ``OUT.partial/hpcbrain_progress.json`` how far it got, together with a fingerprint
of the inputs (scan list, file sizes and mtimes, metadata, shape, dtype, scans per shard,
preprocessing version). Rerunning the same command resumes after the last complete shard; a
different fingerprint discards the partial store and starts over (and says so).
One conversion per store at a time: ``OUT.partial.lock`` is held (`hpcbrain.run_lock.file_lock`)
while it runs; a second one names the holder and stops. Pool workers end themselves when the
converting process is gone (killed), instead of lingering as orphans.
With ``workers > 1`` a process pool (``spawn`` context) loads and preprocesses scans; results
are consumed in scan order, so the store is identical for any number of workers. As always with
``spawn``, a script that calls ``convert_cohort(workers > 1)`` needs an
``if __name__ == "__main__":`` guard (the ``hpcbrain`` command has one).

Bad input
---------
By default everything is checked first-to-last (metadata, then every image), and one
`ConversionError` lists every bad scan and why; no store and no ``.partial`` folder is left.
With ``skip_bad=True`` the bad scans are left out (both scans of a duplicate pair), printed, and
recorded in ``attrs["hpcbrain"]["skipped"]``; if nothing is left, it is an error.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from hpcbrain.data.convert_records import (
    build_columns,
    describe_bad,
    hpcbrain_version,
    inputs_fingerprint,
    refuse_existing,
)
from hpcbrain.data.convert_workers import Recipe, convert_in_order, scan_tasks
from hpcbrain.data.discover import ConversionError, discover_scans
from hpcbrain.data.ledger import (
    ledger_rows,
    read_shard_entries,
    remove_staging,
    write_ledger_group,
    write_shard_entries,
)
from hpcbrain.data.preprocess import preprocessing_attrs
from hpcbrain.data.qc_report import DRAWN_FIGURES
from hpcbrain.data.store import DEFAULT_CODEC, PROGRESS_FILE, CohortStoreWriter, ImageLayout
from hpcbrain.disk_space import OutOfSpace, no_space_error
from hpcbrain.run_lock import RunFolderLocked, file_lock
from hpcbrain.volume_grid import VolumeGrid, as_shape

PARTIAL_SUFFIX = ".partial"


@dataclass
class ConversionReport:
    n_converted: int
    skipped: list[tuple[str, str]]  # (path, reason)
    out: Path
    seconds: float
    resumed_shards: int
    qc_folder: Path | None = None   # OUT_qc/: index.html, conversion.tsv, a page per participant
    flagged: int = 0                # converted scans the automatic QC checks flag


# ============================================================================================
# Progress
# ============================================================================================
def _read_progress(partial: Path, fingerprint: str) -> dict | None:
    """The saved progress of an earlier run with the same inputs, else None (and clean up)."""
    if not partial.exists():
        return None
    try:
        state = json.loads((partial / PROGRESS_FILE).read_text())
        if state.get("fingerprint") == fingerprint:
            return state
        why = "different inputs or settings"
    except (OSError, ValueError):
        why = "no readable progress record"
    print(f"hpcbrain convert: {partial} was left by an earlier conversion ({why}): "
          f"starting over", file=sys.stderr)
    shutil.rmtree(partial)
    return None


# ============================================================================================
# The conversion
# ============================================================================================
def convert_cohort(source: str | Path, out: str | Path, shape: int | Sequence[int] | VolumeGrid,
                   *, workers: int = 1,
                   skip_bad: bool = False, dtype: str = "float16", scans_per_shard: int = 16,
                   codec: str = DEFAULT_CODEC, codec_level: int | None = None,
                   register: bool = False, bids_filter: str | None = None,
                   progress: bool = True, qc_report: bool = True, append: bool = False,
                   exclude: frozenset[tuple[str, str]] = frozenset()) -> ConversionReport:
    """Convert a BIDS folder or CSV manifest into the cohort store `out`, its volumes on the
    grid `shape` (S: an S³ cube, (D, H, W), or a `VolumeGrid` such as ``MNI_BOXES["mni2mm"]``); with
    `register`, every scan is bias-corrected and affinely registered to MNI152 first;
    `bids_filter` (JSON or a JSON file) chooses among a session's T1w images. `append`: add to
    the existing store `out` the sessions it lacks (`hpcbrain.data.append`); `exclude`: the
    (subject, session) pairs to leave out of the source (what an append does not convert)."""

    started = time.perf_counter()
    try:
        grid = shape if isinstance(shape, VolumeGrid) else VolumeGrid(as_shape(shape))
    except ValueError as exc:
        raise ConversionError(str(exc)) from None
    try:
        if np.dtype(dtype).kind != "f":
            raise TypeError
    except TypeError:
        raise ConversionError(f"dtype must be a numpy float type (float16, float32), "
                              f"got {dtype!r}") from None
    dtype = np.dtype(dtype).name
    workers = max(1, int(workers))
    try:
        layout = ImageLayout(grid.shape, dtype=dtype, scans_per_shard=max(1, int(scans_per_shard)),
                             codec=codec, level=codec_level)
    except ValueError as exc:
        raise ConversionError(str(exc)) from None
    if register:
        from hpcbrain.data.register import RegistrationUnavailable, require_antspy

        try:
            require_antspy()
        except RegistrationUnavailable as exc:
            raise ConversionError(str(exc)) from None
    out = Path(os.path.abspath(Path(out).expanduser()))
    source = Path(os.path.abspath(Path(source).expanduser()))
    partial = out.with_name(out.name + PARTIAL_SUFFIX)
    if append:
        from hpcbrain.data.append import append_cohort

        options = dict(workers=workers, skip_bad=skip_bad, dtype=dtype,
                       scans_per_shard=layout.scans_per_shard, codec=codec,
                       codec_level=codec_level, register=register, bids_filter=bids_filter,
                       progress=progress)
        return append_cohort(source, out, grid, layout, options, qc_report, started)
    refuse_existing(out)

    lock = out.with_name(out.name + PARTIAL_SUFFIX + ".lock")
    try:
        with file_lock(lock, f"the conversion to {out}",
                       "another `hpcbrain convert` is writing this store; wait for it to end, "
                       "or pass another --out"):
            return _convert_locked(source, out, partial, Recipe(grid, dtype, bool(register)),
                                   layout, workers, skip_bad, progress, started, bids_filter,
                                   qc_report, exclude)
    except RunFolderLocked as exc:
        raise ConversionError(str(exc)) from None


def _space_still_needed(partial: Path, written: int, total: int) -> int | None:
    """About how many bytes the scans not yet written will take, at the size per scan of those
    written so far."""
    if written <= 0:
        return None
    size = sum(f.stat().st_size for f in partial.rglob("*") if f.is_file())
    return int(size / written * max(total - written, 1))


def _convert_locked(source: Path, out: Path, partial: Path, recipe: Recipe, layout: ImageLayout,
                    workers: int, skip_bad: bool, progress: bool, started: float,
                    bids_filter: str | None = None, qc_report: bool = True,
                    exclude: frozenset[tuple[str, str]] = frozenset()) -> ConversionReport:
    """`convert_cohort` once it holds the lock on ``OUT.partial.lock``."""
    from tqdm import tqdm

    preprocessing = preprocessing_attrs(recipe.register, recipe.grid)

    refuse_existing(out)             # finished by another conversion while we waited to check
    scans, fmt = discover_scans(source, bids_filter)
    scans = [s for s in scans if (s.subject, s.session) not in exclude]
    if not scans:
        raise ConversionError(f"no T1w images found in {source}"
                              + (" that the store lacks" if exclude else ""))
    fingerprint = inputs_fingerprint(scans, recipe.grid.fingerprint(), layout, preprocessing)
    reasons: dict[int, list[str]] = {i: list(s.problems) for i, s in enumerate(scans)
                                     if s.problems}
    candidates = [i for i in range(len(scans)) if i not in reasons]

    def bad_list() -> list[tuple[str, str, str, str]]:
        return [(str(scans[i].path), scans[i].subject, scans[i].session, "; ".join(r))
                for i, r in sorted(reasons.items())]

    def fail(header: str = "") -> None:
        if partial.exists():
            shutil.rmtree(partial)
        raise ConversionError(describe_bad(bad_list(), len(scans), header), bad_list())

    nothing_left = f"nothing left to convert: all {len(scans)} scans are bad:"

    if reasons and not skip_bad:
        # Bad metadata: nothing will be written, but still check every image for the report.
        tasks = scan_tasks(scans, [i for i, s in enumerate(scans)
                                   if s.path is not None and s.path.is_file()], None)
        bar = tqdm(total=len(tasks), disable=not progress, unit="scan", desc="check")
        for index, (_, _, _, reason, _) in convert_in_order(tasks, recipe, workers):
            if reason:
                reasons.setdefault(index, []).append(reason)
            bar.update()
        bar.close()
        fail()
    if not candidates:
        fail(nothing_left)

    layout = dataclasses.replace(layout,
                                 scans_per_shard=min(layout.scans_per_shard, len(candidates)))
    state = _read_progress(partial, fingerprint)
    if state is None:
        state = {"fingerprint": fingerprint, "done": 0, "written": 0, "shards": [], "bad": {}}
    for key, reason in state["bad"].items():
        reasons.setdefault(int(key), []).append(reason)
    resumed_shards = len(state["shards"])
    if resumed_shards:
        print(f"hpcbrain convert: resuming {partial}: {resumed_shards} shard(s), "
              f"{state['written']} scans already written", file=sys.stderr)
    pending: list[dict] = []          # ledger entries since the last shard

    def stage_ledger(progress: dict) -> None:
        write_shard_entries(partial, int(progress.get("done", consumed)), pending)
        pending.clear()

    writer = CohortStoreWriter(partial, len(candidates), layout, state,
                               before_progress=stage_ledger)
    writer.open()                     # the partial store exists before workers draw into it
    writing = skip_bad or not state["bad"]
    consumed = state["done"]
    tasks = scan_tasks(scans, candidates[state["done"]:],
                       partial / DRAWN_FIGURES if qc_report else None)
    bar = tqdm(total=len(candidates), initial=state["done"], disable=not progress,
               unit="scan", desc=f"convert {out.name}")
    try:
        for index, (volume, affine, out_vox, reason, entry) in convert_in_order(
                tasks, recipe, workers):
            consumed += 1
            pending.append({"index": index, **entry})
            if reason:
                reasons.setdefault(index, []).append(reason)
                state["bad"][str(index)] = reason
                writing = writing and skip_bad
            elif writing:
                # `done` is recorded with each full shard: a resume restarts after it
                writer.append(volume, affine, out_vox, done=consumed)
            bar.update()
        if writing:
            writer.flush(done=consumed)
            if pending:              # scans that failed after the last shard
                stage_ledger({"done": consumed})
    except Exception as exc:
        if no_space_error(exc) is None:
            raise
        # the shards written so far stay in OUT.partial (the rerun resumes after them)
        raise OutOfSpace(partial, "the store being converted", _space_still_needed(
            partial, state["written"], len(candidates))) from exc
    finally:
        bar.close()
    if reasons and not skip_bad:
        fail()
    good = [i for i in candidates if i not in reasons]
    if not good:
        fail(nothing_left)

    assert state["written"] == len(good), (state["written"], len(good))
    columns, types = build_columns([scans[i] for i in good])
    skipped = [{"path": p, "subject": sub, "session": ses, "reason": r}
               for p, sub, ses, r in bad_list()]
    ledger = ledger_rows(scans, read_shard_entries(partial), reasons,
                         {index: row for row, index in enumerate(good)})
    try:
        writer.finalise(out, columns, types, {
            "preprocessing": preprocessing,
            "skipped": skipped,
            "source": {"path": str(source), "format": fmt, "bids_filter": bids_filter},
            "created_by": f"hpcbrain {hpcbrain_version()} "
                          f"(hpcbrain.data.convert.convert_cohort)",
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }, extra=lambda group: write_ledger_group(group, ledger))
    except FileExistsError as exc:
        raise ConversionError(str(exc)) from None
    remove_staging(out)
    qc_folder = None
    if qc_report:
        from hpcbrain.data.qc_report import write_qc_report

        qc_folder = write_qc_report(out, ledger, register=recipe.register,
                                    drawn=[out / DRAWN_FIGURES])
    shutil.rmtree(out / DRAWN_FIGURES, ignore_errors=True)
    if skipped:
        print(f"hpcbrain convert: skipped {len(skipped)} bad scan(s):", file=sys.stderr)
        for p, sub, ses, r in bad_list():
            print(f"  {sub} {ses}  {p}: {r}", file=sys.stderr)
    return ConversionReport(n_converted=len(good),
                            skipped=[(p, r) for p, _, _, r in bad_list()],
                            out=out, seconds=time.perf_counter() - started,
                            resumed_shards=resumed_shards, qc_folder=qc_folder,
                            flagged=sum(bool(row["flags"]) for row in ledger))
