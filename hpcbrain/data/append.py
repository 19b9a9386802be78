"""Growing a finished store by a wave of new sessions without touching its shard files.

``hpcbrain convert SRC --out OUT.zarr --shape S --append`` (and ``launch/submit.py --convert …
--append``) adds the sessions of SRC that OUT does not hold yet:

1. **Refuse what would mix two recipes** (`check_recipe`): the volume shape, dtype, codec,
   scans per shard, BIDS filter and preprocessing (registration, its version) must equal what
   OUT records, else the error names each key that differs. The source folder may differ.
2. **Convert the wave** — the source's scans minus those whose (subject, session) OUT holds —
   into a store of its own, ``OUT.wave`` beside OUT, by the ordinary conversion: resumable,
   ledger, bad scans skipped with ``--skip-bad``; through the Slurm array too.
3. **Merge** (`merge_wave`) into ``OUT.appending``: every file of OUT hard-linked (the shard
   files are then the same files, their bytes unchanged by construction; copied where the file
   system has no hard links) except the small metadata files, which are copied, since zarr
   rewrites those in place; the wave's images are written into *new* shard files whose rows
   start at the first shard boundary after OUT's last row; the columns, the ledger and the
   attributes are those of both; scan i's images row goes into the ``image_row`` array
   (`hpcbrain.data.store`). Then OUT is swapped for it (OUT → ``OUT.before-append``,
   ``OUT.appending`` → OUT, the former removed) and the wave deleted.

A kill at any point leaves OUT as it was or the merged store complete: `finish_interrupted`
(called first by every append) completes or undoes a swap that was under way, and a rerun of the
same command redoes only what is unfinished (the wave resumes; a merge starts again from OUT).
The rows between OUT's last scan and the boundary stay empty (their chunks are absent from the
old last shard's index and read as zeros): at most scans_per_shard − 1 rows of padding per wave.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hpcbrain.data.discover import ConversionError
from hpcbrain.data.store import (
    AFFINE,
    IMAGE_ROW,
    IMAGES,
    VOXEL_SIZE,
    CohortStore,
    ImageLayout,
    write_scan_metadata,
)

__all__ = ["WAVE_SUFFIX", "stored_sessions", "check_recipe", "merge_wave", "finish_interrupted",
           "wave_path", "MergeReport", "append_cohort", "prepare_append", "NothingToAppend"]

WAVE_SUFFIX = ".wave"
STAGING_SUFFIX = ".appending"
OLD_SUFFIX = ".before-append"
_COMPLETE = "hpcbrain_append_complete"      # written last into the staging folder


@dataclass
class MergeReport:
    added: int                 # scans of the wave now in the store
    scans: int                 # scans in the store after the merge
    first_row: int             # the images row the wave starts at (a shard boundary)
    padding_rows: int          # empty rows between the old last scan and it


def wave_path(out: Path) -> Path:
    return out.with_name(out.name + WAVE_SUFFIX)


def stored_sessions(store: Path) -> set[tuple[str, str]]:
    """The (subject, session) of every scan in the store."""
    cohort = CohortStore(store)
    return set(zip(map(str, cohort.column("subject")), map(str, cohort.column("session"))))


def check_recipe(store: Path, layout: ImageLayout, preprocessing: dict,
                 bids_filter: str | None) -> None:
    """Refuse to append scans made another way than the store's (see the module doc)."""
    info = CohortStore(store).info
    stored = {"shape": list(info["shape"]), "dtype": info["dtype"],
              "codec": info["codec"], "preprocessing": info.get("preprocessing"),
              "bids_filter": (info.get("source") or {}).get("bids_filter")}
    wanted = {"shape": list(layout.shape), "dtype": layout.dtype,
              "codec": layout.codec_attrs(), "preprocessing": preprocessing,
              "bids_filter": bids_filter}
    differ = [f"{key}: the store has {stored[key]!r}, this conversion {wanted[key]!r}"
              for key in stored if json.dumps(stored[key], sort_keys=True)
              != json.dumps(wanted[key], sort_keys=True)]
    if differ:
        raise ConversionError(
            f"cannot append to {store}: it was made with other settings, and one store must "
            f"hold scans made one way.\n  " + "\n  ".join(differ) + "\nConvert with the "
            "store's settings, or into a new store without --append.")


class NothingToAppend(ConversionError):
    """The store already holds every session of the source."""


