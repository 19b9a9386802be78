"""Torch datasets over a cohort store: single scans (AdapN) and longitudinal pairs (LSOR).

The store is opened lazily: a dataset holds a `CohortStore`, which pickles without its Zarr
handle, and a dataset that finds itself in a new process (a forked or spawned DataLoader
worker) swaps in a handle-less copy first, so every worker reads through its own handle.

Augmentation is deterministic given (seed, epoch, item index) and independent of the number of
workers and of the order in which items are fetched: each item draws from its own
`torch.Generator` seeded from those three numbers (`item_generator`), never from the global RNG.
Call `set_epoch(epoch)` before iterating over an epoch. The epoch lives in shared memory, so
persistent DataLoader workers (`persistent_workers=True`) see the new value too, provided
`set_epoch` runs before the epoch's iterator is created (i.e. before `for batch in loader`).
"""
from __future__ import annotations

import copy
import os
import pickle
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from hpcbrain.data.batch_augment import AUGMENT_KEY
from hpcbrain.data.store import CohortStore, CorruptScanError
from hpcbrain.data.transforms import Transform

__all__ = ["StoreDataset", "ScanDataset", "PairDataset", "item_generator", "longitudinal_pairs"]

Augmentation = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def item_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """A CPU generator seeded from (seed, epoch, index), well mixed by numpy's SeedSequence."""
    if min(seed, epoch, index) < 0:
        raise ValueError(f"seed, epoch and index must be >= 0, got {(seed, epoch, index)}")
    state = np.random.SeedSequence([int(seed), int(epoch), int(index)]).generate_state(
        1, dtype=np.uint64)
    return torch.Generator().manual_seed(int(state[0]))


def _as_store(store: CohortStore | str | Path) -> CohortStore:
    return store if isinstance(store, CohortStore) else CohortStore(store)


def _check_indices(indices, n_scans: int, where: str) -> np.ndarray:
    if indices is None:
        return np.arange(n_scans, dtype=np.int64)
    array = np.asarray(indices)
    if array.ndim != 1 or (array.size and array.dtype.kind not in "iu"):
        raise ValueError(f"{where}: indices must be a 1-D array of integer scan indices, got "
                         f"dtype {array.dtype} and shape {array.shape}")
    array = array.astype(np.int64)
    bad = array[(array < 0) | (array >= n_scans)]
    if bad.size:
        raise IndexError(f"{where}: scan indices {bad[:5].tolist()} out of range for a store "
                         f"of {n_scans} scans")
    return array


