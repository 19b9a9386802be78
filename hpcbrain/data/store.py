"""The cohort store: one Zarr v3 group holding a whole converted cohort.

Layout (schema version 1)::

    COHORT.zarr/
      images        (N, S, S, S) float16 by default; one chunk per scan, many scans per shard
                    (parallel file systems hate millions of small files), compressed with
                    blosc-lz4 and byte shuffle by default (zstd on request; `IMAGE_CODECS`)
      subject       (N,) str      participant label, e.g. "sub-001"
      session       (N,) str      session label, e.g. "ses-01"
      age           (N,) float32  years at the scan
      affine        (N, 4, 4) float64   the source image's affine after reorientation to RAS+
      source_path   (N,) str
      image_row     (N,) int64    only in a store grown by `hpcbrain convert --append`: scan i's
                                  row of `images` (the rows of an appended wave start at a shard
                                  boundary, so the shard files already there stay as they were;
                                  the rows between read as zeros and belong to no scan)
      ...           any further per-scan column (sex, group, diagnosis, adas_cog, site, ...):
                    numeric columns as float32 with NaN for missing, text columns as str
    attributes["hpcbrain"] = {schema_version, shape, spacing_mm, dtype, codec, n_scans,
                              columns, preprocessing, skipped, created_by, [appended]}

Reading scan i with plain zarr: ``images[i]``, or ``images[image_row[i]]`` where the store has
an ``image_row`` array.

The store is opened lazily: a `CohortStore` pickles without its Zarr handle, so each DataLoader
worker opens its own after fork/spawn. `CohortStoreWriter` writes one (what `hpcbrain convert`
uses): shard by shard into a `.partial` folder, resumable, renamed into place when complete.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hpcbrain.atomic import write_text_atomic

SCHEMA_VERSION = 1
ATTRS_KEY = "hpcbrain"
IMAGES = "images"
IMAGE_ROW = "image_row"
REQUIRED_COLUMNS = ("subject", "session", "age")


class StoreError(ValueError):
    """A cohort store is missing, incomplete or of an unknown schema."""


class CorruptScanError(StoreError):
    """A scan's bytes changed at rest: its chunk (or its shard's index) fails its checksum.
    `scan`: its index in the store (None when not known)."""

    def __init__(self, message: str, scan: int | None = None):
        super().__init__(message)
        self.scan = scan


# The images array's compressor. Both are in zarr v3's core codecs, so a store stays readable
# with plain zarr. blosc-lz4 with byte shuffle (float16's high bytes, which vary slowly, grouped
# before lz4) decodes several times faster than zstd for 15-30 % more bytes (bench/io_bench.py):
# reading, not disk space, is what feeds the GPU. zstd keeps the smallest stores (archives, slow
# file systems).
IMAGE_CODECS = ("blosc-lz4", "zstd")
DEFAULT_CODEC = "blosc-lz4"
DEFAULT_LEVELS = {"blosc-lz4": 5, "zstd": 3}


@dataclass(frozen=True)
class ImageLayout:
    """How the images array is chunked and compressed."""

    shape: tuple[int, int, int]
    dtype: str = "float16"
    scans_per_shard: int = 16
    codec: str = DEFAULT_CODEC
    level: int | None = None           # None: DEFAULT_LEVELS[codec]

    def __post_init__(self):
        if self.codec not in IMAGE_CODECS:
            raise ValueError(f"unknown image codec {self.codec!r}; choose one of "
                             f"{', '.join(IMAGE_CODECS)}")

    @property
    def codec_level(self) -> int:
        return DEFAULT_LEVELS[self.codec] if self.level is None else int(self.level)

    def codec_attrs(self) -> dict[str, Any]:
        """What the store's attributes record about the compression."""
        return {"name": self.codec, "level": self.codec_level}

    def compressor(self):
        import zarr.codecs

        if self.codec == "zstd":
            return zarr.codecs.ZstdCodec(level=self.codec_level)
        return zarr.codecs.BloscCodec(cname="lz4", clevel=self.codec_level, shuffle="shuffle",
                                      typesize=np.dtype(self.dtype).itemsize)


def create_images_array(group, n_scans: int, layout: ImageLayout):
    """Create the (N, S, S, S) images array: one chunk per scan, `scans_per_shard` per shard file,
    each chunk compressed and then checksummed (zarr v3's crc32c codec, last in the chunk's
    chain: every reader, zarr's and `shard_reader`'s, verifies it, so a byte flipped at rest
    stops the read instead of training on garbage)."""
    import zarr.codecs

    per_shard = max(1, min(layout.scans_per_shard, n_scans))
    return group.create_array(
        IMAGES,
        shape=(n_scans, *layout.shape),
        dtype=layout.dtype,
        chunks=(1, *layout.shape),
        shards=(per_shard, *layout.shape),
        compressors=[layout.compressor(), zarr.codecs.Crc32cCodec()],
        fill_value=0,
        overwrite=True,
    )


