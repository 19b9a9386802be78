"""A fast path for reading one scan out of the images array's shard files.

zarr 3.1 spends ~2.5 ms of async/thread machinery on reading one chunk out of a shard at 64³,
several times the cost of the zstd decode itself (bench/io_bench.py measures it). The layout
the converter writes is fixed and simple (Zarr v3 `sharding_indexed`, index at the end of the
shard file, inner codecs bytes + zstd), so for that exact layout we read the shard index and
the chunk ourselves. Any other layout returns None from `open_fast_reader`, and the caller
falls back to zarr: correctness never depends on this module.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import numpy as np

_EMPTY = np.uint64(0xFFFFFFFFFFFFFFFF)  # the sharding spec's marker for a chunk never written
_CRC32C_BYTES = 4


def _layout(meta: dict) -> tuple[int, list[int], np.dtype, str, float] | None:
    """(scans per shard, volume shape, dtype, key separator, fill) when we can read it."""
    try:
        (codec,) = meta["codecs"]
        conf = codec["configuration"]
        inner = [c["name"] for c in conf["codecs"]]
        index = [c["name"] for c in conf["index_codecs"]]
        if (codec["name"] != "sharding_indexed" or conf["index_location"] != "end"
                or inner != ["bytes", "zstd"] or index != ["bytes", "crc32c"]
                or meta["chunk_key_encoding"]["name"] != "default"):
            return None
        chunk = conf["chunk_shape"]
        shape = meta["shape"]
        if chunk[0] != 1 or list(chunk[1:]) != list(shape[1:]):
            return None  # one chunk per scan is what makes a chunk == a volume
        for c in conf["codecs"]:
            if c["name"] == "bytes" and c.get("configuration", {}).get("endian", "little") != "little":
                return None
        separator = meta["chunk_key_encoding"].get("configuration", {}).get("separator", "/")
        per_shard = int(meta["chunk_grid"]["configuration"]["chunk_shape"][0])
        dtype = np.dtype(meta["data_type"]).newbyteorder("<")
        return per_shard, list(shape[1:]), dtype, separator, float(meta.get("fill_value", 0))
    except (KeyError, TypeError, ValueError):
        return None


def open_fast_reader(array_dir: Path) -> Callable[[int], np.ndarray] | None:
    """A function scan index -> float32 volume for `array_dir`, or None if the layout differs."""
    try:
        meta = json.loads((Path(array_dir) / "zarr.json").read_text())
    except (OSError, ValueError):
        return None
    layout = _layout(meta)
    if layout is None:
        return None
    per_shard, volume_shape, dtype, separator, fill = layout
    import numcodecs

    zstd = numcodecs.Zstd()
    index_bytes = 16 * per_shard
    trailing = separator.join(["0"] * len(volume_shape))

    def read(i: int) -> np.ndarray:
        shard, k = divmod(int(i), per_shard)
        path = Path(array_dir) / f"c{separator}{shard}{separator}{trailing}"
        try:
            handle = open(path, "rb")
        except FileNotFoundError:  # a shard never written holds fill values, as in zarr
            return np.full(volume_shape, fill, dtype=np.float32)
        with handle:
            handle.seek(-(index_bytes + _CRC32C_BYTES), os.SEEK_END)
            offset, nbytes = np.frombuffer(handle.read(index_bytes), "<u8").reshape(-1, 2)[k]
            if offset == _EMPTY:
                return np.full(volume_shape, fill, dtype=np.float32)
            handle.seek(int(offset))
            raw = zstd.decode(handle.read(int(nbytes)))
        return np.frombuffer(raw, dtype).reshape(volume_shape).astype(np.float32)

    return read
