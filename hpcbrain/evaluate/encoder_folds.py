"""Calibrating an age model whose encoder trained on ages: out-of-fold *encoders*.

A method that learns from ages (AdapN and the rest of the regression-aware family) fits its
training subjects' ages in the encoder itself, so a ridge cross-fitted over those subjects'
features still predicts them too well (measured in docs/brain-age.md: 67 % coverage of a 90 %
interval). Holding validation subjects out of the encoder is honest but leaves few of them to
fit the age-bias line on (40 of 160: its slope moved by ±0.05 between runs, enough to leave
ρ(corrected gap, age) at −0.2 on a new cohort).

`evaluate.age_calibration_subjects: encoder-folds` does what cross-fitting does for a ridge one
level up: the job first trains K *fold runs* of the same config (`data.n_folds = K`, fold k the
test fold; K = `evaluate.age_calibration_folds`), each of which writes its test subjects'
predicted ages (`PREDICTIONS_FILE`: an encoder and a ridge that never saw those subjects). Then
it trains the model it registers on every subject and calibrates it on the union of those
out-of-fold predictions: every training subject calibrates, none is predicted by a model that
saw it. The fold models train on (K − 1)/K of the subjects, so their residuals are, if anything,
a little larger than the registered model's: the interval errs wide. Cost: K + 1 trainings.

Fold runs live in `<run folder>/age-calibration/fold-<k>/` (composed by
`job.age_calibration_fold_configs`), are tracked as runs of their own and register nothing; a
rerun reuses the finished ones (each is a run folder that resumes).
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Sequence

import numpy as np

__all__ = ["SOURCE", "PREDICTIONS_FILE", "FOLDS_FOLDER", "write_predictions",
           "read_fold_predictions", "FoldPredictionsError"]

SOURCE = "encoder-folds"
PREDICTIONS_FILE = "age_predictions.csv"
FOLDS_FOLDER = "age-calibration"
_COLUMNS = ("store_row", "subject", "age", "predicted_age")


class FoldPredictionsError(RuntimeError):
    """The fold runs' predictions cannot calibrate this run (missing, overlapping, stale)."""


def write_predictions(path: Path, store_rows: np.ndarray, subjects: np.ndarray,
                      ages: np.ndarray, predicted: np.ndarray) -> Path:
    """One row per predicted scan: its row in the store, subject, age and predicted age."""
    from hpcbrain.atomic import write_text_atomic

    lines = ["\t".join(_COLUMNS)]
    lines += [f"{int(r)}\t{s}\t{float(a)!r}\t{float(p)!r}"
              for r, s, a, p in zip(store_rows, subjects, ages, predicted)]
    write_text_atomic(Path(path), "\n".join(lines) + "\n")
    return Path(path)


def read_fold_predictions(fold_runs: Sequence[Path], subjects: Sequence[str], ages: np.ndarray,
                          store: str) -> tuple[np.ndarray, np.ndarray]:
    """(store rows, out-of-fold predicted ages) over the `fold_runs` (their run folders): each
    scan predicted by exactly one fold run, and the store the same one (its subjects and ages
    per row agree with `subjects` and `ages`, the columns of `store`)."""
    subjects = np.asarray(subjects).astype(str)
    ages = np.asarray(ages, np.float64)
    rows, predicted = [], []
    for fold, folder in enumerate(fold_runs):
        path = Path(folder) / PREDICTIONS_FILE
        if not path.exists():
            raise FoldPredictionsError(
                f"{path} is missing: fold run {fold} of the age calibration did not "
                f"evaluate (does the method have a ridge head, and evaluate.ridge on?)")
        with open(path, newline="") as handle:
            table = list(csv.DictReader(handle, delimiter="\t"))
        for line, row in enumerate(table, start=2):
            index = int(row["store_row"])
            if (index >= subjects.size or subjects[index] != row["subject"]
                    or not np.isclose(ages[index], float(row["age"]))):
                raise FoldPredictionsError(
                    f"{path}, line {line}: store row {index} ({row['subject']}, age "
                    f"{row['age']}) is not that row of {store}: the fold runs were made "
                    f"from another store; delete {path.parent.parent} and rerun")
            rows.append(index)
            predicted.append(float(row["predicted_age"]))
    rows_array = np.asarray(rows, dtype=np.int64)
    if np.unique(rows_array).size != rows_array.size:
        raise FoldPredictionsError("the age-calibration fold runs predicted a scan twice: their "
                                   "test folds overlap (were they made with other split "
                                   "settings? delete the age-calibration folder and rerun)")
    return rows_array, np.asarray(predicted, np.float64)
