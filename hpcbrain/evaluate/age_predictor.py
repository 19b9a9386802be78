"""A registered brain-age predictor: a trained encoder and its ridge head as one torch module.

After a contrastive run the job fits the same ridge its evaluation scores (standardised
features, alpha by subject-grouped inner CV, refit on the training scans) and registers
`AgePredictor(encoder, ridge)` as `tracking.registered_age_model`. Its output is the predicted
age in years per scan, so

    hpcbrain predict-age models:/hpcbrain-adapn-age@current scan1.nii.gz ... --out ages.csv

needs nothing but the NIfTI files (preprocessed as the converter does), while `hpcbrain embed` on
the encoder keeps giving features.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from hpcbrain.atomic import atomic_write

__all__ = ["AgePredictor", "predict_ages", "write_ages"]


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


def predict_ages(model_uri: str, scans: Sequence[str | Path], batch_size: int = 8) -> np.ndarray:
    """Predicted age (years) of each NIfTI file in `scans` with a registered `AgePredictor`."""
    from hpcbrain.evaluate.embed import apply_to_scans, load_registered

    module, _, preparation = load_registered(model_uri)
    ages = apply_to_scans(module, scans, preparation, batch_size)
    if ages.ndim != 1:
        raise ValueError(f"{model_uri} gives outputs of shape {ages.shape[1:]} per scan, not one "
                         f"age: is it an encoder? `hpcbrain embed` gives an encoder's features; "
                         f"predict-age needs the run's age model (tracking.registered_age_model)")
    return ages


def write_ages(path: Path, scans: Sequence[str | Path], ages: np.ndarray) -> Path:
    """CSV with columns path, predicted_age; written atomically."""
    path = Path(path)
    with atomic_write(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "predicted_age"])
        for scan, age in zip(scans, ages):
            writer.writerow([str(scan), f"{float(age):.4f}"])
    return path
