"""The brain-age calibration on numbers worked out by hand: the conformal radius, the age-bias
line and both corrections, cross-fitting that never lets a subject predict itself."""
from __future__ import annotations

import json

import numpy as np
import pytest

from hpcbrain.evaluate.age_calibration import (
    AgeCalibration,
    apply_calibration,
    conformal_quantile,
    cross_fitted_predictions,
    fit_bias,
    fit_calibration,
    load_calibration,
    write_model_files,
)


def test_conformal_radius_is_the_ceil_n_plus_1_times_level_th_residual():
    nine = [3, -1, 2, 9, 5, 4, 7, 6, 8]          # |r| sorted: 1 … 9
    assert conformal_quantile(nine, 0.9) == 9      # ⌈10 · 0.9⌉ = 9 (not 10: float noise)
    assert conformal_quantile(nine, 0.8) == 8      # ⌈10 · 0.8⌉ = 8
    assert conformal_quantile(nine, 0.5) == 5      # ⌈10 · 0.5⌉ = 5
    assert conformal_quantile(nine, 0.95) == float("inf")   # ⌈9.5⌉ = 10 > 9 residuals
    assert conformal_quantile(range(1, 20), 0.9) == 18       # n 19: ⌈20 · 0.9⌉ = 18
    assert conformal_quantile(range(1, 20), 0.85) == 17      # ⌈20 · 0.85⌉ = 17
    with pytest.raises(ValueError, match=r"level must lie in \(0, 1\)"):
        conformal_quantile(nine, 1.0)


def test_bias_line_and_both_corrections_by_hand():
    # ages 60, 70, 80 predicted 66, 70, 74: gaps 6, 0, −6 → gap = −0.6 · age + 42
    alpha, beta = fit_bias(np.array([66.0, 70.0, 74.0]), np.array([60.0, 70.0, 80.0]))
    assert alpha == pytest.approx(-0.6) and beta == pytest.approx(42.0)
    calibration = fit_calibration([66.0, 70.0, 74.0], [60.0, 70.0, 80.0], ["a", "b", "c"])
    # a new scan: age 65, predicted 72 → gap 7; expected gap −0.6 · 65 + 42 = 3
    assert calibration.corrected_gap(np.array([72.0]), np.array([65.0])) == pytest.approx([4.0])
    # de Lange & Cole: (72 − 42) / (1 − 0.6) − 65 = 75 − 65 = 10 (= 4 / 0.4)
    assert calibration.corrected_gap(np.array([72.0]), np.array([65.0]), "delange") == \
        pytest.approx([10.0])
    # on the calibration scans themselves the corrected gap is 0: no age trend left
    assert calibration.corrected_gap(np.array([66.0, 70.0, 74.0]),
                                     np.array([60.0, 70.0, 80.0])) == pytest.approx([0, 0, 0])
    assert calibration.cv_mae == pytest.approx(4.0)           # (6 + 0 + 6) / 3
    assert calibration.residuals == [0.0, 6.0, 6.0]
    with pytest.raises(ValueError, match="at least two different ages"):
        fit_bias(np.array([70.0, 71.0]), np.array([65.0, 65.0]))


def test_applied_calibration_gives_intervals_flags_and_gaps():
    # residuals 1 … 9 → the 80 % radius is 8; trained on ages 60–80
    calibration = AgeCalibration(
        training_subjects=3, training_scans=9, training_age_min=60.0, training_age_max=80.0,
        calibration_subjects=3, calibration_scans=9, cv_mae=5.0, bias_alpha=-0.5,
        bias_beta=35.0, residuals=[float(k) for k in range(1, 10)], level=0.8)
    out = apply_calibration(calibration, np.array([59.0, 70.0, 81.0]),
                            ages=np.array([60.0, 72.0, 78.0]))
    assert out.interval_low.tolist() == [51.0, 62.0, 73.0]
    assert out.interval_high.tolist() == [67.0, 78.0, 89.0]
    assert out.extrapolated.tolist() == [True, False, True]
    assert out.brain_age_gap.tolist() == [-1.0, -2.0, 3.0]
    # gap − (−0.5 · age + 35): −1 − 5 = −6; −2 − (−1) = −1; 3 − (−4) = 7
    assert out.brain_age_gap_corrected.tolist() == pytest.approx([-6.0, -1.0, 7.0])
    # another level from the same residuals: ⌈10 · 0.5⌉ = 5
    assert apply_calibration(calibration, np.array([70.0]), level=0.5).interval_high[0] == 75.0


def test_cross_fitted_predictions_never_let_a_subject_predict_itself():
    """Features that identify the subject (one-hot) and per-subject ages: a ridge that saw the
    subject recalls its age; out of fold, the subject's own column was never fitted and the
    prediction is the mean of the other subjects' ages."""
    rng = np.random.default_rng(0)
    n_subjects, per = 12, 3
    subjects = np.repeat([f"s{k}" for k in range(n_subjects)], per)
    subject_age = rng.uniform(60, 90, n_subjects)
    ages = np.repeat(subject_age, per) + rng.normal(0, 0.1, n_subjects * per)
    features = np.repeat(np.eye(n_subjects), per, axis=0)
    oof = cross_fitted_predictions(features, ages, subjects, folds=4, seed=0, alphas=[1e-3])
    assert np.isfinite(oof).all()
    from hpcbrain.evaluate.ridge import fit_ridge

    in_sample = fit_ridge(features, ages, groups=subjects, alphas=[1e-3]).predict(features)
    assert np.abs(in_sample - ages).mean() < 0.2
    # out of fold a subject gets no information of its own: its prediction does not follow its
    # age (in-sample it does, almost exactly)
    assert np.abs(oof - ages).mean() > 5.0
    assert abs(np.corrcoef(oof, ages)[0, 1]) < 0.9


def test_calibration_round_trips_through_the_model_files(tmp_path):
    calibration = fit_calibration([66.0, 70.0, 74.0, 71.0], [60.0, 70.0, 80.0, 69.0],
                                  ["a", "b", "c", "c"], level=0.5,
                                  training_ages=[60.0, 70.0, 80.0, 69.0, 91.0],
                                  training_subjects=["a", "b", "c", "c", "d"])
    assert calibration.training_subjects == 4 and calibration.training_age_max == 91.0
    assert calibration.calibration_subjects == 3 and calibration.calibration_scans == 4
    model_dir = tmp_path / "model"
    files = write_model_files(calibration, model_dir / "extra_files", "t-age")
    assert load_calibration(model_dir) == calibration
    card = files[1].read_text()
    assert "4 subjects, 5 scans, ages 60.0–91.0" in card and "50 % split-conformal" in card
    assert json.loads(files[0].read_text())["bias_alpha"] == pytest.approx(calibration.bias_alpha)
    assert load_calibration(tmp_path / "nothing") is None
    files[0].write_text(json.dumps({**calibration.to_dict(), "surprise": 1}))
    with pytest.raises(ValueError, match="unknown fields"):
        load_calibration(model_dir)
    with pytest.raises(ValueError, match="must be one of"):
        fit_calibration([1.0, 2.0, 3.0], [1.0, 2.0, 4.0], ["a", "b", "c"], correction="smith")
