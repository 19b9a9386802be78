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

import hashlib
import json
import os
import shutil
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from hpcbrain.atomic import write_text_atomic
from hpcbrain.data.discover import ConversionError, Scan, discover_scans
from hpcbrain.data.preprocess import PREPROCESSING, BadScanError, load_scan
from hpcbrain.data.store import (
    ATTRS_KEY,
    IMAGES,
    SCHEMA_VERSION,
    ImageLayout,
    create_images_array,
    write_columns,
)

PARTIAL_SUFFIX = ".partial"
PROGRESS_FILE = "hpcbrain_progress.json"
_AFFINE = "affine"
_VOXEL = "voxel_size_mm"


@dataclass
class ConversionReport:
    n_converted: int
    skipped: list[tuple[str, str]]  # (path, reason)
    out: Path
    seconds: float
    resumed_shards: int


def _convert_one(path: str, size: int, dtype: str):
    """Worker task: (volume as dtype, affine, voxel mm, None) or (None, None, None, reason)."""
    try:
        volume, affine, out_vox = load_scan(path, size)
        volume = volume.astype(dtype)
        if not np.isfinite(volume).all():
            raise BadScanError(f"values overflow {dtype}")
        return volume, affine, out_vox, None
    except BadScanError as exc:
        return None, None, None, str(exc)
    except Exception as exc:  # anything else a broken file can trigger
        return None, None, None, f"cannot convert: {type(exc).__name__}: {exc}"