def prepare_append(out: Path, layout: ImageLayout, preprocessing: dict,
                   bids_filter: str | None) -> frozenset[tuple[str, str]]:
    """Before a wave is converted: finish an interrupted merge, check that `out` exists and was
    made the same way; the (subject, session) pairs it holds, which the wave leaves out."""
    finish_interrupted(out)
    if not out.exists():
        raise ConversionError(f"{out} does not exist: nothing to append to; convert the first "
                              f"wave without --append")
    check_recipe(out, layout, preprocessing, bids_filter)
    return frozenset(stored_sessions(out))


def finish_interrupted(out: Path) -> None:
    """Complete or undo a merge's swap that a kill interrupted (see the module doc)."""
    staging = out.with_name(out.name + STAGING_SUFFIX)
    old = out.with_name(out.name + OLD_SUFFIX)
    if old.exists() and not out.exists():
        if (staging / _COMPLETE).exists():
            os.rename(staging, out)        # killed between the two renames: finish the swap
        else:
            os.rename(old, out)            # cannot happen by our order; put the original back
    if old.exists() and out.exists():
        shutil.rmtree(old)                 # the swap was done; the original is not needed
    (out / _COMPLETE).unlink(missing_ok=True)
    if staging.exists() and not (staging / _COMPLETE).exists():
        shutil.rmtree(staging)             # a merge killed before it was complete: redo it


def _link_tree(source: Path, target: Path) -> None:
    """`target` with the files of `source`: the images' shard files hard-linked (copied where
    the file system has no hard links), every other file copied."""
    shards = source / IMAGES / "c"
    for folder, _, files in os.walk(source):
        rel = Path(folder).relative_to(source)
        (target / rel).mkdir(parents=True, exist_ok=True)
        for name in files:
            src, dst = Path(folder) / name, target / rel / name
            if Path(folder).is_relative_to(shards):
                try:
                    os.link(src, dst)
                    continue
                except OSError:
                    pass
            shutil.copy2(src, dst)


def _column_part(group, name: str, n: int, text: bool) -> np.ndarray:
    """Column `name` of a store's group, or n empty values where it has none."""
    if name in group:
        values = group[name][...]
        return values.astype(object) if text else values
    return np.full(n, "", dtype=object) if text else np.full(n, np.nan, np.float32)


def _merged_columns(old: CohortStore, new: CohortStore) -> tuple[dict, dict]:
    """The columns of both stores, old rows first; a column one store lacks is empty there
    (NaN, or "" for text)."""
    import zarr

    types = {**new.info.get("column_types", {}), **old.info.get("column_types", {})}
    group_old = zarr.open_group(str(old.path), mode="r")
    group_new = zarr.open_group(str(new.path), mode="r")
    columns: dict[str, np.ndarray] = {}
    for name in [*old.info["columns"], *(c for c in new.info["columns"]
                                         if c not in old.info["columns"])]:
        if name in (AFFINE, VOXEL_SIZE, IMAGE_ROW):
            continue
        text = types.get(name) == "str"
        columns[name] = np.concatenate([_column_part(group_old, name, len(old), text),
                                        _column_part(group_new, name, len(new), text)])
    return columns, {k: types[k] for k in columns if k in types}


