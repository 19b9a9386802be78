"""A conversion split into blocks that separate processes (Slurm array tasks) run, then one
assembling step: the same store as `convert_cohort` in one process, however many blocks.

    plan = plan_conversion(source, out, shape, tasks=8)     # once: discover, stage, block
    convert_block(plan, k)                                  # in task k (any order, in parallel)
    finish_conversion(plan)                                 # once all blocks are done

**Staging.** `plan_conversion` creates ``OUT.partial`` with the images array sized for every
*candidate* scan (those whose metadata is good) and splits its shards into contiguous blocks.
Block k writes only its own shard files and, after each shard, a marker
(``blocks/NNNNNN.npz``: the shard's affines, voxel sizes and ledger entries) — the one record
that the shard is complete. A block killed mid-way (a task killed, a node lost, `scancel`) is
redone from its first shard without a marker; rerunning the same command finds the same plan
(the inputs' fingerprint) and leaves finished shards alone.

**Assembling.** `finish_conversion` checks that every shard has its marker, then builds the
store exactly as the one-process conversion would: when no scan failed, the staged shards are
already the store's (candidate row = store row); when some did (``skip_bad``), the good scans
are packed in order into a fresh images array — shards before the first failed scan are copied
byte for byte, later ones re-encoded (the codec is deterministic) — and swapped in. Then the
columns, attributes, ledger and QC pages, and the atomic rename to ``OUT``.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from hpcbrain.atomic import atomic_write, write_text_atomic
from hpcbrain.data.append import NothingToAppend, prepare_append, stored_sessions, wave_path
from hpcbrain.data.convert_records import (
    build_columns,
    describe_bad,
    hpcbrain_version,
    inputs_fingerprint,
    refuse_existing,
)
from hpcbrain.data.discover import ConversionError, discover_scans
from hpcbrain.data.ledger import ledger_rows, write_ledger_group
from hpcbrain.data.preprocess import preprocessing_attrs
from hpcbrain.data.qc_report import DRAWN_FIGURES
from hpcbrain.data.store import (
    DEFAULT_CODEC,
    IMAGES,
    ImageLayout,
    create_images_array,
    write_scan_metadata,
)
from hpcbrain.volume_grid import VolumeGrid, as_shape

__all__ = ["BlockPlan", "plan_conversion", "convert_block", "finish_conversion",
           "unfinished_blocks", "unfinished_shards", "PLAN_FILE"]

PLAN_FILE = "hpcbrain_blocks.json"
_MARKERS = "blocks"


@dataclass(frozen=True)
class BlockPlan:
    """What every task and the assembling step need (JSON in ``OUT.partial/PLAN_FILE``)."""

    source: str
    out: str
    grid: dict                         # VolumeGrid.attrs() of the store's volumes
    dtype: str
    scans_per_shard: int
    codec: str
    codec_level: int | None
    register: bool
    bids_filter: str | None
    skip_bad: bool
    fingerprint: str
    n_candidates: int
    blocks: list                       # [first shard, last shard + 1] per block
    append_to: str | None = None       # --append: the store the converted wave is merged into
                                       # (`out` is then the wave, ``hpcbrain.data.append``)

    def excluded(self) -> frozenset[tuple[str, str]]:
        """The (subject, session) pairs the conversion leaves out: an append's store's."""
        if self.append_to is None:
            return frozenset()
        return frozenset(stored_sessions(Path(self.append_to)))

    @property
    def partial(self) -> Path:
        return Path(self.out + ".partial")

    @property
    def volume_grid(self) -> VolumeGrid:
        return VolumeGrid.from_attrs(self.grid, self.grid["shape"])

    @property
    def layout(self) -> ImageLayout:
        return ImageLayout(self.volume_grid.shape, dtype=self.dtype,
                           scans_per_shard=self.scans_per_shard, codec=self.codec,
                           level=self.codec_level)

    def shard_rows(self, shard: int) -> range:
        start = shard * self.scans_per_shard
        return range(start, min(start + self.scans_per_shard, self.n_candidates))


def _discover(source: Path, bids_filter: str | None,
              exclude: frozenset[tuple[str, str]] = frozenset()):
    scans, fmt = discover_scans(source, bids_filter)
    scans = [s for s in scans if (s.subject, s.session) not in exclude]
    if not scans:
        if exclude:
            raise NothingToAppend(f"the store already holds every session of {source}; "
                                  f"nothing to append")
        raise ConversionError(f"no T1w images found in {source}")
    candidates = [i for i, s in enumerate(scans) if not s.problems]
    return scans, fmt, candidates


def plan_conversion(source: str | Path, out: str | Path, shape: int | Sequence[int] | VolumeGrid,
                    *, tasks: int,
                    skip_bad: bool = False, dtype: str = "float16", scans_per_shard: int = 16,
                    codec: str = DEFAULT_CODEC, codec_level: int | None = None,
                    register: bool = False, bids_filter: str | None = None,
                    append: bool = False) -> BlockPlan:
    """Discover the scans and stage ``OUT.partial`` (or find the staging of an earlier run of
    the same command); the plan splits the shards into at most `tasks` blocks. `append`: the
    sessions the existing store `out` lacks, staged as a wave (``OUT.wave.partial``) that
    `finish_conversion` merges into it."""
    out = Path(os.path.abspath(Path(out).expanduser()))
    source = Path(os.path.abspath(Path(source).expanduser()))
    try:
        grid = shape if isinstance(shape, VolumeGrid) else VolumeGrid(as_shape(shape))
    except ValueError as exc:
        raise ConversionError(str(exc)) from None
    preprocessing = preprocessing_attrs(register, grid)
    append_to, exclude = None, frozenset()
    if append:
        layout = ImageLayout(grid.shape, dtype=np.dtype(dtype).name, codec=codec,
                             level=codec_level)
        exclude = prepare_append(out, layout, preprocessing, bids_filter)
        append_to, out = str(out), wave_path(out)
    refuse_existing(out)
    try:
        scans, _, candidates = _discover(source, bids_filter, exclude)
    except NothingToAppend:
        # a merge that ended before its wave's staging was removed leaves it behind
        shutil.rmtree(Path(str(out) + ".partial"), ignore_errors=True)
        raise
    bad = [(str(s.path), s.subject, s.session, "; ".join(s.problems))
           for s in scans if s.problems]
    if bad and not skip_bad:
        raise ConversionError(describe_bad(bad, len(scans)), bad)
    if not candidates:
        raise ConversionError(f"nothing left to convert: all {len(scans)} scans are bad")
    per_shard = max(1, min(int(scans_per_shard), len(candidates)))
    try:
        layout = ImageLayout(grid.shape, dtype=np.dtype(dtype).name,
                             scans_per_shard=per_shard, codec=codec, level=codec_level)
    except ValueError as exc:
        raise ConversionError(str(exc)) from None
    fingerprint = inputs_fingerprint(scans, grid.fingerprint(), layout, preprocessing)
    n_shards = -(-len(candidates) // per_shard)
    n_blocks = max(1, min(int(tasks), n_shards))     # sizes differ by at most one shard
    bounds = [k * n_shards // n_blocks for k in range(n_blocks + 1)]
    blocks = [[a, b] for a, b in zip(bounds, bounds[1:])]
    plan = BlockPlan(str(source), str(out), grid.attrs(), layout.dtype, per_shard, codec,
                     codec_level, bool(register), bids_filter, bool(skip_bad), fingerprint,
                     len(candidates), blocks, append_to)
    partial = plan.partial
    if partial.exists():
        try:
            earlier = json.loads((partial / PLAN_FILE).read_text())
        except (OSError, ValueError):
            earlier = {}
        if earlier.get("fingerprint") == fingerprint and earlier.get("blocks") == blocks:
            try:
                return BlockPlan(**earlier)
            except TypeError:        # a plan written by an hpcbrain before grids: plan again
                pass
        print(f"hpcbrain convert: {partial} was left by an earlier conversion with other "
              f"inputs, settings or blocks: starting over", file=sys.stderr)
        shutil.rmtree(partial)
    import zarr

    staging = partial.with_name(partial.name + f".staging-{os.getpid()}")
    group = zarr.open_group(str(staging), mode="w", zarr_format=3)
    create_images_array(group, len(candidates), layout)
    (staging / _MARKERS).mkdir()
    write_text_atomic(staging / PLAN_FILE, json.dumps(asdict(plan), indent=1))
    os.rename(staging, partial)         # the staging appears whole or not at all
    return plan


def _marker(plan: BlockPlan, shard: int) -> Path:
    return plan.partial / _MARKERS / f"{shard:06d}.npz"


def unfinished_shards(plan: BlockPlan, block: int) -> list[int]:
    """The shards of `block` still to write."""
    first, stop = plan.blocks[block]
    return [s for s in range(first, stop) if not _marker(plan, s).is_file()]


def unfinished_blocks(plan: BlockPlan) -> list[int]:
    """The blocks with a shard still to write."""
    return [k for k in range(len(plan.blocks)) if unfinished_shards(plan, k)]


def convert_block(plan: BlockPlan, block: int, workers: int = 1) -> int:
    """Convert block `block`'s unfinished shards; returns how many shards it wrote."""
    import zarr

    from hpcbrain.data.convert_workers import Recipe, convert_in_order, scan_tasks

    scans, _, candidates = _discover(Path(plan.source), plan.bids_filter, plan.excluded())
    if len(candidates) != plan.n_candidates:
        raise ConversionError(f"{plan.source} changed since the conversion was planned "
                              f"({len(candidates)} scans to convert, the plan has "
                              f"{plan.n_candidates}); rerun the command to plan it again")
    images = zarr.open_group(str(plan.partial), mode="r+")[IMAGES]
    recipe = Recipe(plan.volume_grid, plan.dtype, plan.register)
    first, stop = plan.blocks[block]
    written = 0
    for shard in range(first, stop):
        if _marker(plan, shard).is_file():
            continue
        rows = plan.shard_rows(shard)
        tasks = scan_tasks(scans, [candidates[r] for r in rows], plan.partial / DRAWN_FIGURES)
        volumes = np.zeros((len(rows), *images.shape[1:]), dtype=images.dtype)
        affines = np.zeros((len(rows), 4, 4))
        voxels = np.zeros(len(rows), dtype=np.float32)
        entries = []
        for k, (index, (volume, affine, vox, reason, entry)) in enumerate(
                convert_in_order(tasks, recipe, workers)):
            entries.append({"index": index, **entry, "reason": reason})
            if reason is None:
                volumes[k], affines[k], voxels[k] = volume, affine, vox
        # a failed scan's slot holds zeros here; the assembling step packs the good ones
        images[rows.start:rows.stop] = volumes
        with atomic_write(_marker(plan, shard), "wb") as handle:
            np.savez(handle, affines=affines, voxels=voxels,
                     entries=np.frombuffer(json.dumps(entries).encode(), dtype=np.uint8))
        written += 1
    return written


