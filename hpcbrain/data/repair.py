"""Re-convert a store's corrupt scans from their sources (`hpcbrain convert --repair STORE`).

A scan whose chunk fails its checksum (`hpcbrain verify` lists them) is re-made from the file it
was converted from (the `source_path` column) with the store's own recipe (shape, dtype,
registration), and its shard file is replaced whole and atomically:

1. First one scan of the shard that still reads is re-converted too and must equal the stored
   one bit for bit: if the sources or the preprocessing changed since the conversion, the
   repaired scans would not match the others, and the repair stops saying so.
2. The whole shard is written anew by zarr into a staging array beside the store
   (``STORE.repair``, the images array's metadata copied): its intact scans as stored, its
   corrupt ones re-converted (a shard whose own index is corrupt has no intact scan: all of
   them are re-converted). The corrupt file is never read. The staged shard must then read back
   whole, checksums included.
3. `os.replace` puts the staged shard over the corrupt one. A kill leaves each shard either as
   it was or repaired; the rerun starts again from what `verify` finds.

Columns, the ledger and the QC pages are left alone: the repaired scans are the scans converted
before, byte for byte.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hpcbrain.data.convert_workers import Recipe, ScanTask, _convert_one
from hpcbrain.data.store import IMAGES, CohortStore, StoreError
from hpcbrain.data.verify import unreadable_scans
from hpcbrain.run_lock import RunFolderLocked, file_lock

__all__ = ["repair_store", "RepairReport", "RepairError"]

STAGING_SUFFIX = ".repair"


class RepairError(StoreError):
    """The store cannot be repaired as asked (sources gone or changed); nothing was replaced."""


@dataclass
class RepairReport:
    store: Path
    corrupt: dict[int, str]                     # scan index -> what was wrong
    repaired: list[int] = field(default_factory=list)
    shards: list[Path] = field(default_factory=list)
    seconds: float = 0.0


def _recipe(store: CohortStore) -> Recipe:
    info = store.info
    registration = (info.get("preprocessing") or {}).get("registration")
    return Recipe(grid=store.grid, dtype=str(np.dtype(info["dtype"])),
                  register=bool(registration))


def _reconvert(store: CohortStore, recipe: Recipe, index: int) -> np.ndarray:
    source = str(store.column("source_path")[index])
    if not Path(source).is_file():
        raise RepairError(f"{store.path}: scan {index} cannot be repaired: its source {source} "
                          f"is gone. Restore it, or reconvert the store from what is left")
    volume, _, _, reason, _ = _convert_one(ScanTask(index, source), recipe)
    if reason:
        raise RepairError(f"{store.path}: scan {index} cannot be repaired: its source {source} "
                          f"no longer converts ({reason})")
    return volume


def _scans_by_shard(store: CohortStore, scans) -> dict[int, list[int]]:
    per_shard = int(store.images.shards[0]) if store.images.shards else 1
    by_shard: dict[int, list[int]] = {}
    for scan in sorted(scans):
        by_shard.setdefault(store.image_row(scan) // per_shard, []).append(scan)
    return by_shard


def repair_store(path: str | Path) -> RepairReport:
    """Scrub the store and re-convert every corrupt scan from its source (see the module doc)."""
    started = time.perf_counter()
    path = Path(os.path.abspath(Path(path).expanduser()))
    store = CohortStore(path)
    report = RepairReport(path, unreadable_scans(store))
    if not report.corrupt:
        report.seconds = time.perf_counter() - started
        return report
    lock = path.with_name(path.name + STAGING_SUFFIX + ".lock")
    try:
        with file_lock(lock, f"the repair of {path}", "another `hpcbrain convert --repair` is "
                                                      "repairing this store; wait for it to end"):
            _repair_locked(store, report)
    except RunFolderLocked as exc:
        raise RepairError(str(exc)) from None
    report.seconds = time.perf_counter() - started
    return report


def _repair_locked(store: CohortStore, report: RepairReport) -> None:
    import zarr

    recipe = _recipe(store)
    per_shard = int(store.images.shards[0]) if store.images.shards else 1
    everything = np.arange(len(store))
    scans_of_shard = _scans_by_shard(store, everything)
    staging = store.path.with_name(store.path.name + STAGING_SUFFIX)
    shutil.rmtree(staging, ignore_errors=True)          # an interrupted repair's leftovers
    (staging / IMAGES).mkdir(parents=True)
    shutil.copy2(store.path / IMAGES / "zarr.json", staging / IMAGES / "zarr.json")
    (staging / "zarr.json").write_text(json.dumps({"zarr_format": 3, "node_type": "group",
                                                   "attributes": {}}))
    try:
        for shard, bad in _scans_by_shard(store, report.corrupt).items():
            members = scans_of_shard[shard]
            good = [s for s in members if s not in report.corrupt]
            if good:                     # the recipe still makes what the store holds
                witness = good[0]
                if not np.array_equal(_reconvert(store, recipe, witness),
                                      store.read_image(witness, dtype=None)):
                    raise RepairError(
                        f"{store.path}: scan {witness}, which reads intact, converts today to "
                        f"other voxels than the store holds (its source or hpcbrain's "
                        f"preprocessing changed since the conversion): repaired scans would not "
                        f"match the rest. Reconvert the whole store instead")
            shard_file = store.shard_file(bad[0])
            staged = staging / shard_file.relative_to(store.path)
            # the whole shard anew, in one write: the intact scans as stored, the bad ones
            # re-converted (zarr never reads the corrupt file; rows no scan uses stay empty)
            images = zarr.open_array(str(staging / IMAGES), mode="r+")
            start = shard * per_shard
            block = np.zeros((min(per_shard, images.shape[0] - start), *images.shape[1:]),
                             dtype=images.dtype)
            for scan in members:
                block[store.image_row(scan) - start] = (
                    _reconvert(store, recipe, scan) if scan in report.corrupt
                    else store.read_image(scan, dtype=None))
            images[start:start + len(block)] = block
            for scan in members:         # the staged shard reads back whole, checksums too
                if not np.array_equal(images[store.image_row(scan)],
                                      block[store.image_row(scan) - start]):
                    raise RepairError(f"{staged}: scan {scan} does not read back as written")
            os.replace(staged, shard_file)
            report.shards.append(shard_file)
            report.repaired.extend(bad)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    left = unreadable_scans(CohortStore(store.path), report.repaired)
    if left:
        raise RepairError(f"{store.path}: scans {sorted(left)} still do not read after the "
                          f"repair: {next(iter(left.values()))}")
