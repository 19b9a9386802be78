"""Age regression on frozen features: the AdapN paper's evaluation (after Barbano et al. 2023).

Ridge regression on the (standardised) features of the training scans, its alpha chosen by an
inner cross-validation over the training scans (folds by subject, so two scans of one subject
never sit on both sides), then the mean absolute error of the predicted age on the test scans.
Repeated over seeds (the inner folds are shuffled with each seed) and reported as mean ± std.

    result = ridge_age_mae(train_x, train_y, test_x, test_y, groups=train_subjects)

After a contrastive training run the job calls `evaluate_after_training` on rank 0: features of
the train and test scans of the run's split (un-augmented), the ridge evaluation, MLflow metrics
``ridge/test_mae_mean`` … and a table comparing every run of the experiment that has them
(``ridge_comparison.md`` / ``.csv``, logged as artifacts).
"""
from __future__ import annotations

import csv
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

log = logging.getLogger(__name__)

__all__ = ["RidgeResult", "ridge_age_mae", "fit_ridge", "extract_features", "evaluate_after_training",
           "comparison_table", "DEFAULT_ALPHAS", "METRIC", "AgeEvaluation", "EvaluationContext"]

DEFAULT_ALPHAS = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0)
METRIC = "ridge/test_mae_mean"


@dataclass
class RidgeResult:
    mae_mean: float                  # test MAE, mean over seeds
    mae_std: float                   # … and its std (population, over seeds)
    mae_per_seed: list[float]
    alpha_per_seed: list[float]
    train_mae_mean: float            # in-sample MAE of the refit ridge (for over-fit checks)
    n_train: int
    n_test: int
    seeds: list[int] = field(default_factory=list)

    def metrics(self, prefix: str = "ridge/") -> dict[str, float]:
        out = {f"{prefix}test_mae_mean": self.mae_mean, f"{prefix}test_mae_std": self.mae_std,
               f"{prefix}train_mae_mean": self.train_mae_mean,
               f"{prefix}n_train": float(self.n_train), f"{prefix}n_test": float(self.n_test)}
        for seed, mae, alpha in zip(self.seeds, self.mae_per_seed, self.alpha_per_seed):
            out[f"{prefix}test_mae_seed{seed}"] = mae
            out[f"{prefix}alpha_seed{seed}"] = alpha
        return out


def _inner_cv(n: int, groups: Optional[np.ndarray], folds: int, seed: int):
    from sklearn.model_selection import GroupKFold, KFold

    if groups is None:
        return KFold(n_splits=max(2, min(folds, n)), shuffle=True, random_state=seed)
    n_groups = len(np.unique(groups))
    if n_groups < 2:
        raise ValueError("ridge inner CV needs training scans of at least 2 subjects")
    return GroupKFold(n_splits=max(2, min(folds, n_groups)), shuffle=True, random_state=seed)


def fit_ridge(train_x: np.ndarray, train_y: np.ndarray, *, groups: Optional[Sequence] = None,
              seed: int = 0, alphas: Sequence[float] = DEFAULT_ALPHAS, cv: int = 5,
              standardize: bool = True):
    """The fitted model `ridge_age_mae` scores: (StandardScaler →) Ridge, alpha chosen by an
    inner CV on the training scans (grouped by subject when `groups` is given, shuffled with
    `seed`), refit on all of them. A fitted sklearn GridSearchCV (``best_estimator_``)."""
    from sklearn.linear_model import Ridge
    from sklearn.model_selection import GridSearchCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    train_y = np.asarray(train_y, dtype=np.float64).reshape(-1)
    group_array = None if groups is None else np.asarray(groups).astype(str)
    model = make_pipeline(StandardScaler(), Ridge()) if standardize else make_pipeline(Ridge())
    search = GridSearchCV(model, {"ridge__alpha": [float(a) for a in alphas]},
                          cv=_inner_cv(train_y.size, group_array, cv, seed),
                          scoring="neg_mean_absolute_error", refit=True)
    search.fit(np.asarray(train_x, dtype=np.float64), train_y, groups=group_array)
    return search


