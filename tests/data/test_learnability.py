"""The learnability report of a cohort: hand-made data with known answers, and the two synth
presets as they report themselves."""
from __future__ import annotations

import json

import numpy as np
import pytest

from hpcbrain.data.learnability import cohort_learnability, kernel_ridge_cv, subject_folds


def test_subject_folds_keep_each_subject_in_one_fold():
    subjects = np.repeat(np.arange(12), 3)
    folds = subject_folds(subjects, 5, seed=0)
    for s in range(12):
        assert len(set(folds[subjects == s])) == 1
    assert sorted(set(folds)) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="3 subjects cannot fill 5"):
        subject_folds(np.arange(3), 5, seed=0)


def test_kernel_ridge_recovers_a_linear_signal_and_matches_the_primal_solution():
    rng = np.random.default_rng(0)
    n, p = 60, 200
    subjects = np.repeat(np.arange(20), 3)
    x = rng.normal(size=(n, p))
    w = rng.normal(size=p)
    y = x @ w / np.sqrt(p) + 50
    folds = subject_folds(subjects, 5, seed=0)
    predicted = kernel_ridge_cv(x @ x.T, y, folds, subjects, alphas=(1e-6,))
    # with a vanishing penalty the dual solution is the minimum-norm interpolant: compare it,
    # fold by fold, with the primal least-squares fit on centred features
    for fold in range(5):
        train, test = folds != fold, folds == fold
        mu, ybar = x[train].mean(0), y[train].mean()
        coef = np.linalg.lstsq(x[train] - mu, y[train] - ybar, rcond=None)[0]
        np.testing.assert_allclose(predicted[test], ybar + (x[test] - mu) @ coef, rtol=1e-4,
                                   atol=1e-4)


def test_report_on_hand_made_data():
    rng = np.random.default_rng(1)
    subjects = np.repeat(np.arange(30), 4)
    ages = np.repeat(rng.uniform(60, 90, 30), 4) + np.tile(np.arange(4.0), 30)
    brain_ages = ages + np.repeat(rng.normal(0, 3, 30), 4)
    direction = rng.normal(size=500)
    volumes = np.outer(brain_ages - 75, direction) + rng.normal(0, 5, (120, 500))
    report = cohort_learnability(volumes, ages, brain_ages, subjects, seed=0)
    # the constant predictor: mean |age − mean of the other folds' ages|, worked out here
    folds = subject_folds(subjects, 5, seed=0)
    constant = np.mean([abs(a - ages[folds != f].mean()) for a, f in zip(ages, folds)])
    assert report["constant_age"]["mae"] == pytest.approx(constant)
    assert report["ridge_brain_age"]["r2"] > 0.9          # the images encode brain age
    assert report["ridge_age"]["mae"] < report["constant_age"]["mae"]
    assert report["oracle_age"]["mae"] < report["constant_age"]["mae"]
    assert report["corr_age_brain_age"] == pytest.approx(np.corrcoef(ages, brain_ages)[0, 1])
    assert 0.3 < report["brain_age_variance_share"] < 1.0
    assert report["n_subjects"] == 30 and report["n_scans"] == 120


@pytest.mark.slow
def test_synth_presets_report_their_learnability(tmp_path):
    """The registered preset makes age visible at 32³ where the raw one drowns it in pose and
    head size: every cohort carries that measurement in derivatives/synth/learnability.json."""
    from hpcbrain.data.synth import LEARNABILITY, synthesize_cohort

    reports = {}
    for preset in ("registered", "raw"):
        summary = synthesize_cohort(tmp_path / preset, 12, seed=0, voxel_size_mm=4.0,
                                    progress=False, preset=preset)
        written = json.loads((tmp_path / preset / LEARNABILITY).read_text())
        assert written == json.loads(json.dumps(summary.learnability))
        assert written["preset"] == preset and written["input_size"] == 32
        reports[preset] = written
    registered, raw = reports["registered"], reports["raw"]
    assert registered["brain_age_variance_share"] > 1.5 * raw["brain_age_variance_share"]
    assert registered["ridge_brain_age"]["r2"] > raw["ridge_brain_age"]["r2"]
    assert registered["ridge_brain_age"]["r2"] > 0.8
    # the same subjects and ages: the tables do not depend on the preset
    assert registered["constant_age"] == raw["constant_age"]
    assert registered["oracle_age"] == raw["oracle_age"]