def _results(tasks: list[tuple[int, str]], size: int, dtype: str,
             workers: int) -> Iterator[tuple[int, tuple]]:
    """Yield (index, _convert_one result) in task order, with a process pool if workers > 1."""
    workers = min(workers, len(tasks))
    if workers <= 1:
        for index, path in tasks:
            yield index, _convert_one(path, size, dtype)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    pool = ProcessPoolExecutor(max_workers=workers,
                               mp_context=multiprocessing.get_context("spawn"))
    try:
        pending = deque()
        queue = iter(tasks)
        for index, path in queue:
            pending.append((index, pool.submit(_convert_one, path, size, dtype)))
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
                pending.append((nxt[0], pool.submit(_convert_one, nxt[1], size, dtype)))
            yield index, result
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# ============================================================================================
# Columns, fingerprint, progress
# ============================================================================================
def _build_columns(scans: list[Scan]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    columns: dict[str, np.ndarray] = {
        "subject": np.array([s.subject for s in scans], dtype=object),
        "session": np.array([s.session for s in scans], dtype=object),
        "age": np.array([s.age for s in scans], dtype=np.float32),
        "source_path": np.array([str(s.path) for s in scans], dtype=object),
    }
    names: list[str] = []
    for scan in scans:
        names.extend(k for k in scan.meta if k not in names)
    for name in names:
        raw = [scan.meta.get(name) for scan in scans]
        try:
            columns[name] = np.array([np.nan if v is None else float(v) for v in raw],
                                     dtype=np.float32)
        except ValueError:
            columns[name] = np.array(["" if v is None else v for v in raw], dtype=object)
    types = {k: ("str" if v.dtype == object else str(v.dtype)) for k, v in columns.items()}
    return columns, types


def _fingerprint(scans: list[Scan], size: int, dtype: str, scans_per_shard: int) -> str:
    items = []
    for scan in scans:
        try:
            stat = scan.path.stat() if scan.path else None
            file = [stat.st_size, stat.st_mtime_ns] if stat else None
        except OSError:
            file = None
        items.append([str(scan.path), file, scan.subject, scan.session, scan.age,
                      sorted(scan.meta.items()), scan.problems])
    blob = json.dumps({"scans": items, "shape": size, "dtype": dtype,
                       "scans_per_shard": scans_per_shard,
                       "preprocessing": PREPROCESSING}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


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


def _write_progress(partial: Path, state: dict) -> None:
    write_text_atomic(partial / PROGRESS_FILE, json.dumps(state))


def _describe(bad: list[tuple[str, str, str, str]], n_scans: int, header: str = "") -> str:
    lines = [header or f"{len(bad)} of {n_scans} scans are bad; nothing was written "
                       f"(fix them, or pass --skip-bad / skip_bad=True to convert the rest):"]
    lines += [f"  {sub or '?'} {ses or '?'}  {path}: {reason}" for path, sub, ses, reason in bad]
    return "\n".join(lines)


# ============================================================================================
# The conversion
# ============================================================================================
def convert_cohort(source: str | Path, out: str | Path, shape: int, *, workers: int = 1,
                   skip_bad: bool = False, dtype: str = "float16", scans_per_shard: int = 16,
                   progress: bool = True) -> ConversionReport:
    """Convert a BIDS folder or CSV manifest into the cohort store `out` (S³ images)."""
    import zarr
    from tqdm import tqdm

    started = time.perf_counter()
    size = int(shape)
    if size < 2:
        raise ConversionError(f"shape must be at least 2, got {shape}")
    try:
        if np.dtype(dtype).kind != "f":
            raise TypeError
    except TypeError:
        raise ConversionError(f"dtype must be a numpy float type (float16, float32), "
                              f"got {dtype!r}") from None
    dtype = np.dtype(dtype).name
    workers = max(1, int(workers))
    scans_per_shard = max(1, int(scans_per_shard))
    out = Path(os.path.abspath(Path(out).expanduser()))
    source = Path(os.path.abspath(Path(source).expanduser()))
    partial = out.with_name(out.name + PARTIAL_SUFFIX)
    if out.exists():
        raise ConversionError(f"{out} already exists: hpcbrain never overwrites a store; "
                              f"delete it (rm -r {out}) or pass another --out")

    scans, fmt = discover_scans(source)
    if not scans:
        raise ConversionError(f"no T1w images found in {source}")
    fingerprint = _fingerprint(scans, size, dtype, scans_per_shard)
    reasons: dict[int, list[str]] = {i: list(s.problems) for i, s in enumerate(scans)
                                     if s.problems}
    candidates = [i for i in range(len(scans)) if i not in reasons]

    def bad_list() -> list[tuple[str, str, str, str]]:
        return [(str(scans[i].path), scans[i].subject, scans[i].session, "; ".join(r))
                for i, r in sorted(reasons.items())]

    def fail(header: str = "") -> None:
        if partial.exists():
            shutil.rmtree(partial)
        raise ConversionError(_describe(bad_list(), len(scans), header), bad_list())

    nothing_left = f"nothing left to convert: all {len(scans)} scans are bad:"

    if reasons and not skip_bad:
        # Bad metadata: nothing will be written, but still check every image for the report.
        tasks = [(i, str(s.path)) for i, s in enumerate(scans)
                 if s.path is not None and s.path.is_file()]
        bar = tqdm(total=len(tasks), disable=not progress, unit="scan", desc="check")
        for index, (_, _, _, reason) in _results(tasks, size, dtype, workers):
            if reason:
                reasons.setdefault(index, []).append(reason)
            bar.update()
        bar.close()
        fail()
    if not candidates:
        fail(nothing_left)

    per_shard = max(1, min(scans_per_shard, len(candidates)))
    state = _read_progress(partial, fingerprint)
    if state is None:
        state = {"fingerprint": fingerprint, "done": 0, "written": 0, "shards": [], "bad": {}}
    for key, reason in state["bad"].items():
        reasons.setdefault(int(key), []).append(reason)
    resumed_shards = len(state["shards"])
    if resumed_shards:
        print(f"hpcbrain convert: resuming {partial}: {resumed_shards} shard(s), "
              f"{state['written']} scans already written", file=sys.stderr)
    writing = skip_bad or not state["bad"]
    group = images = None

    def open_store():
        nonlocal group, images
        if group is None:
            if partial.exists():
                group = zarr.open_group(str(partial), mode="r+")
                # Shards after the last recorded one are rewritten: drop whatever a killed run
                # left of them (zarr reads an existing shard file before writing into it).
                first = -(-state["written"] // per_shard)  # ceil: a short last shard counts
                for shard_dir in (partial / IMAGES / "c").glob("*"):
                    if shard_dir.name.isdigit() and int(shard_dir.name) >= first:
                        shutil.rmtree(shard_dir)
            else:
                group = zarr.open_group(str(partial), mode="w", zarr_format=3)
                layout = ImageLayout((size,) * 3, dtype=dtype, scans_per_shard=per_shard)
                create_images_array(group, len(candidates), layout)
                group.create_array(_AFFINE, shape=(len(candidates), 4, 4), dtype="float64",
                                   chunks=(max(per_shard, 1024), 4, 4), fill_value=0)
                group.create_array(_VOXEL, shape=(len(candidates),), dtype="float32",
                                   chunks=(max(per_shard, 1024),), fill_value=0)
                _write_progress(partial, state)
            images = group[IMAGES]
        return group

    buffer: list[tuple[int, np.ndarray, np.ndarray, float]] = []
    consumed = state["done"]

    def flush() -> None:
        start = state["written"]
        if not buffer:
            return
        g = open_store()
        stop = start + len(buffer)
        images[start:stop] = np.stack([b[1] for b in buffer])
        g[_AFFINE][start:stop] = np.stack([b[2] for b in buffer])
        g[_VOXEL][start:stop] = np.array([b[3] for b in buffer], dtype=np.float32)
        state["shards"].append(start // per_shard)
        state["written"] = stop
        state["done"] = consumed
        _write_progress(partial, state)
        buffer.clear()

    tasks = [(i, str(scans[i].path)) for i in candidates[state["done"]:]]
    bar = tqdm(total=len(candidates), initial=state["done"], disable=not progress,
               unit="scan", desc=f"convert {out.name}")
    try:
        for index, (volume, affine, out_vox, reason) in _results(tasks, size, dtype, workers):
            consumed += 1
            if reason:
                reasons.setdefault(index, []).append(reason)
                state["bad"][str(index)] = reason
                writing = writing and skip_bad
            elif writing:
                buffer.append((index, volume, affine, out_vox))
                if len(buffer) == per_shard:
                    flush()
            bar.update()
        if writing:
            flush()
    finally:
        bar.close()
    if reasons and not skip_bad:
        fail()
    good = [i for i in candidates if i not in reasons]
    if not good:
        fail(nothing_left)

    # Finalise: trim, metadata columns, attributes, then the atomic rename.
    group = open_store()
    n = len(good)
    assert state["written"] == n, (state["written"], n)
    if images.shape[0] != n:
        images.resize((n, size, size, size))
    affines = np.asarray(group[_AFFINE][:n])
    voxels = np.asarray(group[_VOXEL][:n], dtype=np.float32)
    columns, types = _build_columns([scans[i] for i in good])
    columns[_AFFINE] = affines
    columns[_VOXEL] = voxels
    types[_AFFINE] = "float64 (4, 4)"
    types[_VOXEL] = "float32"
    write_columns(group, columns)
    # isotropic output voxels; null when scans differ in field of view (see voxel_size_mm)
    spacing = [float(voxels[0])] * 3 if np.allclose(voxels, voxels[0], rtol=1e-5) else None
    skipped = [{"path": p, "subject": sub, "session": ses, "reason": r}
               for p, sub, ses, r in bad_list()]
    group.attrs[ATTRS_KEY] = {
        "schema_version": SCHEMA_VERSION,
        "shape": [size] * 3,
        "spacing_mm": spacing,
        "dtype": dtype,
        "n_scans": n,
        "scans_per_shard": int(images.shards[0]) if images.shards else 1,
        "columns": list(columns),
        "column_types": types,
        "preprocessing": PREPROCESSING,
        "skipped": skipped,
        "source": {"path": str(source), "format": fmt},
        "created_by": f"hpcbrain {_version()} (hpcbrain.data.convert.convert_cohort)",
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    (partial / PROGRESS_FILE).unlink(missing_ok=True)
    if out.exists():
        raise ConversionError(f"{out} appeared while converting; the finished store is left "
                              f"at {partial}")
    os.rename(partial, out)
    if skipped:
        print(f"hpcbrain convert: skipped {len(skipped)} bad scan(s):", file=sys.stderr)
        for p, sub, ses, r in bad_list():
            print(f"  {sub} {ses}  {p}: {r}", file=sys.stderr)
    return ConversionReport(n_converted=n, skipped=[(p, r) for p, _, _, r in bad_list()],
                            out=out, seconds=time.perf_counter() - started,
                            resumed_shards=resumed_shards)


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("hpcbrain")
    except Exception:
        return "unknown"