def ridge_age_mae(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                  test_y: np.ndarray, *, groups: Optional[Sequence] = None,
                  seeds: Sequence[int] | int = 5, alphas: Sequence[float] = DEFAULT_ALPHAS,
                  cv: int = 5, standardize: bool = True) -> RidgeResult:
    """Ridge (alpha by inner CV on the training scans, scored by MAE) → test MAE, per seed.

    train_x [n, d], train_y [n]; groups [n] (subject of each training scan: inner folds keep a
    subject together; None = plain shuffled K-fold). seeds: a list, or a count (0 … k−1).
    The chosen alpha is refit on all training scans before predicting the test scans.
    """
    from sklearn.metrics import mean_absolute_error

    train_x = np.asarray(train_x, dtype=np.float64)
    test_x = np.asarray(test_x, dtype=np.float64)
    train_y = np.asarray(train_y, dtype=np.float64).reshape(-1)
    test_y = np.asarray(test_y, dtype=np.float64).reshape(-1)
    if train_x.ndim != 2 or test_x.ndim != 2 or train_x.shape[1] != test_x.shape[1]:
        raise ValueError(f"features must be [n, d] with the same d, got {train_x.shape} and "
                         f"{test_x.shape}")
    if train_x.shape[0] != train_y.size or test_x.shape[0] != test_y.size:
        raise ValueError("one age per scan is needed")
    if train_y.size < 4 or test_y.size < 1:
        raise ValueError(f"ridge evaluation needs >= 4 training and >= 1 test scans, got "
                         f"{train_y.size} and {test_y.size}")
    if not (np.isfinite(train_y).all() and np.isfinite(test_y).all()):
        raise ValueError("ridge evaluation: every scan needs a finite age")
    seed_list = list(range(seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]
    maes, chosen, train_maes = [], [], []
    for seed in seed_list:
        search = fit_ridge(train_x, train_y, groups=groups, seed=seed, alphas=alphas, cv=cv,
                           standardize=standardize)
        maes.append(float(mean_absolute_error(test_y, search.predict(test_x))))
        train_maes.append(float(mean_absolute_error(train_y, search.predict(train_x))))
        chosen.append(float(search.best_params_["ridge__alpha"]))
    return RidgeResult(float(np.mean(maes)), float(np.std(maes)), maes, chosen,
                       float(np.mean(train_maes)), int(train_y.size), int(test_y.size),
                       seed_list)


@torch.no_grad()
def extract_features(encoder: torch.nn.Module, store, indices: np.ndarray,
                     device: torch.device, batch_size: int = 16,
                     set_eval: bool = True) -> np.ndarray:
    """Frozen features [n, d] (float64) of the store's scans `indices`, un-augmented, in eval
    mode (`set_eval` False: the module as it is — a registered model is an exported program,
    already in eval mode, and has no train/eval switch)."""
    was_training = encoder.training
    if set_eval:
        encoder.eval()
    out = []
    try:
        for start in range(0, len(indices), batch_size):
            chunk = np.asarray(indices[start:start + batch_size])
            x = torch.from_numpy(np.stack([store.read_image(int(i)) for i in chunk]))[:, None]
            out.append(encoder(x.to(device=device, dtype=torch.float32)).double().cpu())
    finally:
        if set_eval:
            encoder.train(was_training)
    return torch.cat(out).numpy() if out else np.zeros((0, 0))


def comparison_table(rows: Sequence[dict[str, Any]]) -> str:
    """A markdown table of runs (dicts with run, method, backbone, mae_mean, mae_std, n_test),
    best first, then a per-method summary when a method has several runs."""
    rows = sorted(rows, key=lambda r: (r["mae_mean"], r["run"]))
    lines = ["| run | method | backbone | test MAE (mean ± std over seeds) | test scans |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['run']} | {r['method']} | {r.get('backbone', '')} | "
                     f"{r['mae_mean']:.3f} ± {r['mae_std']:.3f} | {int(r.get('n_test', 0))} |")
    by_method: dict[str, list[float]] = {}
    for r in rows:
        by_method.setdefault(r["method"], []).append(r["mae_mean"])
    if any(len(v) > 1 for v in by_method.values()):
        lines += ["", "| method | runs | test MAE (mean ± std over runs) |", "|---|---|---|"]
        for method, values in sorted(by_method.items(), key=lambda kv: np.mean(kv[1])):
            lines.append(f"| {method} | {len(values)} | {np.mean(values):.3f} ± "
                         f"{np.std(values):.3f} |")
    return "\n".join(lines) + "\n"


def _experiment_rows(tracking) -> list[dict[str, Any]]:
    """Every run of the `tracking` section's MLflow experiment that logged the ridge metric."""
    import mlflow

    from hpcbrain.tracking import tracking_uri

    client = mlflow.MlflowClient(tracking_uri(tracking))
    experiment = client.get_experiment_by_name(tracking.experiment)
    if experiment is None:
        return []
    rows = []
    for run in client.search_runs([experiment.experiment_id], max_results=1000):
        metrics, params = run.data.metrics, run.data.params
        if METRIC not in metrics:
            continue
        rows.append(_comparison_row(run.info.run_name or run.info.run_id, run.info.run_id,
                                    params.get("method", "?"), params.get("model.backbone", ""),
                                    metrics[METRIC],
                                    metrics.get("ridge/test_mae_std", float("nan")),
                                    metrics.get("ridge/n_test", 0)))
    return rows


def _comparison_row(run: str, run_id: str | None, method: str, backbone: str, mae_mean: float,
                    mae_std: float, n_test: float) -> dict[str, Any]:
    """One run's line of the comparison table (`comparison_table`)."""
    return {"run": run, "run_id": run_id, "method": method, "backbone": backbone,
            "mae_mean": float(mae_mean), "mae_std": float(mae_std), "n_test": float(n_test)}


@dataclass
class AgeEvaluation:
    """What `evaluate_after_training` gives the job: the logged metrics, the age predictor
    (the encoder with the first seed's ridge, fitted on the training scans) and its calibration
    (`age_calibration`, fitted on non-test subjects only)."""
    metrics: dict[str, float]
    predictor: torch.nn.Module
    calibration: Any = None          # an age_calibration.AgeCalibration


def calibration_parts(split, source: str, learns_from_age: bool) -> dict[str, np.ndarray]:
    """The scans each calibration part uses ('cross-fitted': training scans, each predicted by
    a ridge that never saw its subject; 'held-out': validation scans, which neither the encoder
    nor the registered ridge trained on). `source` auto: held-out when the method's training
    saw the ages (`learns_from_age`), cross-fitted otherwise. Never a scan of the test fold;
    validation subjects are disjoint from it by construction (`subject_kfold`)."""
    if source == "auto":
        source = "validation" if learns_from_age else "training"
    parts = {}
    if source in ("training", "both"):
        parts["cross-fitted"] = np.asarray(split.train)
    if source in ("validation", "both"):
        if len(split.val) == 0:
            raise ValueError(
                "the age model is calibrated on validation subjects and this split has none: "
                "set data.val_fraction > 0, or evaluate.age_calibration_subjects=training "
                "(optimistic for a method that trains on ages: docs/brain-age.md)")
        parts["held-out"] = np.asarray(split.val)
    if np.intersect1d(np.concatenate(list(parts.values())), split.test).size:
        raise RuntimeError("age calibration would use test-fold scans: the split is broken")
    return parts


def calibrate_age_model(c, fitted, features: dict[str, np.ndarray], ages: np.ndarray,
                        subjects: np.ndarray, parts: dict[str, np.ndarray], training: np.ndarray,
                        seed: int, predicted: Optional[dict[str, np.ndarray]] = None):
    """The registered age model's calibration from the calibration `parts`
    (`calibration_parts`) with their `features`, or with their out-of-fold ages already
    `predicted` (encoder-folds); `training`: the scans the registered ridge was fitted on; `c`
    is the evaluate config section."""
    from hpcbrain.evaluate.age_calibration import cross_fitted_predictions, fit_calibration

    given = predicted or {}
    predicted, used = [], []
    for part, rows in parts.items():
        if part in given:
            predicted.append(given[part])
        elif part == "cross-fitted":
            predicted.append(cross_fitted_predictions(
                features[part], ages[rows], subjects[rows], folds=int(c.age_calibration_folds),
                seed=seed, alphas=[float(a) for a in c.ridge_alphas], cv=int(c.ridge_cv)))
        else:
            predicted.append(fitted.predict(features[part]))
        used.append(rows)
    rows = np.concatenate(used)
    names = {"cross-fitted": f"training subjects, cross-fitted over "
                             f"{int(c.age_calibration_folds)} subject folds",
             "held-out": "validation subjects, predicted by the registered ridge",
             "encoder-folds": f"every subject, predicted by one of "
                              f"{int(c.age_calibration_folds)} encoder-and-ridge fold runs "
                              f"trained without it"}
    return fit_calibration(np.concatenate(predicted), ages[rows], subjects[rows],
                           training_ages=ages[training], training_subjects=subjects[training],
                           correction=str(c.age_correction), level=float(c.age_interval_level),
                           folds=int(c.age_calibration_folds),
                           source="; ".join(names[p] for p in parts))


@dataclass(frozen=True)
class EvaluationContext:
    """What the job hands the evaluation besides the trained method and the data: the
    `evaluate` and `tracking` config sections, the run's method name and backbone (its row of
    the experiment's comparison table), and the run folders of an encoder-folds calibration's
    fold runs (`evaluate/encoder_folds.py`)."""

    evaluate: Any
    tracking: Any
    method_name: str
    backbone: str
    fold_runs: tuple[Path, ...] = ()

    @property
    def uses_encoder_folds(self) -> bool:
        from hpcbrain.evaluate.encoder_folds import SOURCE

        return str(self.evaluate.age_calibration_subjects) == SOURCE


def evaluate_after_training(context: EvaluationContext, method, store, split, tracker,
                            run_dir: Path, step: int) -> Optional[AgeEvaluation]:
    """The job's hook (rank 0, after training): ridge age MAE of a contrastive method's frozen
    features, logged to MLflow with the experiment's comparison table, and the registered age
    model with its calibration. None for other methods or when evaluate.ridge is off. Test scans:
    the split's test fold, else its validation scans (data.n_folds=1); without either, no MAE
    is scored (an encoder-folds calibration still gives the age model, else it is skipped)."""
    from hpcbrain.evaluate.age_predictor import AgePredictor

    if not method.ridge_evaluation or not context.evaluate.ridge:
        return None
    test = split.test if len(split.test) else split.val
    if len(split.train) < 4 or (len(test) == 0 and not context.uses_encoder_folds):
        log.warning("ridge evaluation skipped: %d train and %d test scans", len(split.train),
                    len(test))
        return None
    device = next(method.parameters()).device
    encoder = method.encoder()
    train_x = extract_features(encoder, store, split.train, device)
    ages = np.asarray(store.column("age"), dtype=np.float64)
    subjects = np.asarray(store.column("subject")).astype(str)
    c = context.evaluate
    fitted = fit_ridge(train_x, ages[split.train], groups=subjects[split.train], seed=0,
                       alphas=[float(a) for a in c.ridge_alphas], cv=int(c.ridge_cv))
    metrics = {}
    if len(test):
        metrics = _score_held_out(context, encoder, store, split, test, train_x, ages, subjects,
                                  fitted, tracker, Path(run_dir), step)
    calibration = _calibrate(context, method, encoder, store, split, train_x, ages, subjects,
                             fitted)
    calibration_metrics = {"age_model/cv_mae": calibration.cv_mae,
                           "age_model/bias_alpha": calibration.bias_alpha,
                           "age_model/bias_beta": calibration.bias_beta}
    if np.isfinite(calibration.radius()):      # +inf: too few calibration scans for the level
        calibration_metrics["age_model/interval_radius"] = calibration.radius()
    tracker.log_metrics(calibration_metrics, step=step)
    log.info("age model calibration on %d scans of %d subjects (%s): MAE %.2f, gap = %.3f·age "
             "%+.2f, %.0f %% interval ± %.2f years", calibration.calibration_scans,
             calibration.calibration_subjects, calibration.source, calibration.cv_mae,
             calibration.bias_alpha, calibration.bias_beta, 100 * calibration.level,
             calibration.radius())
    return AgeEvaluation({**metrics, **calibration_metrics},
                         AgePredictor.from_ridge(encoder, fitted), calibration)


def _score_held_out(context: EvaluationContext, encoder, store, split, test, train_x, ages,
                    subjects, fitted, tracker, run_dir: Path, step: int) -> dict[str, float]:
    """Ridge MAE on the held-out scans over the configured seeds, the experiment's comparison
    table, and each held-out scan's predicted age (`encoder_folds.PREDICTIONS_FILE`: what an
    encoder-folds calibration of another run reads)."""
    from hpcbrain.evaluate.encoder_folds import PREDICTIONS_FILE, write_predictions

    device = next(encoder.parameters()).device
    c = context.evaluate
    test_x = extract_features(encoder, store, test, device)
    result = ridge_age_mae(train_x, ages[split.train], test_x, ages[test],
                           groups=subjects[split.train], seeds=int(c.ridge_seeds),
                           alphas=[float(a) for a in c.ridge_alphas], cv=int(c.ridge_cv))
    metrics = result.metrics()
    tracker.log_metrics(metrics, step=step)
    log.info("ridge age MAE on %d %s scans: %.3f ± %.3f years (alphas %s)", result.n_test,
             "test" if len(split.test) else "validation", result.mae_mean, result.mae_std,
             result.alpha_per_seed)
    (run_dir / "ridge.json").write_text(json.dumps(asdict(result), indent=1))
    write_predictions(run_dir / PREDICTIONS_FILE, test, subjects[test], ages[test],
                      fitted.predict(test_x))
    if tracker.enabled:
        # this run's row from its own figures: its metrics are still on their way to the
        # tracking store (sent in the background), the other runs' are there
        rows = [r for r in _other_runs_rows(context.tracking, tracker)
                if r["run_id"] != tracker.run_id]
        rows.append(_comparison_row(run_dir.name, tracker.run_id, context.method_name,
                                    context.backbone, result.mae_mean, result.mae_std,
                                    result.n_test))
        (run_dir / "ridge_comparison.md").write_text(comparison_table(rows))
        with open(run_dir / "ridge_comparison.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        for name in ("ridge_comparison.md", "ridge_comparison.csv", "ridge.json",
                     PREDICTIONS_FILE):
            tracker.log_artifact(run_dir / name)
    return metrics


def _other_runs_rows(tracking, tracker) -> list[dict[str, Any]]:
    """The experiment's other runs for the comparison table; none (this run's row alone) when
    the tracking server does not answer now: the table is for reading, not worth a failed run."""
    try:
        return _experiment_rows(tracking)
    except Exception as exc:
        if tracker.server_answers():
            raise
        log.warning("the tracking server does not answer (%s): ridge_comparison lists this run "
                    "only", type(exc).__name__)
        return []


def _calibrate(context: EvaluationContext, method, encoder, store, split, train_x, ages,
               subjects, fitted):
    """The registered age model's calibration from the configured calibration subjects."""
    from hpcbrain.evaluate.encoder_folds import SOURCE, read_fold_predictions

    c = context.evaluate
    if context.uses_encoder_folds:
        rows, predicted = read_fold_predictions(context.fold_runs, subjects, ages,
                                                str(store.path))
        if np.intersect1d(rows, split.test).size:
            raise RuntimeError("age calibration would use test-fold scans: the split is broken")
        parts, given, features = {SOURCE: rows}, {SOURCE: predicted}, {}
    else:
        parts = calibration_parts(split, str(c.age_calibration_subjects), method.learns_from_age)
        device = next(encoder.parameters()).device
        given = {}
        features = {part: train_x if part == "cross-fitted"
                    else extract_features(encoder, store, rows, device)
                    for part, rows in parts.items()}
    return calibrate_age_model(c, fitted, features, ages, subjects, parts, split.train, seed=0,
                               predicted=given)
