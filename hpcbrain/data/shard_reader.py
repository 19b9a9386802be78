"""A fast path for reading one scan out of the images array's shard files.

zarr 3.1 spends ~2.5 ms of async/thread machinery on reading one chunk out of a shard at 64³,
several times the cost of decoding it (bench/io_bench.py measures it). The layout the converter
writes is fixed and simple (Zarr v3 `sharding_indexed`, index at the end of the shard file,
inner codecs bytes + blosc or bytes + zstd, then crc32c in stores since December 2026), so for
that exact layout we read the shard index and the chunk ourselves, verify their checksums as
zarr would (`ChecksumMismatch`), and decode straight into the output array. Any other layout
returns None from `open_fast_reader`, and the caller falls back to zarr: correctness never
depends on this module.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

import google_crc32c  # zarr's own crc32c (a zarr dependency); the C implementation
import numpy as np

_EMPTY = np.uint64(0xFFFFFFFFFFFFFFFF)  # the sharding spec's marker for a chunk never written
_CRC32C_BYTES = 4


class ChecksumMismatch(ValueError):
    """A shard index or a chunk whose bytes no longer match their crc32c: changed at rest."""


#: crc32c of any message followed by its own crc32c (little-endian): the check needs no slicing
_CRC32C_RESIDUE = 0x48674BC7


def _read_checked(handle, nbytes: int, what: str) -> memoryview:
    """The next `nbytes` of `handle`, whose last 4 are the little-endian crc32c of the rest;
    the rest, as a view: one read, one crc over all of it (a message with its crc appended
    checks to `_CRC32C_RESIDUE`), no copy of a chunk to strip its checksum."""
    data = handle.read(nbytes)
    if google_crc32c.value(data) != _CRC32C_RESIDUE:
        raise ChecksumMismatch(f"{what}: stored and computed crc32c differ")
    return memoryview(data)[:-_CRC32C_BYTES]


def _layout(meta: dict) -> tuple[int, list[int], np.dtype, str, float, str, bool] | None:
    """(scans per shard, volume shape, dtype, key separator, fill, compressor name, whether each
    chunk carries a crc32c) when we can read it."""
    try:
        (codec,) = meta["codecs"]
        conf = codec["configuration"]
        inner = [c["name"] for c in conf["codecs"]]
        index = [c["name"] for c in conf["index_codecs"]]
        checksummed = inner[2:] == ["crc32c"]
        if (codec["name"] != "sharding_indexed" or conf["index_location"] != "end"
                or len(inner) != 2 + checksummed or inner[0] != "bytes"
                or inner[1] not in _DECODERS or index != ["bytes", "crc32c"]
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
        return (per_shard, list(shape[1:]), dtype, separator, float(meta.get("fill_value", 0)),
                inner[1], checksummed)
    except (KeyError, TypeError, ValueError):
        return None


def _zstd():
    import numcodecs

    return numcodecs.Zstd()


def _blosc():
    import numcodecs

    return numcodecs.Blosc()  # a blosc frame carries its own compressor, level and shuffle


# inner compressor name in zarr.json -> a numcodecs codec whose decode(src, out) fills `out`
_DECODERS: dict[str, Callable] = {"zstd": _zstd, "blosc": _blosc}


def open_fast_reader(array_dir: Path) -> Callable[[int, Any], np.ndarray] | None:
    """A function (scan index, dtype) -> volume for `array_dir` (dtype None: as stored), or
    None if the layout differs."""
    try:
        meta = json.loads((Path(array_dir) / "zarr.json").read_text())
    except (OSError, ValueError):
        return None
    layout = _layout(meta)
    if layout is None:
        return None
    per_shard, volume_shape, dtype, separator, fill, compressor, checksummed = layout
    from hpcbrain.data.store import cast_volume

    decoder = _DECODERS[compressor]()
    index_bytes = 16 * per_shard
    trailing = separator.join(["0"] * len(volume_shape))

    def read(i: int, out_dtype: Any = np.float32) -> np.ndarray:
        shard, k = divmod(int(i), per_shard)
        path = Path(array_dir) / f"c{separator}{shard}{separator}{trailing}"
        fill_dtype = dtype if out_dtype is None else out_dtype
        try:
            handle = open(path, "rb")
        except FileNotFoundError:  # a shard never written holds fill values, as in zarr
            return np.full(volume_shape, fill, dtype=fill_dtype)
        with handle:
            handle.seek(-(index_bytes + _CRC32C_BYTES), os.SEEK_END)
            index = _read_checked(handle, index_bytes + _CRC32C_BYTES,
                                  f"the index of shard file {path}")
            offset, nbytes = np.frombuffer(index, "<u8").reshape(-1, 2)[k]
            if offset == _EMPTY:
                return np.full(volume_shape, fill, dtype=fill_dtype)
            handle.seek(int(offset))
            encoded = (_read_checked(handle, int(nbytes), f"chunk {k} of shard file {path}")
                       if checksummed else handle.read(int(nbytes)))
        volume = np.empty(volume_shape, dtype)
        decoder.decode(encoded, out=volume)
        return volume if out_dtype is None else cast_volume(volume, out_dtype)

    return read
