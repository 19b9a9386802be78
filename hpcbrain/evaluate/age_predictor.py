"""A registered brain-age predictor: a trained encoder and its ridge head as one torch module.

After a contrastive run the job fits the same ridge its evaluation scores (standardised
features, alpha by subject-grouped inner CV, refit on the training scans) and registers
`AgePredictor(encoder, ridge)` as `tracking.registered_age_model`. Its output is the predicted
age in years per scan, so

    hpcbrain predict-age models:/hpcbrain-adapn-age@current scan1.nii.gz ... --out ages.csv

needs nothing but the NIfTI files (preprocessed as the converter does), while `hpcbrain embed` on
the encoder keeps giving features. The model also carries its calibration
(`age_calibration`: interval, age-bias correction, training age range), applied here to give
each scan an interval, an extrapolation flag and, when its age is known, the corrected gap.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from hpcbrain.atomic import atomic_write
from hpcbrain.evaluate.age_calibration import (
    AgeCalibration,
    CalibratedAges,
    apply_calibration,
    load_calibration,
)

__all__ = ["AgePredictor", "predict_ages", "calibrated", "write_ages", "rows_of", "COLUMNS",
           "AGE_COLUMNS"]


class AgePredictor(nn.Module):
    """volumes [B, 1, S, S, S] → ages [B]: ((encoder(x) − mean) / scale) · coef + intercept."""

    def __init__(self, encoder: nn.Module, mean: np.ndarray, scale: np.ndarray,
                 coef: np.ndarray, intercept: float) -> None:
        super().__init__()
        self.encoder = encoder
        d = int(np.asarray(coef).size)
        for name, value in (("mean", mean), ("scale", scale), ("coef", coef)):
            value = np.asarray(value, dtype=np.float64).reshape(-1)
            if value.size != d:
                raise ValueError(f"AgePredictor: {name} has {value.size} entries, coef {d}")
            self.register_buffer(name, torch.from_numpy(value).float())
        self.register_buffer("intercept", torch.tensor(float(intercept)))

    @classmethod
    def from_ridge(cls, encoder: nn.Module, fitted) -> "AgePredictor":
        """From a fitted `hpcbrain.evaluate.ridge.fit_ridge` result (scaler → ridge pipeline,
        or ridge alone)."""
        pipeline = getattr(fitted, "best_estimator_", fitted)
        ridge = pipeline.named_steps["ridge"]
        coef = np.asarray(ridge.coef_, dtype=np.float64).reshape(-1)
        scaler = pipeline.named_steps.get("standardscaler")
        mean = scaler.mean_ if scaler is not None else np.zeros_like(coef)
        scale = scaler.scale_ if scaler is not None else np.ones_like(coef)
        return cls(encoder, mean, scale, coef, float(ridge.intercept_))

    def forward(self, x: Tensor) -> Tensor:
        features = self.encoder(x).float()
        return ((features - self.mean) / self.scale) @ self.coef + self.intercept


def predict_ages(model_uri: str, scans: Sequence[str | Path], batch_size: int = 8
                 ) -> tuple[np.ndarray, Optional[AgeCalibration]]:
    """Predicted age (years) of each NIfTI file in `scans` with a registered `AgePredictor`,
    and the calibration the model carries (None for a model registered before calibrations)."""
    from hpcbrain.evaluate.embed import apply_to_scans, load_registered

    module, model_dir, preparation = load_registered(model_uri)
    ages = apply_to_scans(module, scans, preparation, batch_size)
    if ages.ndim != 1:
        raise ValueError(f"{model_uri} gives outputs of shape {ages.shape[1:]} per scan, not one "
                         f"age: is it an encoder? `hpcbrain embed` gives an encoder's features; "
                         f"predict-age needs the run's age model (tracking.registered_age_model)")
    return ages, load_calibration(model_dir)


def calibrated(predicted: np.ndarray, calibration: Optional[AgeCalibration],
               ages: Optional[np.ndarray] = None, level: Optional[float] = None,
               correction: Optional[str] = None) -> CalibratedAges:
    """`apply_calibration`, or for an uncalibrated (older) model the bare predictions and gaps
    with NaN where the calibration would be."""
    if calibration is not None:
        return apply_calibration(calibration, predicted, ages, level, correction)
    nan = np.full(len(predicted), np.nan)
    out = CalibratedAges(np.asarray(predicted, np.float64), nan, nan,
                         np.zeros(len(predicted), bool), level=float("nan"))
    if ages is not None:
        out.age, out.brain_age_gap, out.brain_age_gap_corrected = ages, predicted - ages, nan
    return out


#: The CSV's columns: always, and when the chronological age is known.
COLUMNS = ("path", "predicted_age", "interval_low", "interval_high", "extrapolated")
AGE_COLUMNS = ("age", "brain_age_gap", "brain_age_gap_corrected")


def rows_of(result: CalibratedAges) -> list[dict[str, str]]:
    """One dict per scan of the columns' values as text (4 decimals; n/a where unknown)."""
    def cell(value) -> str:
        # unknown → n/a; an unbounded interval (too few calibration scans for the level) → ±inf
        return "n/a" if np.isnan(value) else f"{float(value):.4f}"

    out = []
    for i in range(len(result.predicted_age)):
        row = {"predicted_age": cell(result.predicted_age[i]),
               "interval_low": cell(result.interval_low[i]),
               "interval_high": cell(result.interval_high[i]),
               "extrapolated": "true" if result.extrapolated[i] else "false"}
        if result.age is not None:
            row.update(age=cell(result.age[i]), brain_age_gap=cell(result.brain_age_gap[i]),
                       brain_age_gap_corrected=cell(result.brain_age_gap_corrected[i]))
        out.append(row)
    return out


def write_ages(path: Path, scans: Sequence[str | Path], result: CalibratedAges) -> Path:
    """CSV with `COLUMNS` (and `AGE_COLUMNS` when ages are known); written atomically."""
    path = Path(path)
    header = list(COLUMNS) + (list(AGE_COLUMNS) if result.age is not None else [])
    with atomic_write(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=header)
        writer.writeheader()
        for scan, row in zip(scans, rows_of(result)):
            writer.writerow({"path": str(scan), **row})
    return path
