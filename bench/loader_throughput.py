"""How fast the training loader delivers: items/s from a cohort store with N workers.

    .venv/bin/python -m bench.loader_throughput --store runs/demo/cohort.zarr --kind pairs \
        --workers 0 2 4 --batch 8 [--batches 50] [--augment]

The datasets and DataLoader settings a run uses (`hpcbrain.data.datasets`, fork workers,
pinned memory on CUDA) over the whole store; the first batch (worker start-up) is not timed.
Compare with `bench/train_throughput.py`'s samples/s: a loader slower than the step starves the
device. With ``--augment`` (flip, ±5° rotation, ±2 voxel shift, cutout 8, p 0.5) three rows per
worker count: augmentation in the workers (``data.augment_on=workers``), the loader of
``data.augment_on=device`` (workers only read), and the device's augmentation of whole batches
alone (`BatchAugmentation`, on CUDA when there is one).
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch

AUGMENT = {"flip": True, "rotation_deg": 5.0, "translation_vox": 2.0, "cutout_size": 8, "p": 0.5}


def make_dataset(store: str, kind: str, transform=None, on_device: bool = False):
    from hpcbrain.data.datasets import PairDataset, ScanDataset
    from hpcbrain.data.store import CohortStore

    cohort = CohortStore(store)
    everything = np.arange(len(cohort))
    make = PairDataset if kind == "pairs" else ScanDataset
    return make(cohort, everything, transform=transform, seed=0, augment_on_device=on_device)


def items_per_s(dataset, workers: int, batch: int, batches: int) -> float:
    from torch.utils.data import DataLoader

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


def device_augment_items_per_s(dataset, batch: int, batches: int) -> float:
    """Items/s of `BatchAugmentation` alone on batches already on the device."""
    from torch.utils.data import DataLoader

    from hpcbrain.data.batch_augment import BatchAugmentation

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    apply = BatchAugmentation(dataset.transform, dataset.seed)
    loader = DataLoader(dataset, batch_size=batch, shuffle=False, drop_last=True)
    on_device = [{k: v.to(device) for k, v in b.items()}
                 for b, _ in zip(loader, range(min(batches, 8)))]
    apply(on_device[0])                                   # warm-up
    started, done = time.perf_counter(), 0
    while done < batches:
        for b in on_device:
            apply(b)
            done += 1
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return done * batch / (time.perf_counter() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", required=True)
    parser.add_argument("--kind", default="pairs", choices=["pairs", "scans"])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--batches", type=int, default=50)
    parser.add_argument("--augment", action="store_true",
                        help="augmentation in the workers vs on the device (see the doc)")
    args = parser.parse_args()

    def show(what: str, workers: str, rate: float) -> None:
        print(f"| {what} {args.kind} | {workers} | batch {args.batch} | {rate:.1f} "
              f"{args.kind}/s |", flush=True)

    if not args.augment:
        for workers in args.workers:
            show("loader", f"{workers} workers",
                 items_per_s(make_dataset(args.store, args.kind), workers, args.batch,
                             args.batches))
        return 0
    from hpcbrain.data.transforms import build_augmentation

    transform = build_augmentation(AUGMENT)
    for workers in args.workers:
        show("augmenting in the workers:", f"{workers} workers",
             items_per_s(make_dataset(args.store, args.kind, transform), workers, args.batch,
                         args.batches))
        show("augment_on=device, loader:", f"{workers} workers",
             items_per_s(make_dataset(args.store, args.kind, transform, on_device=True), workers,
                         args.batch, args.batches))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    show("augment_on=device, augmentation:", device,
         device_augment_items_per_s(make_dataset(args.store, args.kind, transform, True),
                                    args.batch, args.batches))
    return 0


if __name__ == "__main__":
    sys.exit(main())
