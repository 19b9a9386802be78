"""How learnable is age from a cohort's images? The report every synthetic cohort carries.

Three reference points, all cross-validated over subject-grouped folds (a subject's scans never
sit on both sides of a split):

* ``constant``: predict the training folds' mean age -- what a representation must beat;
* ``ridge``: ridge regression on the raw voxels (the volumes as the store holds them), alpha
  chosen by an inner subject-grouped CV -- a simple, honest baseline;
* ``oracle``: a linear fit of age on the true brain age the images were made from -- the best
  any image-based predictor can do when chronological age is only partly in the image.

Plus two effect sizes: the share of the voxel variance along the linear brain-age direction, and
corr(age, brain age). Ridge runs in its dual form on one Gram matrix, so the whole report costs
well under a second for a few hundred scans of 32³.
"""
from __future__ import annotations

import numpy as np

__all__ = ["subject_folds", "kernel_ridge_cv", "cohort_learnability"]

N_FOLDS = 5
# Ridge penalties relative to the mean diagonal of the centred Gram matrix.
RELATIVE_ALPHAS = tuple(10.0 ** k for k in range(-4, 3))


def subject_folds(subjects: np.ndarray, n_folds: int, seed: int) -> np.ndarray:
    """Fold id per item: subjects shuffled with `seed`, dealt round-robin into `n_folds`."""
    unique = np.unique(subjects)
    if len(unique) < n_folds:
        raise ValueError(f"{len(unique)} subjects cannot fill {n_folds} subject-grouped folds")
    order = np.random.default_rng(seed).permutation(unique)
    fold_of = {s: i % n_folds for i, s in enumerate(order)}
    return np.array([fold_of[s] for s in subjects])


def _centred_blocks(gram: np.ndarray, train: np.ndarray, test: np.ndarray):
    """Gram blocks of features centred on the training mean: <x_a − μ, x_b − μ>."""
    k_tt = gram[np.ix_(train, train)]
    k_st = gram[np.ix_(test, train)]
    row_tt = k_tt.mean(axis=1)
    total = row_tt.mean()
    centred_tt = k_tt - row_tt[:, None] - row_tt[None, :] + total
    row_st = k_st.mean(axis=1)
    centred_st = k_st - row_st[:, None] - row_tt[None, :] + total
    return centred_tt, centred_st


def _ridge_predict(gram, y, train, test, alphas):
    """Predictions [len(alphas), len(test)] of ridge with intercept, one per penalty."""
    k_tt, k_st = _centred_blocks(gram, train, test)
    scale = max(float(np.trace(k_tt)) / len(train), 1e-12)
    evals, evecs = np.linalg.eigh(k_tt)
    evals = np.clip(evals, 0.0, None)
    target = y[train] - y[train].mean()
    projected = evecs.T @ target
    out = []
    for alpha in alphas:
        dual = evecs @ (projected / (evals + alpha * scale))
        out.append(y[train].mean() + k_st @ dual)
    return np.stack(out)


def kernel_ridge_cv(gram: np.ndarray, y: np.ndarray, folds: np.ndarray, subjects: np.ndarray,
                    alphas=RELATIVE_ALPHAS, seed: int = 0) -> np.ndarray:
    """Out-of-fold ridge predictions of `y` from the features whose Gram matrix is `gram`;
    each outer fold picks its penalty by an inner subject-grouped CV on its training part."""
    predictions = np.empty(len(y), dtype=np.float64)
    for fold in np.unique(folds):
        train, test = np.flatnonzero(folds != fold), np.flatnonzero(folds == fold)
        inner = subject_folds(subjects[train], min(N_FOLDS, len(np.unique(subjects[train]))),
                              seed + 1 + int(fold))
        errors = np.zeros(len(alphas))
        for inner_fold in np.unique(inner):
            fit, check = train[inner != inner_fold], train[inner == inner_fold]
            errors += ((_ridge_predict(gram, y, fit, check, alphas) - y[check]) ** 2).sum(axis=1)
        best = alphas[int(np.argmin(errors))]
        predictions[test] = _ridge_predict(gram, y, train, test, (best,))[0]
    return predictions


def _scores(y: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    residual = y - predicted
    ss_tot = float(((y - y.mean()) ** 2).sum())
    return {"mae": float(np.abs(residual).mean()),
            "r2": float(1.0 - (residual ** 2).sum() / ss_tot) if ss_tot > 0 else float("nan")}


def cohort_learnability(volumes: np.ndarray, ages: np.ndarray, brain_ages: np.ndarray,
                        subjects: np.ndarray, seed: int = 0) -> dict:
    """The learnability report of a cohort: volumes [N, V] (flattened, as stored), per-scan
    age and true brain age [N], subject ids [N]. Returns plain floats (JSON-ready)."""
    x = np.asarray(volumes, dtype=np.float64)
    ages = np.asarray(ages, dtype=np.float64)
    brain_ages = np.asarray(brain_ages, dtype=np.float64)
    subjects = np.asarray(subjects)
    folds = subject_folds(subjects, N_FOLDS, seed)
    gram = x @ x.T

    constant = np.empty_like(ages)
    oracle = np.empty_like(ages)
    for fold in np.unique(folds):
        train, test = folds != fold, folds == fold
        constant[test] = ages[train].mean()
        slope, intercept = np.polyfit(brain_ages[train], ages[train], 1)
        oracle[test] = slope * brain_ages[test] + intercept
    ridge_age = kernel_ridge_cv(gram, ages, folds, subjects, seed=seed)
    ridge_brain_age = kernel_ridge_cv(gram, brain_ages, folds, subjects, seed=seed)

    # Share of the voxel variance explained by a linear function of brain age (summed over voxels)
    centred = x - x.mean(axis=0)
    b = brain_ages - brain_ages.mean()
    explained = float(((centred.T @ b) ** 2).sum() / max(float(b @ b), 1e-12))
    total = float((centred ** 2).sum())
    return {
        "n_scans": int(len(ages)), "n_subjects": int(len(np.unique(subjects))),
        "folds": N_FOLDS, "grouped_by": "subject",
        "age_mean": float(ages.mean()), "age_sd": float(ages.std(ddof=1)),
        "age_min": float(ages.min()), "age_max": float(ages.max()),
        "corr_age_brain_age": float(np.corrcoef(ages, brain_ages)[0, 1]),
        "brain_age_variance_share": explained / total if total > 0 else 0.0,
        "constant_age": _scores(ages, constant),
        "ridge_age": _scores(ages, ridge_age),
        "ridge_brain_age": _scores(brain_ages, ridge_brain_age),
        "oracle_age": _scores(ages, oracle),
    }
