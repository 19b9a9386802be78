"""What a brain-age model needs beside its weights to be published from: the calibration.

A brain-age model's bare output regresses to the mean of its training ages, so its gap
(predicted − chronological age) is too high for the young and too low for the old (Le et al.
2018; Smith et al. 2019), and a single scan's estimate says nothing of how far it can be trusted.
`fit_calibration` measures both on predictions the model did not fit:

* **cross-fitted predictions** (`cross_fitted_predictions`): the calibration subjects are split
  into subject-grouped folds and each fold is predicted by a ridge fitted on the others (in-sample
  residuals of a ridge head are optimistic);
* **age-bias correction**: `gap = α·age + β` fitted by least squares on those predictions
  (Beheshti et al. 2019). The corrected gap is `gap − (α·age + β)` (``beheshti``, the default) or,
  de Lange & Cole 2020's, `(predicted − β)/(1 + α) − age` (``delange``: the corrected *prediction*
  `(predicted − b)/a` of the fit `predicted = a·age + b`, with a = 1 + α and b = β). The two are
  proportional — delange = beheshti / (1 + α) — and why beheshti is the default is in
  docs/brain-age.md;
* **a split-conformal prediction interval** for the chronological age: predicted ± q, q the
  ⌈(n + 1)·L⌉-th smallest of the n cross-fitted absolute residuals (infinite when that exceeds n),
  which covers a new scan's age with probability ≥ L when the new scan is exchangeable with the
  calibration scans (docs/brain-age.md says what that promises and when it does not hold).

The calibration travels with the registered model (`CALIBRATION_FILE` in its extra files, a model
card in its MLmodel metadata) and `hpcbrain predict-age` applies it (`apply_calibration`).
No test subject may enter any of it: the job passes only calibration subjects' features here.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Sequence

import numpy as np

__all__ = ["AgeCalibration", "CalibratedAges", "CORRECTIONS", "CALIBRATION_FILE",
           "conformal_quantile", "fit_bias", "cross_fitted_predictions", "fit_calibration",
           "apply_calibration", "DEFAULT_LEVEL", "read_calibration", "load_calibration",
           "write_model_files", "model_card_markdown", "MODEL_CARD_FILE"]

CALIBRATION_FILE = "age_calibration.json"
CORRECTIONS = ("beheshti", "delange")
DEFAULT_LEVEL = 0.90


def conformal_quantile(residuals: Sequence[float], level: float) -> float:
    """The split-conformal radius: the ⌈(n + 1)·level⌉-th smallest of the n absolute residuals,
    +inf when that rank exceeds n (too few calibration scans for this level)."""
    if not 0.0 < float(level) < 1.0:
        raise ValueError(f"interval level must lie in (0, 1), got {level}")
    r = np.sort(np.abs(np.asarray(residuals, dtype=np.float64)))
    if r.size == 0:
        raise ValueError("a conformal interval needs at least one calibration residual")
    # (n + 1)·level in floating point can land a hair above an integer (10 × 0.9 =
    # 9.000000000000002): a rank is an integer, so round such noise away before the ceiling
    rank = math.ceil(round((r.size + 1) * float(level), 9))
    return float("inf") if rank > r.size else float(r[rank - 1])


def fit_bias(predicted: np.ndarray, age: np.ndarray) -> tuple[float, float]:
    """(α, β) of the least-squares line gap = α·age + β, gap = predicted − age."""
    predicted, age = np.asarray(predicted, np.float64), np.asarray(age, np.float64)
    if age.size < 2 or np.ptp(age) == 0:
        raise ValueError("the age-bias correction needs calibration scans of at least two "
                         "different ages")
    alpha, beta = np.polyfit(age, predicted - age, 1)
    return float(alpha), float(beta)


def cross_fitted_predictions(features: np.ndarray, ages: np.ndarray, subjects: np.ndarray, *,
                             folds: int = 5, seed: int = 0,
                             alphas: Sequence[float] | None = None, cv: int = 5) -> np.ndarray:
    """Out-of-fold predicted ages: subjects in `folds` groups, each predicted by the ridge the job
    registers (`fit_ridge`: standardised, alpha by subject-grouped inner CV) fitted on the rest.
    No scan's prediction comes from a ridge that saw its subject."""
    from sklearn.model_selection import GroupKFold

    from hpcbrain.evaluate.ridge import DEFAULT_ALPHAS, fit_ridge

    features = np.asarray(features, np.float64)
    ages = np.asarray(ages, np.float64).reshape(-1)
    subjects = np.asarray(subjects).astype(str)
    n_subjects = np.unique(subjects).size
    if n_subjects < 3:
        raise ValueError(f"cross-fitting needs calibration scans of at least 3 subjects, got "
                         f"{n_subjects}")
    out = np.full(ages.size, np.nan)
    splitter = GroupKFold(n_splits=min(int(folds), n_subjects), shuffle=True,
                          random_state=seed)
    for fit_rows, predict_rows in splitter.split(features, ages, subjects):
        ridge = fit_ridge(features[fit_rows], ages[fit_rows], groups=subjects[fit_rows],
                          seed=seed, alphas=alphas or DEFAULT_ALPHAS, cv=cv)
        out[predict_rows] = ridge.predict(features[predict_rows])
    return out