class StoreDataset(Dataset):
    """Lazy per-process store access, the epoch counter and per-item generators.

    A scan whose bytes fail their checksum stops the read (`CorruptScanError`), unless
    `skip_corrupt_scans(log)` was called (data.on_corrupt_scan=skip): then its item is replaced
    by the next item whose scans read, and the scan is appended to `log` — one line per event,
    from whichever worker process met it — for `corrupt_scans_met` to report at the epoch's end.
    """

    #: where skipped corrupt scans are written; None: a corrupt scan stops the read
    corrupt_log: Path | None = None

    def skip_corrupt_scans(self, log: str | Path) -> None:
        self.corrupt_log = Path(log)

    def corrupt_scans_met(self) -> dict[int, str]:
        """{scan index: the error} of every corrupt scan skipped so far (any process)."""
        if self.corrupt_log is None or not self.corrupt_log.exists():
            return {}
        met = {}
        for line in self.corrupt_log.read_text(encoding="utf-8").splitlines():
            scan, _, message = line.partition("\t")
            if scan.isdigit():
                met[int(scan)] = message
        return met

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        index = self._check_item(index)
        if self.corrupt_log is None:
            return self._item(index)
        for offset in range(len(self)):
            candidate = (index + offset) % len(self)
            try:
                return self._item(candidate)
            except CorruptScanError as exc:
                self._note_corrupt(exc)
        raise CorruptScanError(f"{self.store.path}: every item of this {type(self).__name__} "
                               f"holds a corrupt scan (see {self.corrupt_log})")

    def _item(self, index: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _note_corrupt(self, exc: CorruptScanError) -> None:
        line = f"{exc.scan if exc.scan is not None else '?'}\t{str(exc).splitlines()[0]}\n"
        # O_APPEND: a line this short lands whole even when several workers write at once
        fd = os.open(self.corrupt_log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, line.encode("utf-8"))
        finally:
            os.close(fd)

    def __init__(self, store: CohortStore | str | Path, transform: Augmentation | None,
                 seed: int, augment_on_device: bool = False):
        self._cohort = _as_store(store)
        self._owner_pid = os.getpid()
        self.transform = transform
        # True: items carry their augmentation key instead of being augmented here
        # (data.augment_on=device; batch_augment.BatchAugmentation applies it on the device)
        self.augment_on_device = bool(augment_on_device)
        if int(seed) < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.seed = int(seed)
        # Shared memory: persistent workers forked/spawned earlier see set_epoch's updates.
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    @property
    def store(self) -> CohortStore:
        if self._owner_pid != os.getpid():
            # New process: a pickled copy carries no Zarr handle, so this process opens its own.
            self._cohort = pickle.loads(pickle.dumps(self._cohort))
            self._owner_pid = os.getpid()
        return self._cohort

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation draws of `epoch`; call before creating the epoch's iterator."""
        if int(epoch) < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self._epoch.fill_(int(epoch))

    def without_augmentation(self) -> "StoreDataset":
        """The same items, un-augmented (e.g. to encode the training set for k-means)."""
        plain = copy.copy(self)
        plain.transform = None
        return plain

    def _generator(self, index: int) -> torch.Generator:
        return item_generator(self.seed, self.epoch, index)

    def _augments_here(self) -> bool:
        return self.transform is not None and not self.augment_on_device

    def _augment_key(self, index: int) -> dict[str, torch.Tensor]:
        if self.transform is None or not self.augment_on_device:
            return {}
        return {AUGMENT_KEY: torch.tensor([self.epoch, index], dtype=torch.int64)}

    def _read(self, scan: int) -> torch.Tensor:
        return torch.from_numpy(self.store.read_image(int(scan)))[None]  # [1, S, S, S]

    def _check_item(self, index: int) -> int:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"{type(self).__name__}: item {index} out of range for {n} items")
        return index % n


class ScanDataset(StoreDataset):
    """Single scans. Item: x float32 [1, S, S, S], age float32 scalar, index long (in store)."""

    def __init__(self, store: CohortStore | str | Path, indices: Sequence[int] | None = None,
                 transform: Augmentation | None = None, seed: int = 0,
                 augment_on_device: bool = False):
        super().__init__(store, transform, seed, augment_on_device)
        self.indices = _check_indices(indices, len(self._cohort), "ScanDataset")
        self.ages = np.asarray(self._cohort.column("age"), dtype=np.float32)[self.indices]

    def __len__(self) -> int:
        return int(self.indices.size)

    def _item(self, index: int) -> dict[str, torch.Tensor]:
        scan = int(self.indices[index])
        x = self._read(scan)
        if self._augments_here():
            x = self.transform(x, self._generator(index))
        return {"x": x,
                "age": torch.tensor(self.ages[index], dtype=torch.float32),
                "index": torch.tensor(scan, dtype=torch.int64), **self._augment_key(index)}

    def __repr__(self) -> str:
        return (f"ScanDataset({self._cohort.path}, scans={len(self)}, "
                f"transform={self.transform!r}, seed={self.seed}, epoch={self.epoch})")


