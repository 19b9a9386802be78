"""Rewrite an existing cohort store's images with another codec (`hpcbrain recompress`).

Stores converted before blosc-lz4 became the default were written with zstd; reconverting
means re-reading and re-resampling every source scan, but the stored voxels are already final,
so only the compression changes. The new store is written beside the old one
(``STORE.recompress.partial``), every shard is read back and compared bit for bit with the
original, and only then are the folders swapped: the old store is renamed away, the new one
renamed into place, the old one removed. An interruption before the swap leaves the original
untouched (the next run starts the partial over); the per-scan columns and attributes are copied
unchanged except the recorded codec.
"""
from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hpcbrain.data.store import ATTRS_KEY, IMAGES, CohortStore, ImageLayout, StoreError, create_images_array
from hpcbrain.run_lock import RunFolderLocked, file_lock

PARTIAL_SUFFIX = ".recompress.partial"
OLD_SUFFIX = ".recompress.old"


@dataclass(frozen=True)
class RecompressReport:
    store: Path
    n_scans: int
    codec: dict
    bytes_before: int
    bytes_after: int
    seconds: float


def images_bytes(store: str | Path) -> int:
    """Bytes on disk of the store's images array (the part a codec changes)."""
    root = Path(store) / IMAGES
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def recompress_store(store: str | Path, codec: str, level: int | None = None) -> RecompressReport:
    """Rewrite `store`'s images with `codec` (see `store.IMAGE_CODECS`) in place, atomically."""
    started = time.perf_counter()
    store = Path(os.path.abspath(Path(store).expanduser()))
    source = CohortStore(store)            # StoreError if it is not a readable store
    lock = store.with_name(store.name + PARTIAL_SUFFIX + ".lock")
    try:
        with file_lock(lock, f"the recompression of {store}",
                       "another `hpcbrain recompress` is rewriting this store; wait for it"):
            return _recompress_locked(source, codec, level, started)
    except RunFolderLocked as exc:
        raise StoreError(str(exc)) from None


def _copy_array(src_group, dst_group, name: str) -> None:
    src = src_group[name]
    is_text = src.dtype.kind in "OUT"          # zarr's variable-length strings read as kind T
    dst = dst_group.create_array(name, shape=src.shape, dtype=str if is_text else src.dtype,
                                 chunks=src.chunks, fill_value=None if is_text else src.fill_value)
    dst[...] = src[...]


def _recompress_locked(source: CohortStore, codec: str, level: int | None,
                       started: float) -> RecompressReport:
    import zarr

    store = source.path
    partial = store.with_name(store.name + PARTIAL_SUFFIX)
    old = store.with_name(store.name + OLD_SUFFIX)
    if old.exists():
        raise StoreError(f"{old} is left from an interrupted recompression of {store}; the store "
                         f"itself is complete: remove {old} and run again")
    if partial.exists():
        shutil.rmtree(partial)             # an interrupted run: its shards are not trusted
    images = source.images
    per_shard = int(images.shards[0]) if images.shards else 1
    layout = ImageLayout(tuple(images.shape[1:]), dtype=str(images.dtype),
                         scans_per_shard=per_shard, codec=codec, level=level)
    n = int(images.shape[0])
    src_group = zarr.open_group(str(store), mode="r")
    try:
        dst_group = zarr.open_group(str(partial), mode="w", zarr_format=3)
        new_images = create_images_array(dst_group, n, layout)
        for start in range(0, n, per_shard):
            stop = min(start + per_shard, n)
            block = images[start:stop]
            new_images[start:stop] = block
            if not np.array_equal(new_images[start:stop], block, equal_nan=True):
                raise StoreError(f"{store}: scans {start}..{stop - 1} did not read back equal "
                                 f"after recompression; the store was left as it was")
        for name in src_group.array_keys():
            if name != IMAGES:
                _copy_array(src_group, dst_group, name)
        for name in src_group.group_keys():       # the conversion ledger
            src_sub, dst_sub = src_group[name], dst_group.create_group(name)
            dst_sub.attrs.update(dict(src_sub.attrs))
            for array in src_sub.array_keys():
                _copy_array(src_sub, dst_sub, array)
        attrs = {k: v for k, v in src_group.attrs.items()}
        info = dict(attrs.get(ATTRS_KEY, {}))
        info["codec"] = layout.codec_attrs()
        info["recompressed_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        attrs[ATTRS_KEY] = info
        dst_group.attrs.update(attrs)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    before = images_bytes(store)
    os.rename(store, old)
    try:
        os.rename(partial, store)
    except BaseException:
        os.rename(old, store)              # put the original back before reporting
        raise
    shutil.rmtree(old)
    return RecompressReport(store=store, n_scans=n, codec=layout.codec_attrs(),
                            bytes_before=before, bytes_after=images_bytes(store),
                            seconds=time.perf_counter() - started)