@dataclass(frozen=True)
class AgeCalibration:
    """The calibration of a brain-age model (see the module doc); JSON-able (`to_dict`)."""

    training_subjects: int             # the cohort the model was fitted on
    training_scans: int
    training_age_min: float            # its chronological age range (years): a prediction
    training_age_max: float            # outside it is flagged `extrapolated`
    calibration_subjects: int          # the scans the calibration was measured on
    calibration_scans: int
    cv_mae: float                      # MAE of their cross-fitted (or held-out) predictions
    bias_alpha: float                  # gap = α·age + β on the cross-fitted predictions
    bias_beta: float
    residuals: list[float]             # cross-fitted |predicted − age|, sorted
    correction: str = "beheshti"       # the corrected gap reported by default
    level: float = DEFAULT_LEVEL       # the interval level used when none is asked for
    source: str = "cross-fitted ridge over the training subjects"
    folds: int = 5
    extra: dict[str, Any] = field(default_factory=dict)   # what else the card should say

    def __post_init__(self) -> None:
        if self.correction not in CORRECTIONS:
            raise ValueError(f"age-bias correction must be one of {CORRECTIONS}, got "
                             f"{self.correction!r}")
        if not self.residuals:
            raise ValueError("age calibration without residuals: no interval can be formed")

    def radius(self, level: Optional[float] = None) -> float:
        return conformal_quantile(self.residuals, self.level if level is None else level)

    def corrected_gap(self, predicted: np.ndarray, age: np.ndarray,
                      correction: Optional[str] = None) -> np.ndarray:
        """The age-bias-corrected gap of each scan (`correction`: this calibration's default)."""
        correction = correction or self.correction
        predicted, age = np.asarray(predicted, np.float64), np.asarray(age, np.float64)
        residual = (predicted - age) - (self.bias_alpha * age + self.bias_beta)
        if correction == "beheshti":
            return residual
        if correction == "delange":
            return residual / (1.0 + self.bias_alpha)
        raise ValueError(f"age-bias correction must be one of {CORRECTIONS}, got {correction!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AgeCalibration":
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"age calibration: unknown fields {sorted(unknown)} (made by a "
                             f"newer hpcbrain?)")
        return cls(**data)

    def card(self) -> dict[str, Any]:
        """What a person reads in the model's MLmodel metadata (everything but the residuals)."""
        card = {k: v for k, v in self.to_dict().items() if k not in ("residuals", "extra")}
        card.update({k: round(v, 4) if isinstance(v, float) else v
                     for k, v in card.items()})
        radius = self.radius()     # None: too few calibration scans for the level
        card["interval_radius_years"] = round(radius, 4) if math.isfinite(radius) else None
        card["correction_formula"] = {
            "beheshti": "gap - (bias_alpha * age + bias_beta)",
            "delange": "(predicted - bias_beta) / (1 + bias_alpha) - age"}[self.correction]
        card.update(self.extra)
        return card


def fit_calibration(predicted: np.ndarray, ages: np.ndarray, subjects: np.ndarray, *,
                    training_ages: Optional[np.ndarray] = None,
                    training_subjects: Optional[np.ndarray] = None,
                    correction: str = "beheshti", level: float = DEFAULT_LEVEL,
                    folds: int = 5, source: Optional[str] = None,
                    extra: Optional[dict] = None) -> AgeCalibration:
    """The calibration from cross-fitted predictions `predicted` of scans with known `ages` of
    `subjects` (all three per scan). `training_ages` / `training_subjects`: the scans the model
    was fitted on, when they are not the calibration scans."""
    predicted = np.asarray(predicted, np.float64).reshape(-1)
    ages = np.asarray(ages, np.float64).reshape(-1)
    subjects = np.asarray(subjects).astype(str).reshape(-1)
    if not predicted.size == ages.size == subjects.size:
        raise ValueError("calibration: one prediction, age and subject per scan")
    if not (np.isfinite(predicted).all() and np.isfinite(ages).all()):
        raise ValueError("calibration: every calibration scan needs a finite age and prediction")
    alpha, beta = fit_bias(predicted, ages)
    residuals = np.sort(np.abs(predicted - ages))
    trained_ages = ages if training_ages is None else np.asarray(training_ages, np.float64)
    trained_subjects = subjects if training_subjects is None else np.asarray(training_subjects)
    calibration = AgeCalibration(
        training_subjects=int(np.unique(trained_subjects.astype(str)).size),
        training_scans=int(trained_ages.size), training_age_min=float(trained_ages.min()),
        training_age_max=float(trained_ages.max()),
        calibration_subjects=int(np.unique(subjects).size), calibration_scans=int(ages.size),
        cv_mae=float(residuals.mean()), bias_alpha=alpha, bias_beta=beta,
        residuals=[float(r) for r in residuals], correction=correction, level=float(level),
        folds=int(folds), extra=dict(extra or {}),
        **({"source": source} if source else {}))
    calibration.radius()           # the level is checked now, not at the first prediction
    return calibration


