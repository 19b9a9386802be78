"""How fast the training loader delivers: items/s from a cohort store with N workers.

    .venv/bin/python bench/loader_throughput.py --store runs/demo/cohort.zarr --kind pairs \
        --workers 0 2 4 --batch 8 [--batches 50]

The datasets and DataLoader settings a run uses (`hpcbrain.data.datasets`, fork workers,
pinned memory on CUDA), without augmentation, over the whole store; the first batch (worker
start-up) is not timed. Compare with `bench/train_throughput.py`'s samples/s: a loader slower
than the step starves the device.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def items_per_s(store: str, kind: str, workers: int, batch: int, batches: int) -> float:
    from torch.utils.data import DataLoader

    from hpcbrain.data.datasets import PairDataset, ScanDataset
    from hpcbrain.data.store import CohortStore

    cohort = CohortStore(store)
    everything = np.arange(len(cohort))
    dataset = (PairDataset(cohort, everything) if kind == "pairs"
               else ScanDataset(cohort, everything))
    loader = DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers,
                        drop_last=True, pin_memory=torch.cuda.is_available(),
                        multiprocessing_context="fork" if workers else None,
                        persistent_workers=False)
    done, started = 0, None
    while done < batches:
        for _ in loader:
            if started is None:
                started = time.perf_counter()        # after the first batch: workers are up
                continue
            done += 1
            if done >= batches:
                break
    return done * batch / (time.perf_counter() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", required=True)
    parser.add_argument("--kind", default="pairs", choices=["pairs", "scans"])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--batches", type=int, default=50)
    args = parser.parse_args()
    for workers in args.workers:
        rate = items_per_s(args.store, args.kind, workers, args.batch, args.batches)
        print(f"| loader {args.kind} | {workers} workers | batch {args.batch} | {rate:.1f} "
              f"{args.kind}/s |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