def _read_markers(plan: BlockPlan):
    affines = np.zeros((plan.n_candidates, 4, 4))
    voxels = np.zeros(plan.n_candidates, dtype=np.float32)
    entries: dict[int, dict] = {}
    missing = []
    for shard in range(plan.blocks[-1][1]):
        path = _marker(plan, shard)
        if not path.is_file():
            missing.append(shard)
            continue
        rows = plan.shard_rows(shard)
        with np.load(path) as marker:
            affines[rows.start:rows.stop] = marker["affines"]
            voxels[rows.start:rows.stop] = marker["voxels"]
            for entry in json.loads(marker["entries"].tobytes().decode()):
                entries[int(entry["index"])] = entry
    return affines, voxels, entries, missing


def _pack_good_rows(plan: BlockPlan, good_rows: list[int]) -> None:
    """Replace the staged images by the good rows only, in order (see the module doc). Built
    in a scratch group and swapped in; an interrupted swap is undone by the next call."""
    import zarr

    partial, per_shard = plan.partial, plan.scans_per_shard
    kept = partial / (IMAGES + ".staged")
    staged = zarr.open_group(str(partial), mode="r")[IMAGES]
    good = set(good_rows)
    first_bad = next((r for r in range(plan.n_candidates) if r not in good), plan.n_candidates)
    scratch_dir = partial / "packing.zarr"
    shutil.rmtree(scratch_dir, ignore_errors=True)
    scratch = zarr.open_group(str(scratch_dir), mode="w", zarr_format=3)
    packed = create_images_array(scratch, plan.n_candidates, plan.layout)
    whole = first_bad // per_shard                   # shards before the first failure: as is
    for shard in range(whole):
        shutil.copytree(partial / IMAGES / "c" / str(shard),
                        scratch_dir / IMAGES / "c" / str(shard))
    for start in range(whole * per_shard, len(good_rows), per_shard):
        rows = good_rows[start:start + per_shard]
        packed[start:start + len(rows)] = np.stack([staged[r] for r in rows])
    packed.resize((len(good_rows), *packed.shape[1:]))
    os.rename(partial / IMAGES, kept)
    os.rename(scratch_dir / IMAGES, partial / IMAGES)
    shutil.rmtree(kept)
    shutil.rmtree(scratch_dir)