@dataclass
class CalibratedAges:
    """`apply_calibration`'s columns, one entry per scan."""

    predicted_age: np.ndarray
    interval_low: np.ndarray
    interval_high: np.ndarray
    extrapolated: np.ndarray               # bool: prediction outside the calibration ages
    age: Optional[np.ndarray] = None       # chronological age, when known
    brain_age_gap: Optional[np.ndarray] = None
    brain_age_gap_corrected: Optional[np.ndarray] = None
    level: float = DEFAULT_LEVEL


def apply_calibration(calibration: AgeCalibration, predicted: np.ndarray,
                      ages: Optional[np.ndarray] = None, level: Optional[float] = None,
                      correction: Optional[str] = None) -> CalibratedAges:
    """Intervals and extrapolation flags for `predicted` ages; gaps too when `ages` are given."""
    predicted = np.asarray(predicted, np.float64).reshape(-1)
    level = calibration.level if level is None else float(level)
    radius = calibration.radius(level)
    out = CalibratedAges(predicted, predicted - radius, predicted + radius,
                         (predicted < calibration.training_age_min)
                         | (predicted > calibration.training_age_max),
                         level=level)
    if ages is not None:
        ages = np.asarray(ages, np.float64).reshape(-1)
        out.age = ages
        out.brain_age_gap = predicted - ages
        out.brain_age_gap_corrected = calibration.corrected_gap(predicted, ages, correction)
    return out


MODEL_CARD_FILE = "model_card.md"


def model_card_markdown(calibration: AgeCalibration, model_name: str = "brain-age model") -> str:
    """The calibration as a page a person reads (the model's extra_files/model_card.md)."""
    c = calibration
    lines = [
        f"# {model_name}", "",
        "Predicts chronological age (years) from a T1w scan prepared as its training store was.",
        "", "## Training cohort",
        f"- {c.training_subjects} subjects, {c.training_scans} scans, ages "
        f"{c.training_age_min:.1f}–{c.training_age_max:.1f} years; a prediction outside this "
        f"range is flagged `extrapolated`.",
        "", "## Calibration (never on test subjects)",
        f"- Measured on {c.calibration_scans} scans of {c.calibration_subjects} subjects: "
        f"{c.source}.",
        f"- Cross-validated MAE {c.cv_mae:.2f} years.",
        f"- Age bias: gap = {c.bias_alpha:.4f} · age {c.bias_beta:+.3f} (gap = predicted − age).",
        f"- Corrected gap (default, {c.correction}): "
        f"`{c.card()['correction_formula']}`; the other correction is available "
        f"(`--correction`).",
        f"- {100 * c.level:.0f} % split-conformal interval: predicted ± {c.radius():.2f} years "
        f"(other levels with `--level`). It covers a new scan's age at that rate when the scan "
        f"is drawn like the calibration scans; see docs/brain-age.md for when it does not hold.",
    ]
    for key, value in c.extra.items():
        lines.append(f"- {key}: {value}")
    lines += ["", "Report the uncorrected MAE, RMSE, r and R² beside any corrected figure "
                  "(de Lange et al. 2022)."]
    return "\n".join(lines) + "\n"


def write_model_files(calibration: AgeCalibration, folder, model_name: str) -> list:
    """`CALIBRATION_FILE` (what predict-age reads) and `MODEL_CARD_FILE` in `folder`, for the
    registered model's extra files."""
    import json
    from pathlib import Path

    from hpcbrain.atomic import write_text_atomic

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / CALIBRATION_FILE
    write_text_atomic(data, json.dumps(calibration.to_dict(), indent=1) + "\n")
    card = folder / MODEL_CARD_FILE
    write_text_atomic(card, model_card_markdown(calibration, model_name))
    return [data, card]


def read_calibration(path) -> AgeCalibration:
    """A calibration from its JSON file (`CALIBRATION_FILE`)."""
    import json
    from pathlib import Path

    path = Path(path)
    try:
        return AgeCalibration.from_dict(json.loads(path.read_text()))
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{path}: not a readable age calibration ({exc})") from None


def load_calibration(model_dir) -> Optional[AgeCalibration]:
    """The calibration a downloaded model carries, or None (a model registered before it
    existed, or an encoder)."""
    from pathlib import Path

    path = Path(model_dir) / "extra_files" / CALIBRATION_FILE
    return read_calibration(path) if path.is_file() else None
