"""I/O benchmark: the cohort store vs the same preprocessed scans as .nii.gz and .nii.

    python -m bench.io_bench                       # 10 synth subjects, 64³ and 128³
    python -m bench.io_bench --subjects 20 --sizes 64 --repeats 5 --out bench/results/io.json

For each output size S it measures
- convert: `convert_cohort` end to end (load source NIfTI, preprocess, write the store), scans/s;
- write: writing the already-preprocessed volumes, vol/s — into a fresh store in shard-aligned
  blocks, and one file per scan for .nii.gz / .nii (float32: NIfTI has no float16);
- read: one reader, warm page cache: every volume once in a random order (float32 out:
  `CohortStore.read_image` / `nib.load(...).get_fdata(dtype=float32)`), after one untimed
  warm-up pass; the median over `--repeats` passes, vol/s;
- size on disk and number of files (for a store: its images array).
Rows: the store as converted (float16 by default) read through `CohortStore.read_image` (which
takes the shard fast path of `hpcbrain/data/shard_reader.py`); the same store read through plain
zarr (what the fast path saves); the same volumes in a float32 store (to separate the dtype from the
format); .nii.gz and .nii
(float32).

Data: a synthetic BIDS cohort (`hpcbrain.data.synth`, 2 mm MNI grid) if importable, otherwise
random smooth head-like volumes written as BIDS. Prints a markdown table, saves JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


# ---------------------------------------------------------------------------------- data
def make_source(root: Path, subjects: int, seed: int) -> tuple[Path, str]:
    try:
        from hpcbrain.data.synth import synthesize_cohort
    except ImportError:
        synthesize_cohort = None
    src = root / "source"
    if synthesize_cohort is not None:
        synthesize_cohort(src, subjects, seed=seed, voxel_size_mm=2.0, progress=False)
        return src, "hpcbrain.data.synth (2 mm)"
    return random_bids(src, subjects, seed), "random smooth volumes (2 mm, 96×112×96)"


def random_bids(root: Path, subjects: int, seed: int, sessions: int = 3) -> Path:
    import nibabel as nib
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    shape = (96, 112, 96)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    head = (grid ** 2).sum(0) < 0.8
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = -np.array(shape) + 1
    root.mkdir(parents=True)
    lines = ["participant_id\tsex"]
    for s in range(1, subjects + 1):
        sub = f"sub-{s:03d}"
        lines.append(f"{sub}\t{'FM'[s % 2]}")
        rows = ["session_id\tage"]
        for t in range(1, sessions + 1):
            ses = f"ses-{t:02d}"
            vol = ndimage.gaussian_filter(rng.random(shape, dtype=np.float32), 2) * head
            img = nib.Nifti1Image((vol * 3000).astype(np.int16), affine)
            path = root / sub / ses / "anat" / f"{sub}_{ses}_T1w.nii.gz"
            path.parent.mkdir(parents=True)
            nib.save(img, path)
            rows.append(f"{ses}\t{60 + s + t}")
        (root / sub / f"{sub}_sessions.tsv").write_text("\n".join(rows) + "\n")
    (root / "participants.tsv").write_text("\n".join(lines) + "\n")
    return root


def disk_usage(path: Path) -> tuple[int, int]:
    files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
    return sum(p.stat().st_size for p in files), len(files)


# ---------------------------------------------------------------------------------- timing
def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def read_rate(read_one, n: int, repeats: int, seed: int) -> tuple[float, list[float]]:
    """Median vol/s over `repeats` passes, each reading all n volumes in a fresh random order."""
    rng = np.random.default_rng(seed)
    for i in range(n):  # warm-up pass (page cache, imports, zarr handles)
        read_one(i)
    rates = []
    for _ in range(repeats):
        order = rng.permutation(n)
        rates.append(n / timed(lambda order=order: [read_one(int(i)) for i in order]))
    return statistics.median(rates), rates


def alternating_rates(readers, n: int, repeats: int, seed: int) -> list[list[float]]:
    """Volumes/s of each reader over `repeats` passes, the readers taking turns within every
    pass, first and last swapped from pass to pass (A B, B A, …: whoever runs first after the
    other is not favoured); each pass reads all `n` scans in a fresh random order, the same for
    every reader."""
    rng = np.random.default_rng(seed)
    for read_one in readers:                       # warm-up
        for i in range(n):
            read_one(i)
    rates: list[list[float]] = [[] for _ in readers]
    for repeat in range(repeats):
        order = rng.permutation(n)
        turns = list(enumerate(readers))
        for k, read_one in (turns if repeat % 2 == 0 else turns[::-1]):
            rates[k].append(n / timed(lambda order=order, read_one=read_one:
                                      [read_one(int(i)) for i in order]))
    return rates


def write_store(path: Path, volumes: np.ndarray, dtype: str, per_shard: int,
                codec: str = "blosc-lz4", checksums: bool = True) -> None:
    """Only the images array: enough for the write rate, zarr reads and the size on disk.
    `checksums=False`: the layout before chunks carried a crc32c (to measure its cost)."""
    import zarr

    from hpcbrain.data.store import IMAGES, ImageLayout, create_images_array

    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    layout = ImageLayout(volumes.shape[1:], dtype=dtype, scans_per_shard=per_shard, codec=codec)
    if checksums:
        images = create_images_array(group, len(volumes), layout)
    else:
        images = group.create_array(IMAGES, shape=volumes.shape, dtype=dtype,
                                    chunks=(1, *volumes.shape[1:]),
                                    shards=(per_shard, *volumes.shape[1:]),
                                    compressors=layout.compressor(), fill_value=0)
    for start in range(0, len(volumes), per_shard):
        images[start:start + per_shard] = volumes[start:start + per_shard].astype(dtype)


def read_store_image(path: Path):
    import zarr

    images = zarr.open_group(str(path), mode="r")["images"]
    return lambda i: np.asarray(images[i], dtype=np.float32)


def fast_reader(path: Path, dtype=np.float32):
    """What `CohortStore.read_image` runs for this layout (the shard fast path)."""
    from hpcbrain.data.shard_reader import open_fast_reader

    read = open_fast_reader(path / "images")
    assert read is not None, f"{path}: layout not readable by the fast path"
    return lambda i: read(i, dtype)


# ---------------------------------------------------------------------------------- bench
def bench_size(src: Path, work: Path, size: int, args) -> list[dict]:
    import nibabel as nib

    from hpcbrain.data.convert import convert_cohort
    from hpcbrain.data.store import CohortStore

    store_path = work / f"cohort{size}.zarr"
    report = convert_cohort(src, store_path, size, workers=args.workers,
                            scans_per_shard=args.scans_per_shard, progress=False)
    n = report.n_converted
    store = CohortStore(store_path)
    volumes = np.stack([store.read_image(i) for i in range(n)])  # preprocessed, float32
    affine = np.diag([*(store.info["spacing_mm"] or [1.0] * 3), 1.0])
    rows = []

    def row(fmt, path, write_s, read_one, convert_s=None):
        median, rates = read_rate(read_one, n, args.repeats, args.seed)
        nbytes, nfiles = disk_usage(path / "images" if path.suffix == ".zarr" else path)
        rows.append({"size": size, "format": fmt, "n_scans": n,
                     "convert_scans_per_s": None if convert_s is None else n / convert_s,
                     "write_vol_per_s": n / write_s,
                     "read_vol_per_s": median, "read_vol_per_s_all": rates,
                     "mb_on_disk": nbytes / 1e6, "files": nfiles})

    # the store as converted (float16, blosc-lz4): its write-only rate from rewriting the volumes
    rewrite = work / f"rewrite{size}.zarr"
    write_s = timed(lambda: write_store(rewrite, volumes, "float16", args.scans_per_shard))
    shutil.rmtree(rewrite)
    row("store float16 blosc-lz4 (default)", store_path, write_s, store.read_image,
        report.seconds)
    row("store float16 blosc-lz4, kept float16", store_path, write_s,
        lambda i: store.read_image(i, None))
    row("store float16 blosc-lz4, read through zarr", store_path, write_s,
        read_store_image(store_path))
    # the checksum's cost: the same reader on the same bytes, with and without chunk crc32c
    # (the default row above goes through CohortStore, whose per-scan bookkeeping it adds)
    row("store float16 blosc-lz4, fast reader (chunk checksums)", store_path, write_s,
        fast_reader(store_path))
    unchecked = work / f"store{size}_no_checksums.zarr"
    write_s = timed(lambda: write_store(unchecked, volumes, "float16", args.scans_per_shard,
                                        checksums=False))
    row("store float16 blosc-lz4, no chunk checksums (before Dec 2026)", unchecked, write_s,
        fast_reader(unchecked))
    # and measured in alternation, pass by pass, so that drift in the machine's speed (clock,
    # neighbours) falls on both alike: the figure the cost is read from
    checked_rates, unchecked_rates = alternating_rates(
        [fast_reader(store_path), fast_reader(unchecked)], n, 2 * args.repeats + 1, args.seed)
    rows[-1]["checksum_cost_alternating"] = (statistics.median(
        c / u for c, u in zip(checked_rates, unchecked_rates)) - 1)
    for dtype, codec in (("float16", "zstd"), ("float32", "blosc-lz4"), ("float32", "zstd")):
        path = work / f"store{size}_{dtype}_{codec}.zarr"
        write_s = timed(lambda path=path, dtype=dtype, codec=codec:
                        write_store(path, volumes, dtype, args.scans_per_shard, codec))
        row(f"store {dtype} {codec}", path, write_s, fast_reader(path))

    for ext in ("nii.gz", "nii"):
        folder = work / f"nifti{size}_{ext.replace('.', '')}"
        folder.mkdir()
        paths = [folder / f"scan{i:05d}.{ext}" for i in range(n)]

        def write_all(paths=paths):
            for p, v in zip(paths, volumes):
                nib.save(nib.Nifti1Image(v, affine), p)

        write_s = timed(write_all)
        # mmap=False: the voxels are read into memory, as a training step needs them (nibabel
        # memory-maps an uncompressed .nii by default and get_fdata then reads nothing yet)
        row(f".{ext} float32", folder, write_s,
            lambda i, paths=paths: nib.load(paths[i], mmap=False).get_fdata(dtype=np.float32))
        if ext == "nii":
            row(".nii float32, memory-mapped (not read)", folder, write_s,
                lambda i, paths=paths: nib.load(paths[i]).get_fdata(dtype=np.float32))
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| size | format | convert scans/s | write vol/s | read vol/s (warm, median) "
             "| MB on disk | files |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        conv = f"{r['convert_scans_per_s']:.1f}" if r["convert_scans_per_s"] else "–"
        lines.append(f"| {r['size']}³ | {r['format']} | {conv} | {r['write_vol_per_s']:.0f} "
                     f"| {r['read_vol_per_s']:.0f} | {r['mb_on_disk']:.1f} | {r['files']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=10, help="synthetic subjects (2-5 "
                        "sessions each with synth, 3 otherwise)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--repeats", type=int, default=3, help="timed read passes (median)")
    parser.add_argument("--workers", type=int, default=1, help="convert_cohort workers")
    parser.add_argument("--scans-per-shard", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch and blosc threads while reading (default 1: one reader, "
                             "one thread)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/io.json"))
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where data go (default: a temporary folder, deleted after)")
    args = parser.parse_args(argv)

    import nibabel
    import numcodecs.blosc
    import torch
    import zarr

    torch.set_num_threads(args.threads)
    numcodecs.blosc.set_nthreads(args.threads)

    work = Path(tempfile.mkdtemp(prefix="io_bench_", dir=args.workdir))
    try:
        started = time.perf_counter()
        src, data = make_source(work, args.subjects, args.seed)
        print(f"data: {data}, {args.subjects} subjects ({time.perf_counter() - started:.0f} s)",
              file=sys.stderr)
        rows = []
        for size in args.sizes:
            rows += bench_size(src, work, size, args)
            print(f"{size}³ done ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    table = markdown(rows)
    ratios = {}
    for size in args.sizes:
        by = {r["format"]: r for r in rows if r["size"] == size}
        store, nii = by["store float16 blosc-lz4 (default)"], by[".nii float32"]
        ratios[f"{size}"] = {
            "read_vs_nii": store["read_vol_per_s"] / nii["read_vol_per_s"],
            "read_kept_float16_vs_nii":
                by["store float16 blosc-lz4, kept float16"]["read_vol_per_s"] / nii["read_vol_per_s"],
            "bytes_vs_nii": store["mb_on_disk"] / nii["mb_on_disk"],
            "read_vs_niigz": store["read_vol_per_s"] / by[".nii.gz float32"]["read_vol_per_s"],
            "checksum_cost": by["store float16 blosc-lz4, no chunk checksums (before Dec "
                                "2026)"]["checksum_cost_alternating"]}
    print(table)
    print("\nstore (float16 blosc-lz4, float32 out) vs .nii float32 read into memory, one "
          "thread: " + "; ".join(
              f"{s}³ {r['read_vs_nii']:.2f}× the speed ({r['read_kept_float16_vs_nii']:.2f}× kept "
              f"float16) in {100 * r['bytes_vs_nii']:.0f} % of the bytes" for s, r in ratios.items()))
    print("chunk checksums, the same fast reader with and without, passes alternating (median "
          "ratio): " + "; ".join(
        f"{s}³ {100 * r['checksum_cost']:+.1f} % read rate" for s, r in ratios.items()))
    result = {
        "command": " ".join(["python", "bench/io_bench.py", *(argv or sys.argv[1:])]),
        "data": data, "subjects": args.subjects, "repeats": args.repeats,
        "workers": args.workers, "scans_per_shard": args.scans_per_shard,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform(), "zarr": zarr.__version__,
                    "nibabel": nibabel.__version__,
                    "load_avg": os.getloadavg() if hasattr(os, "getloadavg") else None},
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "threads": args.threads, "rows": rows, "ratios": ratios, "table": table,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"saved {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