def write_columns(group, columns: dict[str, np.ndarray]) -> None:
    """Write per-scan metadata columns as 1-D (or N×4×4 for affines) arrays."""
    for name, values in columns.items():
        values = np.asarray(values)
        if values.dtype.kind in "OUT":
            # zarr's variable-length UTF-8 type: fixed-width <U arrays have no Zarr v3 spec.
            array = group.create_array(name, shape=values.shape, dtype=str, overwrite=True)
            array[...] = values.astype(str)
        else:
            if values.dtype.kind in "iub" and name not in ("affine", IMAGE_ROW):
                values = values.astype(np.float32)
            array = group.create_array(name, shape=values.shape, dtype=values.dtype,
                                       overwrite=True)
            array[...] = values


def cast_volume(volume: np.ndarray, dtype: Any) -> np.ndarray:
    """`volume` as `dtype`. float16 → float32 goes through torch, whose F16C-vectorised
    conversion runs ~3-10x faster than numpy's on one thread (bench/io_bench.py)."""
    dtype = np.dtype(dtype)
    if volume.dtype == dtype:
        return volume
    if volume.dtype == np.float16 and dtype == np.float32:
        import torch

        out = torch.empty(volume.shape, dtype=torch.float32)
        out.copy_(torch.from_numpy(np.ascontiguousarray(volume)))
        return out.numpy()
    return volume.astype(dtype)


