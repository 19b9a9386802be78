"""`hpcbrain verify STORE`: scrub a whole cohort store, as ZFS scrubs a pool.

Every scan's chunk is read and its checksum verified (the crc32c each chunk carries, and its
shard's index crc32c: `store.create_images_array`), every column's length and kind checked
against the attributes, `image_row` (an appended store's) checked to point at distinct rows
inside the images array. Exit status 0: all good; 1: something is bad, listed (scan, subject,
session, shard file); 2: not a store. A store made before chunks carried checksums is read
whole (a chunk that no longer decodes is still found) and said to lack them: `hpcbrain
recompress STORE` adds them.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hpcbrain.data.store import AFFINE, IMAGE_ROW, IMAGES, CohortStore, CorruptScanError

__all__ = ["VerifyReport", "verify_store", "has_chunk_checksums", "unreadable_scans"]


@dataclass
class VerifyReport:
    store: Path
    scans: int
    corrupt: list[str] = field(default_factory=list)      # one line per bad scan
    problems: list[str] = field(default_factory=list)     # columns, attributes, image rows
    checksummed: bool = True
    seconds: float = 0.0
    bytes_read: int = 0

    @property
    def ok(self) -> bool:
        return not self.corrupt and not self.problems


def has_chunk_checksums(store: CohortStore) -> bool:
    """Whether each image chunk carries a crc32c (stores converted since December 2026)."""
    codecs = store.images.metadata.to_dict()["codecs"]
    inner = codecs[0].get("configuration", {}).get("codecs", []) if codecs else []
    return any(c.get("name") == "crc32c" for c in inner)


def _kind_ok(values: np.ndarray, declared: str) -> bool:
    if declared == "str":
        return values.dtype.kind in "OTU"
    return values.dtype == np.dtype(declared.split(" ")[0])


def verify_store(path: str | Path) -> VerifyReport:
    """Scrub the store at `path` (see the module doc)."""
    import zarr

    started = time.perf_counter()
    store = CohortStore(path)            # StoreError when it is not a complete store
    n = len(store)
    report = VerifyReport(Path(path), n, checksummed=has_chunk_checksums(store))
    info = store.info
    if info.get("n_scans") != n:
        report.problems.append(f"attributes say {info.get('n_scans')} scans, the columns hold {n}")
    group = zarr.open_group(str(path), mode="r")
    types = info.get("column_types", {})
    for name in info.get("columns", []):
        if name not in group:
            report.problems.append(f"column {name!r} is listed in the attributes but missing")
            continue
        values = group[name][...]
        if values.shape[0] != n:
            report.problems.append(f"column {name!r} holds {values.shape[0]} values for {n} scans")
        elif name != AFFINE and name in types and not _kind_ok(values, types[name]):
            report.problems.append(f"column {name!r} is {values.dtype}, the attributes say "
                                   f"{types[name]}")
    rows = store.images.shape[0]
    if IMAGE_ROW in group:
        image_rows = group[IMAGE_ROW][...]
        if image_rows.size and (image_rows.min() < 0 or image_rows.max() >= rows
                                or np.unique(image_rows).size != image_rows.size):
            report.problems.append(f"{IMAGE_ROW} points outside the {rows} image rows or twice "
                                   f"at one")
    elif rows != n:
        report.problems.append(f"{IMAGES} holds {rows} rows for {n} scans")
    bad, report.bytes_read = _scrub_images(store, range(n))
    report.corrupt.extend(bad.values())
    report.seconds = time.perf_counter() - started
    return report


def _scrub_images(store: CohortStore, indices) -> tuple[dict[int, str], int]:
    """{scan index: why} of the scans among `indices` whose image does not read back intact,
    and the bytes read."""
    bad: dict[int, str] = {}
    nbytes = 0
    for index in indices:
        index = int(index)
        try:
            nbytes += store.read_image(index, dtype=None).nbytes
        except CorruptScanError as exc:
            bad[index] = str(exc)
        except Exception as exc:  # noqa: BLE001 - a chunk that does not decode is bad too
            bad[index] = (f"scan {index}: unreadable ({type(exc).__name__}: {exc}); "
                          f"shard file {store.shard_file(index)}")
    return bad, nbytes


def unreadable_scans(store: CohortStore, indices=None) -> dict[int, str]:
    """{scan index: why} of every scan (of `indices`, default all) whose image fails its
    checksum or does not decode: what a run with data.on_corrupt_scan=skip leaves out of its
    evaluation, and what `hpcbrain convert --repair` re-converts."""
    return _scrub_images(store, range(len(store)) if indices is None else indices)[0]