def merge_wave(out: Path, wave: Path, source: Path) -> MergeReport:
    """Add the store `wave` to the store `out` (see the module doc); the wave is left."""
    import zarr

    from hpcbrain.data.ledger import read_ledger, write_ledger_group

    finish_interrupted(out)
    staging = out.with_name(out.name + STAGING_SUFFIX)
    if staging.exists():
        shutil.rmtree(staging)
    old, new = CohortStore(out), CohortStore(wave)
    _link_tree(out, staging)
    group = zarr.open_group(str(staging), mode="r+")
    images = group[IMAGES]
    per_shard = int(images.shards[0]) if images.shards else 1
    used = int(images.shape[0])
    first = -(-used // per_shard) * per_shard        # the next shard boundary
    images.resize((first + len(new), *images.shape[1:]))
    for start in range(0, len(new), per_shard):      # whole new shards, each written once
        stop = min(start + per_shard, len(new))
        images[first + start:first + stop] = new.images[start:stop]

    old_rows = (np.asarray(group[IMAGE_ROW][...], dtype=np.int64) if IMAGE_ROW in group
                else np.arange(len(old), dtype=np.int64))      # a first append: scan = row
    columns, types = _merged_columns(old, new)
    columns[IMAGE_ROW] = np.concatenate([old_rows, first + np.arange(len(new), dtype=np.int64)])
    types[IMAGE_ROW] = "int64"
    wave_group = zarr.open_group(str(wave), mode="r")
    affines = np.concatenate([group[AFFINE][...], wave_group[AFFINE][...]])
    voxels = np.concatenate([group[VOXEL_SIZE][...], wave_group[VOXEL_SIZE][...]])

    # the ledger: the store's rows, but a session the wave retried (failed or skipped before)
    # keeps only its new row; the wave's store rows follow the old ones
    wave_rows = read_ledger(wave)
    retried = {(r["subject"], r["session"]) for r in wave_rows}
    ledger = [r for r in read_ledger(out)
              if r["status"] == "ok" or (r["subject"], r["session"]) not in retried]
    for row in wave_rows:
        ledger.append({**row, "store_index": row["store_index"] + len(old)
                       if row["store_index"] >= 0 else -1})
    write_ledger_group(group, ledger)

    info, wave_info = old.info, new.info
    layout = ImageLayout(tuple(info["shape"]), dtype=info["dtype"], scans_per_shard=per_shard,
                         codec=info["codec"]["name"], level=info["codec"]["level"])
    kept = {k: v for k, v in info.items()
            if k in ("preprocessing", "source", "created_by", "created_at")}
    appended = [*info.get("appended", []),
                {"source": str(source), "scans": len(new), "first_row": first,
                 "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                 "by": wave_info.get("created_by")}]
    skipped = [s for s in info.get("skipped", [])
               if (s["subject"], s["session"]) not in retried] + wave_info.get("skipped", [])
    write_scan_metadata(group, layout, columns, types, affines, voxels,
                        {**kept, "skipped": skipped, "appended": appended})
    (staging / _COMPLETE).write_text("")
    # the swap: a kill between the renames is finished by the next finish_interrupted
    previous = out.with_name(out.name + OLD_SUFFIX)
    os.rename(out, previous)
    os.rename(staging, out)
    (out / _COMPLETE).unlink()
    shutil.rmtree(previous)
    return MergeReport(added=len(new), scans=len(old) + len(new), first_row=first,
                       padding_rows=first - used)


def append_cohort(source: Path, out: Path, grid, layout: ImageLayout, options: dict,
                  qc_report: bool, started: float):
    """`convert_cohort(..., append=True)`: the steps of the module doc, one process."""
    from hpcbrain.data.convert import ConversionReport, convert_cohort
    from hpcbrain.data.discover import discover_scans
    from hpcbrain.data.ledger import read_ledger
    from hpcbrain.data.preprocess import preprocessing_attrs
    from hpcbrain.run_lock import RunFolderLocked, file_lock

    try:
        with file_lock(out.with_name(out.name + ".append.lock"), f"the append to {out}",
                       "another `hpcbrain convert --append` is adding to this store; wait for "
                       "it to end"):
            existing = prepare_append(out, layout,
                                      preprocessing_attrs(options["register"], grid),
                                      options["bids_filter"])
            scans, _ = discover_scans(source, options["bids_filter"])
            new = {(s.subject, s.session) for s in scans} - existing
            wave = wave_path(out)
            if wave.exists() and {(r["subject"], r["session"]) for r in read_ledger(wave)} != new:
                shutil.rmtree(wave)          # of another source, older contents, or merged
            if not new:
                print(f"hpcbrain convert: {out} already holds every session of {source}; "
                      f"nothing appended")
                return ConversionReport(0, [], out, time.perf_counter() - started, 0)
            if not wave.exists():
                converted = convert_cohort(source, wave, grid, qc_report=False,
                                           exclude=existing, **options)
                skipped, resumed = converted.skipped, converted.resumed_shards
            else:
                skipped, resumed = [(r["path"], r["reason"]) for r in read_ledger(wave)
                                    if r["status"] != "ok"], 0
            merged = merge_wave(out, wave, source)
            shutil.rmtree(wave)
    except RunFolderLocked as exc:
        raise ConversionError(str(exc)) from None
    print(f"hpcbrain convert: appended {merged.added} scans to {out} (now {merged.scans}; "
          f"images rows from {merged.first_row}, {merged.padding_rows} empty rows before them); "
          f"its existing shard files are unchanged")
    ledger = read_ledger(out)
    qc_folder = None
    if qc_report:
        from hpcbrain.data.qc_report import write_qc_report

        qc_folder = write_qc_report(out, ledger, register=options["register"])
    return ConversionReport(n_converted=merged.added, skipped=skipped, out=out,
                            seconds=time.perf_counter() - started, resumed_shards=resumed,
                            qc_folder=qc_folder, flagged=sum(bool(r["flags"]) for r in ledger))
