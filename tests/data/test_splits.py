import numpy as np
import pytest

from hpcbrain.data.splits import Split, subject_folds, subject_kfold

# 10 subjects with 1–3 scans each, scans of a subject not contiguous.
SUBJECTS = np.array([f"sub-{k:02d}" for k in [0, 1, 2, 3, 4, 5, 6, 7, 8, 9,
                                              0, 2, 4, 6, 8, 0, 4, 9]], dtype=object)
N_SUBJECTS = 10


def subjects_of(indices):
    return set(SUBJECTS[indices])


def check_split(split: Split):
    parts = (split.train, split.val, split.test)
    for part in parts:
        assert part.dtype == np.int64 and np.all(np.diff(part) > 0)  # sorted, unique
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(SUBJECTS.size))
    subject_sets = [subjects_of(p) for p in parts]
    for a in range(3):
        for b in range(a + 1, 3):
            assert not subject_sets[a] & subject_sets[b]
    # Subject level: a subject's scans are all in the part that holds it.
    for part, subjects in zip(parts, subject_sets):
        assert set(np.flatnonzero(np.isin(SUBJECTS, list(subjects)))) == set(part.tolist())


@pytest.mark.parametrize("n_folds", [2, 3, 5, 10])
def test_folds_are_disjoint_balanced_and_cover_every_subject_once(n_folds):
    test_counts = {}
    sizes = []
    for fold in range(n_folds):
        split = subject_kfold(SUBJECTS, n_folds, fold, val_fraction=0.2, seed=1)
        check_split(split)
        sizes.append(len(subjects_of(split.test)))
        for subject in subjects_of(split.test):
            test_counts[subject] = test_counts.get(subject, 0) + 1
    assert max(sizes) - min(sizes) <= 1
    assert test_counts == {s: 1 for s in set(SUBJECTS)}


def test_validation_takes_the_fraction_of_remaining_subjects():
    split = subject_kfold(SUBJECTS, 5, 0, val_fraction=0.25, seed=0)  # 8 remain → 2 val
    assert len(subjects_of(split.val)) == 2 and len(subjects_of(split.train)) == 6
    tiny = subject_kfold(SUBJECTS, 5, 0, val_fraction=0.01, seed=0)
    assert len(subjects_of(tiny.val)) == 1
    none = subject_kfold(SUBJECTS, 5, 0, val_fraction=0.0, seed=0)
    assert none.val.size == 0 and len(subjects_of(none.train)) == 8


def test_validation_never_takes_every_remaining_subject():
    split = subject_kfold(["a", "b", "c"], 3, 0, val_fraction=0.9)
    assert split.test.size == 1 and split.val.size == 1 and split.train.size == 1
    alone = subject_kfold(["a", "b"], 2, 0, val_fraction=0.5)
    assert alone.val.size == 0 and alone.train.size == 1  # one subject left: it trains


def test_single_fold_has_no_test_set():
    split = subject_kfold(SUBJECTS, 1, 0, val_fraction=0.3, seed=0)
    check_split(split)
    assert split.test.size == 0 and len(subjects_of(split.val)) == 3


def test_seed_determines_the_split():
    a = subject_kfold(SUBJECTS, 3, 1, val_fraction=0.2, seed=7)
    b = subject_kfold(SUBJECTS, 3, 1, val_fraction=0.2, seed=7)
    c = subject_kfold(SUBJECTS, 3, 1, val_fraction=0.2, seed=8)
    assert all(np.array_equal(x, y) for x, y in zip((a.train, a.val, a.test),
                                                    (b.train, b.val, b.test)))
    assert not np.array_equal(a.test, c.test)


def test_subject_folds_match_the_test_parts():
    folds = subject_folds(SUBJECTS, 4, seed=3)
    for fold in range(4):
        split = subject_kfold(SUBJECTS, 4, fold, val_fraction=0.2, seed=3)
        assert np.array_equal(split.test, np.flatnonzero(folds == fold))


def test_integer_subject_ids_work():
    split = subject_kfold(np.array([3, 3, 1, 2, 2, 5]), 2, 0, val_fraction=0.0)
    assert np.array_equal(np.sort(np.concatenate([split.train, split.test])), np.arange(6))


def test_stratified_folds_and_validation_keep_group_proportions():
    subjects = np.array([f"s{k:02d}" for k in range(12)])
    groups = np.array(["CN"] * 6 + ["AD"] * 6)
    for fold in range(3):
        split = subject_kfold(subjects, 3, fold, val_fraction=0.0, seed=fold, groups=groups)
        assert sorted(groups[split.test]) == ["AD", "AD", "CN", "CN"]
    subjects = np.array([f"s{k:02d}" for k in range(12)])
    groups = np.array(["CN"] * 8 + ["AD"] * 4)
    for seed in range(5):
        split = subject_kfold(subjects, 1, 0, val_fraction=0.25, seed=seed, groups=groups)
        assert sorted(groups[split.val]) == ["AD", "CN", "CN"]


@pytest.mark.parametrize("kwargs, message", [
    (dict(n_folds=3, fold=3), "fold must be"),
    (dict(n_folds=3, fold=-1), "fold must be"),
    (dict(n_folds=0, fold=0), "n_folds must be"),
    (dict(n_folds=11, fold=0), "exceeds the number of subjects"),
    (dict(n_folds=2, fold=0, val_fraction=1.0), "val_fraction"),
    (dict(n_folds=2, fold=0, val_fraction=-0.1), "val_fraction"),
    (dict(n_folds=2, fold=0, groups=["CN", "AD"]), "one label per scan"),
])
def test_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        subject_kfold(SUBJECTS, **kwargs)


def test_empty_subjects_raise():
    with pytest.raises(ValueError, match="non-empty"):
        subject_kfold([], 2, 0)
