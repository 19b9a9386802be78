"""LSOR's downstream evaluation (its Table 1): ``hpcbrain evaluate MODEL_URI --store S --task T``.

A registered encoder is frozen; its features of every eligible scan of the store (one sample
per scan, as the official `main_downstream.py` uses single scans) feed two predictors, each
trained and scored in 5-fold cross-validation with folds split by subject (stratified by label
for a classification) and 10 % of the training subjects held out for validation (the paper's
protocol):

* ``mlp``: the paper's predictor — two fully connected layers of 1024 and 64 units with
  LeakyReLU, then the output; Adam (lr 5e-4, the official downstream config), the epoch with
  the lowest validation loss kept (``epochs`` at most);
* ``linear``: a linear probe (logistic / ridge regression, sklearn) whose penalty is chosen on
  the same validation subjects from `LINEAR_ALPHAS` (C = 1/alpha), then refitted on training and
  validation together. A fixed penalty is no honest baseline: on 128-d LSOR features of a
  160-subject cohort, alpha = 1 gave ADAS-Cog R² −0.93 where the MLP reached 0.19.
Features are standardised with the training part's statistics.

Tasks (`TASKS`): ``smci-pmci`` — the scans of subjects in the sMCI or pMCI group (store column
``group``), label pMCI; BACC (threshold 0.5) and AUC. ``adas-cog`` — scans with an ADAS-Cog
score; R² and RMSE (and MAE). ``age`` — every scan; R², RMSE, MAE. Each metric is reported as
the mean and standard deviation over folds, with the per-fold values, and the pooled out-of-fold
predictions are kept for tests between models (DeLong's for AUC: `delong_auc_test`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

TASKS = ("smci-pmci", "adas-cog", "age")
CLASSIFICATION = {"smci-pmci"}


class DownstreamTaskError(ValueError):
    """The store cannot pose this task (a missing column, too few subjects, one class)."""


@dataclass
class TaskData:
    indices: np.ndarray          # store scan indices
    targets: np.ndarray          # float64 (0/1 for a classification)
    subjects: np.ndarray


def task_data(store, task: str) -> TaskData:
    """The scans and targets of `task` in `store` (a CohortStore); DownstreamTaskError naming
    what is missing."""
    if task not in TASKS:
        raise DownstreamTaskError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    subjects = np.asarray(store.column("subject")).astype(str)
    everything = np.arange(len(store))
    if task == "age":
        targets = np.asarray(store.column("age"), dtype=np.float64)
        keep = np.isfinite(targets)
    elif task == "adas-cog":
        if "adas_cog" not in store.columns:
            raise DownstreamTaskError(f"{store.path} has no adas_cog column: task adas-cog "
                                      f"needs one")
        targets = np.asarray(store.column("adas_cog"), dtype=np.float64)
        keep = np.isfinite(targets)
    else:
        if "group" not in store.columns:
            raise DownstreamTaskError(f"{store.path} has no group column (sMCI/pMCI): task "
                                      f"smci-pmci needs one")
        group = np.asarray(store.column("group")).astype(str)
        keep = np.isin(group, ["sMCI", "pMCI"])
        targets = (group == "pMCI").astype(np.float64)
    if keep.sum() == 0 or np.unique(subjects[keep]).size < 5:
        raise DownstreamTaskError(f"{store.path}: task {task} has "
                                  f"{np.unique(subjects[keep]).size} subjects; 5-fold "
                                  f"cross-validation needs at least 5")
    if task in CLASSIFICATION and np.unique(targets[keep]).size < 2:
        raise DownstreamTaskError(f"{store.path}: task {task} needs both classes")
    return TaskData(everything[keep], targets[keep], subjects[keep])


# --- metrics ------------------------------------------------------------------------------------
def balanced_accuracy(y: np.ndarray, prob: np.ndarray, threshold: float = 0.5) -> float:
    """Mean of sensitivity and specificity at `threshold` (NaN without both classes)."""
    pred = prob >= threshold
    pos, neg = y == 1, y == 0
    if not pos.any() or not neg.any():
        return float("nan")
    return 0.5 * (float(pred[pos].mean()) + float((~pred[neg]).mean()))


def auc(y: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve: P(score of a positive > score of a negative), ties ½."""
    pos, neg = score[y == 1], score[y == 0]
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (pos.size * neg.size))