def _settle_swap(plan: BlockPlan) -> None:
    """After an assembling step killed while swapping the packed images in: finish the swap
    (both there: the packed array is in place) or undo it (only the staged one left)."""
    kept = plan.partial / (IMAGES + ".staged")
    if not kept.is_dir():
        return
    if (plan.partial / IMAGES).is_dir():
        shutil.rmtree(kept)
    else:
        os.rename(kept, plan.partial / IMAGES)


def finish_conversion(plan: BlockPlan, qc_report: bool = True):
    """Assemble the finished blocks into the store ``OUT`` (see the module doc); a
    `ConversionReport`. Raises ConversionError naming the unfinished shards if any."""
    import zarr

    from hpcbrain.data.convert import ConversionReport

    started = time.perf_counter()
    out = Path(plan.out)
    refuse_existing(out)
    if not plan.partial.is_dir():
        raise ConversionError(f"{plan.partial} is missing: plan the conversion again")
    scans, fmt, candidates = _discover(Path(plan.source), plan.bids_filter, plan.excluded())
    affines, voxels, entries, missing = _read_markers(plan)
    if missing:
        blocks = unfinished_blocks(plan)
        raise ConversionError(f"{len(missing)} shards of {plan.partial} are unfinished (blocks "
                              f"{blocks}): rerun the same command to convert them")
    reasons = {i: list(s.problems) for i, s in enumerate(scans) if s.problems}
    for index, entry in entries.items():
        if entry.get("reason"):
            reasons.setdefault(index, []).append(entry["reason"])
    bad_images = [(str(scans[i].path), scans[i].subject, scans[i].session, "; ".join(r))
                  for i, r in sorted(reasons.items())]
    if not plan.skip_bad and reasons:
        raise ConversionError(describe_bad(bad_images, len(scans)), bad_images)
    good_rows = [r for r, i in enumerate(candidates) if i not in reasons]
    if not good_rows:
        raise ConversionError(f"nothing left to convert: all {len(scans)} scans are bad")
    _settle_swap(plan)
    if zarr.open_group(str(plan.partial), mode="r")[IMAGES].shape[0] != len(good_rows):
        _pack_good_rows(plan, good_rows)
    group = zarr.open_group(str(plan.partial), mode="r+")
    good = [candidates[r] for r in good_rows]
    columns, types = build_columns([scans[i] for i in good])
    ledger = ledger_rows(scans, entries, reasons, {index: row for row, index in enumerate(good)})
    write_ledger_group(group, ledger)
    skipped = [{"path": p, "subject": sub, "session": ses, "reason": r}
               for p, sub, ses, r in bad_images]
    write_scan_metadata(group, plan.layout, columns, types, affines[good_rows],
                        voxels[good_rows], {
        "preprocessing": preprocessing_attrs(plan.register, plan.volume_grid),
        "skipped": skipped,
        "source": {"path": plan.source, "format": fmt, "bids_filter": plan.bids_filter},
        "created_by": f"hpcbrain {hpcbrain_version()} (hpcbrain.data.convert_blocks, "
                      f"{len(plan.blocks)} blocks)",
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    if plan.append_to is not None:
        # the wave, complete in the staging folder, goes into the store; a kill before the
        # staging is gone leaves a rerun to find nothing to append and remove it
        from hpcbrain.data.append import merge_wave
        from hpcbrain.data.ledger import read_ledger

        out = Path(plan.append_to)
        merged = merge_wave(out, plan.partial, Path(plan.source))
        ledger = read_ledger(out)
        print(f"hpcbrain convert: appended {merged.added} scans to {out} (now {merged.scans})")
        drawn = plan.partial / DRAWN_FIGURES
    else:
        for leftover in (PLAN_FILE, _MARKERS):
            path = plan.partial / leftover
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        os.rename(plan.partial, out)
        drawn = out / DRAWN_FIGURES
    qc_folder = None
    if qc_report:        # the figures the array tasks drew: the report only links them
        from hpcbrain.data.qc_report import write_qc_report

        qc_folder = write_qc_report(out, ledger, register=plan.register, drawn=[drawn])
    shutil.rmtree(plan.partial if plan.append_to is not None else drawn, ignore_errors=True)
    return ConversionReport(n_converted=len(good), skipped=[(p, r) for p, _, _, r in bad_images],
                            out=out, seconds=time.perf_counter() - started,
                            resumed_shards=0, qc_folder=qc_folder,
                            flagged=sum(bool(row["flags"]) for row in ledger))
