"""Subject-level train/validation/test splits.

All scans of a subject land in the same part, so no subject's brain is seen in training and
tested on (the LSOR data script's folds are not disjoint; these are). Folds are fixed by
(subjects, n_folds, seed, groups): across fold = 0 … n_folds−1 every subject is in exactly one
test fold.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Split", "subject_folds", "subject_kfold"]


@dataclass(frozen=True, eq=False)
class Split:
    """Sorted int64 scan indices of each part."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray

    def __repr__(self) -> str:
        return f"Split(train={self.train.size}, val={self.val.size}, test={self.test.size} scans)"


def _subject_table(subjects, groups):
    """Unique subjects, per-scan subject code, per-subject stratum code (0 without groups)."""
    subjects = np.asarray(subjects)
    if subjects.ndim != 1 or subjects.size == 0:
        raise ValueError(f"subjects must be a non-empty 1-D array of subject ids per scan, got "
                         f"shape {subjects.shape}")
    if subjects.dtype.kind in "OUST":
        subjects = subjects.astype(str)
    unique, first_scan, scan_subject = np.unique(subjects, return_index=True,
                                                 return_inverse=True)
    if groups is None:
        strata = np.zeros(unique.size, dtype=np.int64)
    else:
        groups = np.asarray(groups)
        if groups.shape != subjects.shape:
            raise ValueError(f"groups must give one label per scan: shape {groups.shape} for "
                             f"{subjects.size} scans")
        if groups.dtype.kind in "OUST":
            groups = groups.astype(str)
        # A subject's stratum is the label of its first scan (diagnosis may change over visits).
        strata = np.unique(groups[first_scan], return_inverse=True)[1].astype(np.int64)
    return unique, scan_subject.reshape(-1), strata


def _check_folds(n_folds: int, n_subjects: int) -> int:
    if int(n_folds) != n_folds or n_folds < 1:
        raise ValueError(f"n_folds must be a positive integer, got {n_folds!r}")
    if n_folds > n_subjects:
        raise ValueError(f"n_folds={n_folds} exceeds the number of subjects ({n_subjects}): "
                         f"every fold needs at least one subject")
    return int(n_folds)


def _fold_of_subject(strata: np.ndarray, n_folds: int, rng: np.random.Generator) -> np.ndarray:
    # Shuffle, group by stratum, deal round-robin: fold sizes differ by at most one subject,
    # and so do each stratum's counts across folds.
    order = rng.permutation(strata.size)
    order = order[np.argsort(strata[order], kind="stable")]
    folds = np.empty(strata.size, dtype=np.int64)
    folds[order] = np.arange(strata.size) % n_folds
    return folds


def subject_folds(subjects, n_folds: int, seed: int = 0, groups=None) -> np.ndarray:
    """The test fold (0 … n_folds−1) of every scan, assigned per subject."""
    unique, scan_subject, strata = _subject_table(subjects, groups)
    n_folds = _check_folds(n_folds, unique.size)
    return _fold_of_subject(strata, n_folds, np.random.default_rng(seed))[scan_subject]


def _proportional_order(strata: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A shuffled order in which every prefix holds the strata in about their proportions."""
    order = rng.permutation(strata.size)
    rank = np.empty(strata.size, dtype=np.float64)
    for stratum in np.unique(strata):
        members = order[strata[order] == stratum]
        rank[members] = (np.arange(members.size) + 0.5) / members.size
    return order[np.argsort(rank[order], kind="stable")]


def subject_kfold(subjects, n_folds: int, fold: int, val_fraction: float = 0.1,
                  seed: int = 0, groups=None) -> Split:
    """Split scans by subject into train/val/test for test fold `fold` of `n_folds`.

    subjects: subject id of every scan. n_folds >= 2: the subjects are shuffled (seeded) and
    dealt into n_folds folds of as equal size as possible; fold `fold` is the test set and the
    rest is split into train and validation, `val_fraction` of the remaining subjects (rounded,
    at least one when val_fraction > 0 and at least two subjects remain, never all of them)
    going to validation. n_folds == 1: no test set, only train/val. groups (optional, one label
    per scan, e.g. the clinical group): stratify folds and validation by the label of each
    subject's first scan.
    """
    unique, scan_subject, strata = _subject_table(subjects, groups)
    n_folds = _check_folds(n_folds, unique.size)
    if int(fold) != fold or not 0 <= fold < n_folds:
        raise ValueError(f"fold must be an integer in [0, {n_folds - 1}] for n_folds={n_folds}, "
                         f"got {fold!r}")
    if not 0.0 <= float(val_fraction) < 1.0:
        raise ValueError(f"val_fraction must lie in [0, 1), got {val_fraction}")

    rng = np.random.default_rng(seed)
    if n_folds == 1:
        is_test = np.zeros(unique.size, dtype=bool)
    else:
        is_test = _fold_of_subject(strata, n_folds, rng) == fold

    remaining = np.flatnonzero(~is_test)
    n_val = 0
    if val_fraction > 0 and remaining.size >= 2:
        n_val = min(max(int(round(val_fraction * remaining.size)), 1), remaining.size - 1)
    val_subjects = remaining[_proportional_order(strata[remaining], rng)[:n_val]]

    part = np.zeros(unique.size, dtype=np.int64)  # 0 train, 1 val, 2 test
    part[val_subjects] = 1
    part[is_test] = 2
    scan_part = part[scan_subject]
    return Split(*(np.flatnonzero(scan_part == k).astype(np.int64) for k in range(3)))