def regression_metrics(y: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    residual = y - pred
    total = ((y - y.mean()) ** 2).sum()
    return {"r2": float(1 - (residual ** 2).sum() / total) if total > 0 else float("nan"),
            "rmse": float(np.sqrt((residual ** 2).mean())), "mae": float(np.abs(residual).mean())}


def delong_auc_test(y: np.ndarray, score_a: np.ndarray, score_b: np.ndarray
                    ) -> tuple[float, float, float]:
    """DeLong et al. (1988) for two correlated AUCs on the same samples: (AUC a, AUC b,
    two-sided p of AUC a = AUC b)."""
    pos, neg = y == 1, y == 0
    m, n = int(pos.sum()), int(neg.sum())

    def components(score):
        x, z = score[pos], score[neg]
        psi = (x[:, None] > z[None, :]) + 0.5 * (x[:, None] == z[None, :])
        return psi.mean(), psi.mean(axis=1), psi.mean(axis=0)   # AUC, V10 [m], V01 [n]

    auc_a, v10_a, v01_a = components(score_a)
    auc_b, v10_b, v01_b = components(score_b)
    s10 = np.cov(np.stack([v10_a, v10_b]))
    s01 = np.cov(np.stack([v01_a, v01_b]))
    var = (s10[0, 0] + s10[1, 1] - 2 * s10[0, 1]) / m + (s01[0, 0] + s01[1, 1] - 2 * s01[0, 1]) / n
    if var <= 0:
        return float(auc_a), float(auc_b), 1.0
    z = (auc_a - auc_b) / math.sqrt(var)
    return float(auc_a), float(auc_b), float(math.erfc(abs(z) / math.sqrt(2)))


def paired_subject_bootstrap(y: np.ndarray, pred_a: np.ndarray, pred_b: np.ndarray,
                             subjects: np.ndarray, metric: Callable[[np.ndarray, np.ndarray], float],
                             n_boot: int = 2000, seed: int = 0, level: float = 0.95
                             ) -> dict[str, float]:
    """metric(y, a) − metric(y, b) on pooled out-of-fold predictions, with a percentile interval
    from resampling *subjects* with replacement (their scans are not independent). Resamples
    on which the metric is undefined (NaN, e.g. one class only) are dropped."""
    rng = np.random.default_rng(seed)
    names, inverse = np.unique(subjects, return_inverse=True)
    scans_of = [np.flatnonzero(inverse == s) for s in range(names.size)]
    diffs = []
    for _ in range(n_boot):
        idx = np.concatenate([scans_of[s] for s in rng.integers(0, names.size, names.size)])
        diff = metric(y[idx], pred_a[idx]) - metric(y[idx], pred_b[idx])
        if np.isfinite(diff):
            diffs.append(diff)
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(diffs, [tail, 100 - tail])
    return {"diff": float(metric(y, pred_a) - metric(y, pred_b)), "low": float(low),
            "high": float(high), "n_boot": len(diffs)}


# --- predictors ---------------------------------------------------------------------------------
def paper_mlp(in_dim: int) -> nn.Module:
    """The LSOR paper's predictor: FC 1024 → LeakyReLU → FC 64 → LeakyReLU → FC 1."""
    return nn.Sequential(nn.Linear(in_dim, 1024), nn.LeakyReLU(0.2), nn.Linear(1024, 64),
                         nn.LeakyReLU(0.2), nn.Linear(64, 1))


def fit_mlp(x_train, y_train, x_val, y_val, classification: bool, epochs: int, seed: int,
            lr: float = 5e-4, batch_size: int = 128) -> Callable[[np.ndarray], np.ndarray]:
    """Train `paper_mlp` (BCE or MSE on standardised targets), keep the epoch with the lowest
    validation loss; returns x → probability (classification) or prediction."""
    torch.manual_seed(seed)
    model = paper_mlp(x_train.shape[1]).double()
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = nn.BCEWithLogitsLoss() if classification else nn.MSELoss()
    xt, yt = torch.from_numpy(x_train), torch.from_numpy(y_train)
    xv, yv = torch.from_numpy(x_val), torch.from_numpy(y_val)
    scale = 1.0 if classification else float(max(y_train.std(), 1e-6))
    shift = 0.0 if classification else float(y_train.mean())
    generator = torch.Generator().manual_seed(seed)
    best, best_state = math.inf, None
    for _ in range(int(epochs)):
        model.train()
        for chunk in torch.randperm(len(xt), generator=generator).split(batch_size):
            optimiser.zero_grad()
            loss_fn(model(xt[chunk])[:, 0], (yt[chunk] - shift) / scale).backward()
            optimiser.step()
        model.eval()
        with torch.no_grad():
            val = float(loss_fn(model(xv)[:, 0], (yv - shift) / scale)) if len(xv) else 0.0
        if val < best:
            best, best_state = val, {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    model.eval()

    def predict(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            out = model(torch.from_numpy(x))[:, 0]
        return (torch.sigmoid(out) if classification else out * scale + shift).numpy()

    return predict


LINEAR_ALPHAS = tuple(10.0 ** k for k in range(-2, 5))


def _linear_model(alpha: float, classification: bool):
    from sklearn.linear_model import LogisticRegression, Ridge

    return LogisticRegression(C=1.0 / alpha, max_iter=2000) if classification else Ridge(alpha)


def _linear_predict(model, classification: bool) -> Callable[[np.ndarray], np.ndarray]:
    return (lambda x: model.predict_proba(x)[:, 1]) if classification else model.predict


def select_linear_alpha(x_train, y_train, x_val, y_val, classification: bool) -> float:
    """The penalty of `LINEAR_ALPHAS` with the lowest validation loss (log-loss or squared
    error); the first (weakest) without validation data."""
    if len(x_val) == 0 or (classification and np.unique(y_val).size < 2):
        return LINEAR_ALPHAS[0]
    losses = []
    for alpha in LINEAR_ALPHAS:
        pred = _linear_predict(_linear_model(alpha, classification).fit(x_train, y_train),
                               classification)(x_val)
        if classification:
            p = np.clip(pred, 1e-12, 1 - 1e-12)
            losses.append(float(-(y_val * np.log(p) + (1 - y_val) * np.log(1 - p)).mean()))
        else:
            losses.append(float(((y_val - pred) ** 2).mean()))
    return LINEAR_ALPHAS[int(np.argmin(losses))]


def fit_linear(x_train, y_train, x_val, y_val, classification: bool):
    """The linear probe: penalty chosen on validation, refitted on training + validation."""
    alpha = select_linear_alpha(x_train, y_train, x_val, y_val, classification)
    model = _linear_model(alpha, classification).fit(np.concatenate([x_train, x_val]),
                                                     np.concatenate([y_train, y_val]))
    return _linear_predict(model, classification)


# --- cross-validation ---------------------------------------------------------------------------
def cross_validate(features: np.ndarray, data: TaskData, task: str, folds: int = 5,
                   val_fraction: float = 0.1, seed: int = 0, epochs: int = 80
                   ) -> dict[str, Any]:
    """Both predictors over subject folds; {predictor: {metric: {mean, std, folds}}, "oof":
    pooled out-of-fold predictions per predictor, "targets"}."""
    from hpcbrain.data.splits import subject_kfold

    classification = task in CLASSIFICATION
    oof = {"mlp": np.full(len(data.targets), np.nan), "linear": np.full(len(data.targets), np.nan)}
    per_fold: dict[str, list[dict[str, float]]] = {"mlp": [], "linear": []}
    for fold in range(folds):
        # a classification's folds are stratified by label, so each test fold has both classes
        split = subject_kfold(data.subjects, folds, fold, val_fraction=val_fraction, seed=seed,
                              groups=data.targets if classification else None)
        tr, va, te = split.train, split.val, split.test
        mean, std = features[tr].mean(0), features[tr].std(0) + 1e-8
        x = (features - mean) / std
        predictions = {
            "mlp": fit_mlp(x[tr], data.targets[tr], x[va], data.targets[va], classification,
                           epochs, seed + fold)(x[te]),
            "linear": fit_linear(x[tr], data.targets[tr], x[va], data.targets[va],
                                 classification)(x[te])}
        for name, pred in predictions.items():
            oof[name][te] = pred
            y = data.targets[te]
            if classification:
                scores = {"bacc": balanced_accuracy(y, pred), "auc": auc(y, pred)} \
                    if np.unique(y).size == 2 else {"bacc": float("nan"), "auc": float("nan")}
            else:
                scores = regression_metrics(y, pred)
            per_fold[name].append(scores)
    result: dict[str, Any] = {"task": task, "n_scans": int(len(data.targets)),
                              "n_subjects": int(np.unique(data.subjects).size), "folds": folds}
    for name, rows in per_fold.items():
        result[name] = {metric: {"mean": float(np.nanmean([r[metric] for r in rows])),
                                 "std": float(np.nanstd([r[metric] for r in rows])),
                                 "folds": [r[metric] for r in rows]} for metric in rows[0]}
    result["oof"] = {k: v.tolist() for k, v in oof.items()}
    result["targets"] = data.targets.tolist()
    result["subjects"] = data.subjects.tolist()
    return result


def evaluate_model(model_uri: str, store_path: str, task: str, folds: int = 5, seed: int = 0,
                   epochs: int = 80) -> dict[str, Any]:
    """Frozen registered encoder → features of the task's scans → `cross_validate`."""
    import mlflow.pytorch

    from hpcbrain.data.store import CohortStore
    from hpcbrain.evaluate.ridge import extract_features

    store = CohortStore(store_path)
    data = task_data(store, task)
    encoder = mlflow.pytorch.load_model(model_uri)
    features = extract_features(encoder, store, data.indices, torch.device("cpu"),
                                set_eval=False)
    result = cross_validate(features, data, task, folds=folds, seed=seed, epochs=epochs)
    result.update(model=model_uri, store=str(store_path))
    return result