def longitudinal_pairs(subjects: np.ndarray, ages: np.ndarray, indices: np.ndarray,
                       consecutive_only: bool = False) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Pairs (u, v) of scans of one subject with age_u < age_v.

    `subjects` and `ages` are per-scan columns of the whole store; only the scans in `indices`
    take part. A subject's scans are ordered by age (ties by scan index); with
    `consecutive_only` only neighbours in that order are paired, else every i < j. Pairs whose
    Δt = age_v − age_u is not > 0 (same age) are dropped; scans without a finite age are left
    out. Returns (pairs [P, 2] int64 store indices, dt [P] float32 years, n_same_age_dropped,
    n_missing_age). Pairs are ordered by subject label, then by (i, j).
    """
    indices = np.unique(np.asarray(indices, dtype=np.int64))
    ages = np.asarray(ages, dtype=np.float64)
    finite = np.isfinite(ages[indices])
    n_missing_age = int((~finite).sum())
    indices = indices[finite]
    labels = np.asarray(subjects, dtype=object)[indices].astype(str)
    pairs: list[tuple[int, int]] = []
    n_same_age = 0
    for subject in np.unique(labels):
        scans = indices[labels == subject]
        scans = scans[np.lexsort((scans, ages[scans]))]  # by age, ties by index
        if consecutive_only:
            candidates = zip(range(len(scans) - 1), range(1, len(scans)))
        else:
            candidates = ((i, j) for i in range(len(scans)) for j in range(i + 1, len(scans)))
        for i, j in candidates:
            u, v = int(scans[i]), int(scans[j])
            if ages[v] - ages[u] > 0:
                pairs.append((u, v))
            else:
                n_same_age += 1
    pair_array = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    dt = (ages[pair_array[:, 1]] - ages[pair_array[:, 0]]).astype(np.float32)
    return pair_array, dt, n_same_age, n_missing_age


class PairDataset(StoreDataset):
    """Longitudinal pairs of scans of one subject, earlier scan first.

    Item: x_u, x_v float32 [1, S, S, S]; dt, age_u, age_v float32 scalars (years); index_u,
    index_v long (scan indices in the store). Both scans of a pair receive the same
    augmentation parameters: through `transform.apply_pair` when the transform has it, else by
    replaying the item's generator state for the second scan.

    Attributes: `pairs` [P, 2] int64 store indices, `dt` [P] float32, `scan_indices` (the
    unique scans used), `n_same_age_dropped` (pairs with Δt <= 0), `n_missing_age` (scans in
    `indices` without a finite age, left out).
    """

    def __init__(self, store: CohortStore | str | Path, indices: Sequence[int] | None = None,
                 consecutive_only: bool = False, transform: Augmentation | None = None,
                 seed: int = 0, augment_on_device: bool = False):
        super().__init__(store, transform, seed, augment_on_device)
        selected = _check_indices(indices, len(self._cohort), "PairDataset")
        self.consecutive_only = bool(consecutive_only)
        self._store_ages = np.asarray(self._cohort.column("age"), dtype=np.float32)
        self.pairs, self.dt, self.n_same_age_dropped, self.n_missing_age = longitudinal_pairs(
            self._cohort.column("subject"), self._store_ages, selected, self.consecutive_only)
        self.scan_indices = np.unique(self.pairs)

    def __len__(self) -> int:
        return int(self.pairs.shape[0])

    def _augment_pair(self, x_u, x_v, generator):
        if isinstance(self.transform, Transform):     # same parameters for both scans
            return self.transform.apply_pair(x_u, x_v, generator)
        state = generator.get_state()
        x_u = self.transform(x_u, generator)
        generator.set_state(state)
        return x_u, self.transform(x_v, generator)

    def _item(self, index: int) -> dict[str, torch.Tensor]:
        u, v = (int(s) for s in self.pairs[index])
        x_u, x_v = self._read(u), self._read(v)
        if self._augments_here():
            x_u, x_v = self._augment_pair(x_u, x_v, self._generator(index))
        return {"x_u": x_u, "x_v": x_v,
                "dt": torch.tensor(self.dt[index], dtype=torch.float32),
                "age_u": torch.tensor(self._store_ages[u], dtype=torch.float32),
                "age_v": torch.tensor(self._store_ages[v], dtype=torch.float32),
                "index_u": torch.tensor(u, dtype=torch.int64),
                "index_v": torch.tensor(v, dtype=torch.int64), **self._augment_key(index)}

    def __repr__(self) -> str:
        return (f"PairDataset({self._cohort.path}, pairs={len(self)}, "
                f"scans={self.scan_indices.size}, consecutive_only={self.consecutive_only}, "
                f"same_age_dropped={self.n_same_age_dropped}, transform={self.transform!r}, "
                f"seed={self.seed}, epoch={self.epoch})")