class CohortStore:
    """Read access to a cohort store; cheap to pickle into DataLoader workers."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._group = None
        self._images = None
        self._image_rows: np.ndarray | None = None   # appended stores: scan → images row
        self._metadata = None
        self._info: dict[str, Any] | None = None
        self._fast_read = None   # see shard_reader.py; None until first read, False if unusable
        self._check()

    # --- opening -------------------------------------------------------------------------
    def _open(self):
        if self._group is None:
            import zarr

            self._group = zarr.open_group(str(self.path), mode="r")
            self._images = self._group[IMAGES]
            if IMAGE_ROW in self._group:
                self._image_rows = np.asarray(self._group[IMAGE_ROW][...], dtype=np.int64)
        return self._group

    def _check(self) -> None:
        if not self.path.exists():
            raise StoreError(f"cohort store {self.path} does not exist: build it with "
                             f"`hpcbrain convert SRC --out {self.path} --shape S`")
        try:
            group = self._open()
        except Exception as exc:  # zarr raises several types for a folder that is not a group
            raise StoreError(f"{self.path} is not a Zarr group ({exc}); rebuild it with "
                             f"`hpcbrain convert`") from exc
        info = dict(group.attrs.get(ATTRS_KEY, {}))
        version = info.get("schema_version")
        if version != SCHEMA_VERSION:
            raise StoreError(f"{self.path}: cohort store schema version {version!r}, this "
                             f"hpcbrain reads version {SCHEMA_VERSION}; reconvert the cohort")
        missing = [c for c in (IMAGES, *REQUIRED_COLUMNS) if c not in group]
        if missing:
            raise StoreError(f"{self.path}: store lacks arrays {missing}; reconvert the cohort")
        self._info = info

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_group"] = None  # every process opens its own handle
        state["_images"] = None
        state["_fast_read"] = None
        return state

    # --- contents ------------------------------------------------------------------------
    @property
    def info(self) -> dict[str, Any]:
        """The store's `hpcbrain` attributes (schema version, shape, preprocessing, skipped)."""
        return dict(self._info or {})

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.info["shape"])

    @property
    def grid(self):
        """The `VolumeGrid` its volumes were sampled on (recorded with the preprocessing; a
        store without a record is a field-of-view grid of its shape)."""
        from hpcbrain.volume_grid import VolumeGrid

        return VolumeGrid.from_attrs((self.info.get("preprocessing") or {}).get("grid"),
                                     self.shape)

    @property
    def images(self):
        self._open()
        return self._images

    def __len__(self) -> int:
        self._open()
        if self._image_rows is not None:
            return int(self._image_rows.size)
        return int(self._images.shape[0])

    def image_row(self, index: int) -> int:
        """The row of the images array that holds scan `index` (the same number except in an
        appended store)."""
        self._open()
        return int(index) if self._image_rows is None else int(self._image_rows[index])

    def read_image(self, index: int, dtype: Any = np.float32) -> np.ndarray:
        """One scan (S, S, S) as `dtype` (float32 by default; None: the stored dtype, e.g.
        float16 to cast on the training device)."""
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"{self.path}: scan {index} out of range (0..{len(self) - 1})")
        if self._fast_read is None:
            from hpcbrain.data.shard_reader import open_fast_reader

            self._fast_read = open_fast_reader(self.path / IMAGES) or False
        row = self.image_row(index)
        try:
            if self._fast_read:
                return self._fast_read(row, dtype)
            volume = self.images[row]
        except ValueError as exc:
            if "checksum" not in str(exc) and "crc32c" not in str(exc):
                raise
            raise self._corrupt(index, row, exc) from None
        return volume if dtype is None else cast_volume(volume, dtype)

    def shard_file(self, index: int) -> Path:
        """The shard file that holds scan `index`'s chunk."""
        images = self.images
        per_shard = int(images.shards[0]) if images.shards else 1
        rest = "/".join("0" * len(images.shape[1:]))
        return self.path / IMAGES / "c" / str(self.image_row(index) // per_shard) / rest

    def _corrupt(self, index: int, row: int, exc: Exception) -> CorruptScanError:
        try:
            who = f"{self.column('subject')[index]} {self.column('session')[index]}"
        except Exception:  # noqa: BLE001 - the message must not fail on a broken column
            who = "subject and session unreadable"
        return CorruptScanError(
            f"{self.path}: scan {index} ({who}) is corrupt: its bytes in shard file "
            f"{self.shard_file(index)} changed at rest ({exc}). Check the whole store with "
            f"`hpcbrain verify {self.path}` and repair it from the sources with `hpcbrain "
            f"convert --repair {self.path}`, or train on without the bad scans with "
            f"data.on_corrupt_scan=skip", scan=int(index))

    def column(self, name: str) -> np.ndarray:
        group = self._open()
        if name not in group:
            raise KeyError(f"{self.path}: no per-scan column {name!r}; have {self.columns}")
        values = group[name][...]
        if values.dtype.kind == "T":  # numpy StringDType from zarr's string type
            values = values.astype(object)
        return values

    @property
    def columns(self) -> list[str]:
        group = self._open()
        return sorted(name for name in group.array_keys()
                      if name not in (IMAGES, "affine", IMAGE_ROW))

    @property
    def metadata(self):
        """All 1-D per-scan columns as a pandas DataFrame, row i = scan i."""
        if self._metadata is None:
            import pandas as pd

            self._metadata = pd.DataFrame({name: self.column(name) for name in self.columns})
        return self._metadata


def open_cohort_store(path: str | Path) -> CohortStore:
    return CohortStore(path)


def write_scan_metadata(group, layout: ImageLayout, columns: dict[str, np.ndarray],
                        types: dict[str, str], affines: np.ndarray, voxels: np.ndarray,
                        attrs: dict[str, Any]) -> dict[str, Any]:
    """The per-scan `columns` with the `affines` and output `voxels` sizes, and the store's
    attributes (what `attrs` adds after the layout's own), into a group whose images are
    final — what every writer of a store (`CohortStoreWriter`, the conversion in blocks)
    finishes with. Returns the attributes as stored."""
    images = group[IMAGES]
    voxels = np.asarray(voxels, dtype=np.float32)
    columns = {**columns, AFFINE: np.asarray(affines), VOXEL_SIZE: voxels}
    types = {**types, AFFINE: "float64 (4, 4)", VOXEL_SIZE: "float32"}
    write_columns(group, columns)
    # isotropic output voxels; null when scans differ in field of view (see voxel_size_mm)
    spacing = [float(voxels[0])] * 3 if np.allclose(voxels, voxels[0], rtol=1e-5) else None
    attrs = {"schema_version": SCHEMA_VERSION, "shape": list(images.shape[1:]),
             "spacing_mm": spacing, "dtype": str(images.dtype), "codec": layout.codec_attrs(),
             "n_scans": int(len(affines)),
             "scans_per_shard": int(images.shards[0]) if images.shards else 1,
             "columns": list(columns), "column_types": types, **attrs}
    group.attrs[ATTRS_KEY] = attrs
    return attrs


AFFINE = "affine"
VOXEL_SIZE = "voxel_size_mm"
PROGRESS_FILE = "hpcbrain_progress.json"


class CohortStoreWriter:
    """Writes a cohort store into `partial` (a `.partial` folder beside the final path) whole
    shards at a time, recording after each how far it got in ``PROGRESS_FILE`` with the caller's
    `state` (a JSON-ready dict: ``written`` scans and ``shards`` so far, plus whatever the
    caller keeps there, e.g. its fingerprint and progress through its inputs).

        writer = CohortStoreWriter(partial, n_scans, layout, state)
        writer.append(volume, affine, voxel_mm)     # flushes by itself at every full shard
        writer.flush(); writer.finalise(out, columns, types, attrs)

    A writer over an existing `partial` (a resumed conversion) continues after its last
    recorded shard and first drops whatever a killed run left of later shards (zarr reads an
    existing shard file before writing into it).
    """

    def __init__(self, partial: Path, n_scans: int, layout: ImageLayout, state: dict,
                 before_progress=None):
        self.partial = Path(partial)
        self.n_scans = int(n_scans)
        self.layout = layout
        self.state = state
        #: called with the progress about to be recorded after a shard is written, before it
        #: is: what the caller keeps beside each shard (the conversion ledger) is then on disk
        #: whenever the progress says the shard is done
        self.before_progress = before_progress
        state.setdefault("written", 0)
        state.setdefault("shards", [])
        self._group = None
        self._buffer: list[tuple[np.ndarray, np.ndarray, float]] = []

    @property
    def per_shard(self) -> int:
        return self.layout.scans_per_shard

    def open(self):
        """The partial store's group: created, or reopened past its last recorded shard.
        Called by the first write; a caller that puts files of its own into the partial folder
        (the workers' QC figures) calls it first."""
        import zarr

        if self._group is not None:
            return self._group
        if self.partial.exists():
            self._group = zarr.open_group(str(self.partial), mode="r+")
            first = -(-self.state["written"] // self.per_shard)  # ceil: a short last shard counts
            for shard_dir in (self.partial / IMAGES / "c").glob("*"):
                if shard_dir.name.isdigit() and int(shard_dir.name) >= first:
                    shutil.rmtree(shard_dir)
        else:
            group = zarr.open_group(str(self.partial), mode="w", zarr_format=3)
            create_images_array(group, self.n_scans, self.layout)
            chunk = max(self.per_shard, 1024)
            group.create_array(AFFINE, shape=(self.n_scans, 4, 4), dtype="float64",
                               chunks=(chunk, 4, 4), fill_value=0)
            group.create_array(VOXEL_SIZE, shape=(self.n_scans,), dtype="float32",
                               chunks=(chunk,), fill_value=0)
            self._group = group
            self.save_progress()
        return self._group

    def save_progress(self, **updates: Any) -> None:
        self.state.update(updates)
        write_text_atomic(self.partial / PROGRESS_FILE, json.dumps(self.state))

    def append(self, volume: np.ndarray, affine: np.ndarray, voxel_mm: float,
               **progress: Any) -> None:
        """One scan; at a full shard the buffer is written and `progress` recorded with it."""
        self._buffer.append((volume, affine, float(voxel_mm)))
        if len(self._buffer) == self.per_shard:
            self.flush(**progress)

    def flush(self, **progress: Any) -> None:
        """Write the buffered scans (a whole or a last, short shard) and record `progress`."""
        if not self._buffer:
            return
        group = self.open()
        start = self.state["written"]
        stop = start + len(self._buffer)
        group[IMAGES][start:stop] = np.stack([b[0] for b in self._buffer])
        group[AFFINE][start:stop] = np.stack([b[1] for b in self._buffer])
        group[VOXEL_SIZE][start:stop] = np.array([b[2] for b in self._buffer], dtype=np.float32)
        self.state["shards"].append(start // self.per_shard)
        self.state["written"] = stop
        self._buffer.clear()
        if self.before_progress is not None:
            self.before_progress(progress)
        self.save_progress(**progress)

    def finalise(self, out: Path, columns: dict[str, np.ndarray], types: dict[str, str],
                 attrs: dict[str, Any], extra=None) -> dict[str, Any]:
        """Trim to the scans written, add the per-scan `columns` (with the affines and voxel
        sizes written so far) and the attributes, call `extra(group)` (what else the caller
        keeps in the store, e.g. the ledger), then rename `partial` to `out`. Returns the
        attributes as stored."""
        group = self.open()
        if extra is not None:
            extra(group)
        n = self.state["written"]
        images = group[IMAGES]
        if images.shape[0] != n:
            images.resize((n, *images.shape[1:]))
        attrs = write_scan_metadata(group, self.layout, columns, types,
                                    np.asarray(group[AFFINE][:n]), group[VOXEL_SIZE][:n], attrs)
        (self.partial / PROGRESS_FILE).unlink(missing_ok=True)
        if Path(out).exists():
            raise FileExistsError(f"{out} appeared while converting; the finished store is left "
                                  f"at {self.partial}")
        os.rename(self.partial, out)
        return attrs
