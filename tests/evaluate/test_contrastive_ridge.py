"""Ridge age regression on frozen features, on constructed data whose answer is known."""
from __future__ import annotations

import numpy as np
import pytest

from hpcbrain.evaluate.ridge import comparison_table, evaluate_after_training, ridge_age_mae


def cohort(n_subjects=20, visits=2, seed=0):
    rng = np.random.default_rng(seed)
    ages = rng.uniform(20, 80, n_subjects)[:, None] + 2.0 * np.arange(visits)[None]
    subjects = np.repeat(np.arange(n_subjects), visits)
    return ages.reshape(-1), subjects


def test_features_that_encode_age_exactly_give_zero_mae():
    # age = 2·f0 − f1 + 30 exactly; 10 more pure-noise features. Ridge with the smallest alpha
    # recovers it: MAE ≈ 0 on the test subjects, and the inner CV picks alpha = 1e-3.
    ages, subjects = cohort()
    rng = np.random.default_rng(1)
    f1 = rng.normal(size=ages.size)
    f0 = (ages - 30 + f1) / 2
    x = np.column_stack([f0, f1, rng.normal(size=(ages.size, 10))])
    train = subjects < 15
    result = ridge_age_mae(x[train], ages[train], x[~train], ages[~train],
                           groups=subjects[train], seeds=3)
    assert result.mae_mean < 0.05 and result.mae_std < 0.01
    assert result.alpha_per_seed == [1e-3] * 3
    assert (result.n_train, result.n_test) == (30, 10)
    assert result.seeds == [0, 1, 2]
    metrics = result.metrics()
    assert metrics["ridge/test_mae_mean"] == result.mae_mean
    assert set(metrics) >= {"ridge/test_mae_std", "ridge/test_mae_seed2", "ridge/alpha_seed0"}


def test_features_without_age_information_predict_the_training_mean():
    # Features independent of age: the best ridge is the heaviest (alpha 1000), whose
    # prediction is ≈ the mean training age, so the MAE is that of the constant predictor.
    ages, subjects = cohort(n_subjects=40, seed=2)
    x = np.random.default_rng(3).normal(size=(ages.size, 5))
    train = subjects < 30
    result = ridge_age_mae(x[train], ages[train], x[~train], ages[~train],
                           groups=subjects[train], seeds=2)
    constant = np.abs(ages[~train] - ages[train].mean()).mean()
    assert result.alpha_per_seed == [1000.0, 1000.0]
    assert result.mae_mean == pytest.approx(constant, rel=0.05)


def test_input_checks():
    x = np.zeros((6, 2))
    with pytest.raises(ValueError, match="same d"):
        ridge_age_mae(x, np.arange(6.0), np.zeros((2, 3)), np.arange(2.0))
    with pytest.raises(ValueError, match="finite age"):
        ridge_age_mae(x, np.array([1, 2, 3, 4, 5, np.nan]), x[:2], np.arange(2.0))
    with pytest.raises(ValueError, match="2 subjects"):
        ridge_age_mae(x, np.arange(6.0), x[:2], np.arange(2.0), groups=["a"] * 6)


def test_comparison_table_sorts_best_first_and_summarises_repeated_methods():
    rows = [{"run": "a1", "method": "adapn", "backbone": "resnet18", "mae_mean": 3.7,
             "mae_std": 0.2, "n_test": 60},
            {"run": "e1", "method": "exponential", "backbone": "resnet18", "mae_mean": 3.8,
             "mae_std": 0.2, "n_test": 60},
            {"run": "a2", "method": "adapn", "backbone": "resnet18", "mae_mean": 3.9,
             "mae_std": 0.1, "n_test": 60}]
    table = comparison_table(rows)
    lines = table.splitlines()
    assert lines[2].startswith("| a1 | adapn") and lines[3].startswith("| e1 | exponential")
    assert "| adapn | 2 | 3.800 ± 0.100 |" in table


def test_other_methods_are_not_evaluated():
    from hpcbrain.methods.base import Method

    class NotContrastive(Method):     # ridge_evaluation stays False, as LSOR's
        pass

    assert evaluate_after_training(None, NotContrastive(), None, None, None, None, 0) is None
