"""Does the data path scale with the cohort? Loader memory against cohort size, and conversion
throughput against `--workers`.

    .venv/bin/python -m bench.scale_bench [--scans 200 2000] [--size 32] [--workers 1 2]
        [--convert-subjects 12] [--json OUT.json]

1. Loader memory: a store of N scans (random volumes at SIZE³, 4 visits per subject, the
   converter's layout) read once over every longitudinal pair by the DataLoader a run uses
   (2 worker processes, batch 8), each N in a fresh process; peak resident memory of the main
   process and of its largest worker (`getrusage`). Nothing per scan may stay resident: the
   target is ≤ 1.1× from 200 to 2,000 scans.
2. Conversion: a synthetic cohort (`hpcbrain synth`) converted at 64³ with each `--workers`
   count; scans/s end to end.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def write_store(path: Path, n_scans: int, size: int, visits: int = 4) -> None:
    import zarr

    from hpcbrain.data import store as cohort

    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    layout = cohort.ImageLayout(shape=(size,) * 3, scans_per_shard=16)
    images = cohort.create_images_array(group, n_scans, layout)
    rng = np.random.default_rng(0)
    for start in range(0, n_scans, 16):
        stop = min(start + 16, n_scans)
        images[start:stop] = rng.standard_normal((stop - start, size, size, size),
                                                 dtype=np.float32).astype(np.float16)
    subject = np.array([f"sub-{i // visits:05d}" for i in range(n_scans)], dtype=object)
    columns = {"subject": subject,
               "session": np.array([f"ses-{i % visits + 1:02d}" for i in range(n_scans)],
                                   dtype=object),
               "age": (60 + (np.arange(n_scans) // visits) % 30 + (np.arange(n_scans) % visits)
                       ).astype(np.float32),
               "source_path": np.array([f"/nowhere/{s}.nii.gz" for s in subject], dtype=object),
               "affine": np.tile(np.eye(4), (n_scans, 1, 1))}
    cohort.write_columns(group, columns)
    group.attrs[cohort.ATTRS_KEY] = {
        "schema_version": cohort.SCHEMA_VERSION, "shape": [size] * 3, "spacing_mm": [1.0] * 3,
        "dtype": "float16", "codec": layout.codec_attrs(), "n_scans": n_scans,
        "columns": sorted(k for k in columns if k != "affine"),
        "preprocessing": {"source": "bench/scale_bench.py random volumes"}, "skipped": [],
        "created_by": "bench/scale_bench.py"}


def loader_memory(store: str) -> dict:
    """(Run in a fresh process.) Read every pair once; peak RSS of this process and workers."""
    import torch
    from torch.utils.data import DataLoader

    from hpcbrain.data.datasets import PairDataset

    torch.set_num_threads(1)
    dataset = PairDataset(store)
    loader = DataLoader(dataset, batch_size=8, shuffle=True, num_workers=2,
                        multiprocessing_context="fork", drop_last=False)
    started, pairs = time.perf_counter(), 0
    for batch in loader:
        pairs += batch["x_u"].shape[0]
    seconds = time.perf_counter() - started
    return {"pairs": pairs, "seconds": seconds,
            "main_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "worker_peak_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}


def conversion_rate(work: Path, subjects: int, workers: list[int]) -> list[dict]:
    venv = Path(sys.executable).parent
    bids = work / "bids"
    subprocess.run([str(venv / "hpcbrain"), "synth", "--out", str(bids), "--subjects",
                    str(subjects), "--seed", "0", "--quiet"], check=True)
    rows = []
    for n in workers:
        out = work / f"convert-{n}.zarr"
        started = time.perf_counter()
        subprocess.run([str(venv / "hpcbrain"), "convert", str(bids), "--out", str(out),
                        "--shape", "64", "--workers", str(n), "--quiet"], check=True,
                       stdout=subprocess.DEVNULL)
        seconds = time.perf_counter() - started
        import zarr

        scans = int(zarr.open_group(str(out), mode="r")["images"].shape[0])
        rows.append({"workers": n, "scans": scans, "seconds": seconds,
                     "scans_per_s": scans / seconds})
        shutil.rmtree(out)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scans", type=int, nargs="+", default=[200, 2000])
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--convert-subjects", type=int, default=12)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--_measure", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._measure:                                   # the child process of step 1
        print(json.dumps(loader_memory(args._measure)))
        return 0
    work = Path(tempfile.mkdtemp(prefix="scale_bench_"))
    try:
        memory = []
        for n in args.scans:
            store = work / f"store{n}.zarr"
            write_store(store, n, args.size)
            out = subprocess.run([sys.executable, __file__, "--_measure", str(store)],
                                 check=True, capture_output=True, text=True).stdout
            memory.append({"scans": n, **json.loads(out.strip().splitlines()[-1])})
            shutil.rmtree(store)
        converts = conversion_rate(work, args.convert_subjects, args.workers)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("| scans | pairs | main peak MB | worker peak MB | pairs/s |")
    print("|---|---|---|---|---|")
    for r in memory:
        print(f"| {r['scans']} | {r['pairs']} | {r['main_peak_mb']:.0f} | "
              f"{r['worker_peak_mb']:.0f} | {r['pairs'] / r['seconds']:.0f} |")
    first, last = memory[0], memory[-1]
    ratio = {k: last[k] / first[k] for k in ("main_peak_mb", "worker_peak_mb")}
    print(f"\n{last['scans']} vs {first['scans']} scans: main process {ratio['main_peak_mb']:.2f}×, "
          f"largest worker {ratio['worker_peak_mb']:.2f}× (target ≤ 1.1×)")
    print("\n| convert workers | scans | seconds | scans/s |")
    print("|---|---|---|---|")
    for r in converts:
        print(f"| {r['workers']} | {r['scans']} | {r['seconds']:.1f} | {r['scans_per_s']:.2f} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "memory": memory, "memory_ratio": ratio, "convert": converts, "size": args.size,
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
