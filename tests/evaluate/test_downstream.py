"""`hpcbrain evaluate`: the LSOR paper's downstream protocol — metrics by hand, DeLong's test
by hand, subject-grouped cross-validation recovering a known signal, the command end to end."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from hpcbrain.data.store import CohortStore
from hpcbrain.evaluate.downstream import (
    DownstreamTaskError,
    TaskData,
    auc,
    balanced_accuracy,
    cross_validate,
    delong_auc_test,
    paired_subject_bootstrap,
    regression_metrics,
    select_linear_alpha,
    task_data,
)


def test_metrics_on_hand_worked_cases():
    y = np.array([1, 1, 1, 0, 0])
    prob = np.array([0.9, 0.6, 0.2, 0.4, 0.7])
    # sensitivity 2/3, specificity 1/2
    assert balanced_accuracy(y, prob) == pytest.approx(0.5 * (2 / 3 + 1 / 2))
    # positives 0.9, 0.6, 0.2 against negatives 0.4, 0.7: 2 + 1 + 0 of 6 pairs
    assert auc(y, prob) == pytest.approx(3 / 6)
    assert auc(np.array([1, 0]), np.array([0.5, 0.5])) == 0.5          # a tie counts ½
    m = regression_metrics(np.array([1.0, 2.0, 3.0]), np.array([1.0, 2.0, 4.0]))
    assert m == pytest.approx({"r2": 1 - 1 / 2, "rmse": math.sqrt(1 / 3), "mae": 1 / 3})


def test_delong_on_a_hand_worked_case():
    """y 1 1 0 0; a = (.9, .8, .3, .1): AUC 1; b = (.2, .8, .3, .1): AUC .75. Structural
    components V10_b = (.5, 1), V01_b = (.5, 1), a's all 1: var = .125/2 + .125/2 = .125,
    z = .25/√.125, p = erfc(z/√2) = erfc(.5)."""
    y = np.array([1, 1, 0, 0])
    a_auc, b_auc, p = delong_auc_test(y, np.array([.9, .8, .3, .1]), np.array([.2, .8, .3, .1]))
    assert (a_auc, b_auc) == (1.0, 0.75)
    assert p == pytest.approx(math.erfc(0.5))
    assert delong_auc_test(y, np.array([.9, .8, .3, .1]), np.array([.9, .8, .3, .1]))[2] == 1.0


def _mean_abs_error(y, pred):
    return float(np.abs(y - pred).mean())


def test_paired_bootstrap_resamples_subjects_not_scans():
    # every scan: a misses by 1, b by 3 -> the difference is -2 in every resample
    y, subjects = np.zeros(12), np.repeat(list("abcdef"), 2)
    result = paired_subject_bootstrap(y, y + 1, y + 3, subjects, _mean_abs_error, n_boot=200)
    assert (result["diff"], result["low"], result["high"]) == pytest.approx((-2, -2, -2))
    # one subject with 100 scans carries the whole difference (a misses by 1 there, b exactly);
    # nine subjects of one scan each have none. Scans as units would give a narrow interval
    # near 100/109; subjects as units: the big subject is missing from 0.9^10 = 35 % of the
    # resamples (difference exactly 0) and present in the rest (difference >= 100/109).
    subjects = np.array(["big"] * 100 + [f"s{k}" for k in range(9)])
    y = np.zeros(109)
    a = np.where(subjects == "big", 1.0, 0.0)
    result = paired_subject_bootstrap(y, a, y, subjects, _mean_abs_error, n_boot=2000, seed=1)
    assert result["diff"] == pytest.approx(100 / 109)
    assert result["low"] == 0.0 and result["high"] > 0.95
    # a resample with one class only has no balanced accuracy: it is dropped, not counted
    assert math.isnan(balanced_accuracy(np.array([1, 1]), np.array([0.9, 0.2])))


def test_tasks_take_their_scans_and_name_what_is_missing(make_store, tmp_path):
    groups = ["sMCI", "pMCI", "NC", "sMCI", "pMCI", "AD", "sMCI", "pMCI"]
    store = CohortStore(make_store(tmp_path, subjects=8, visits=2, size=8,
                                   columns={"group": np.repeat(groups, 2)}))
    data = task_data(store, "smci-pmci")
    keep = [i for i, g in enumerate(np.repeat(groups, 2)) if g in ("sMCI", "pMCI")]
    assert data.indices.tolist() == keep
    assert data.targets.tolist() == [float(np.repeat(groups, 2)[i] == "pMCI") for i in keep]
    assert task_data(store, "age").indices.size == 16
    with pytest.raises(DownstreamTaskError, match="choose one of"):
        task_data(store, "mmse")
    few = CohortStore(make_store(tmp_path / "few", subjects=3, visits=2, size=8))
    with pytest.raises(DownstreamTaskError, match="3 subjects"):
        task_data(few, "age")


def synthetic_task(classification: bool, n_subjects=40, visits=2, dim=12, seed=0):
    rng = np.random.default_rng(seed)
    subjects = np.repeat([f"s{k}" for k in range(n_subjects)], visits)
    w = rng.normal(size=dim)
    x = rng.normal(size=(len(subjects), dim))
    signal = x @ w
    y = (signal > 0).astype(float) if classification else 50 + 3 * signal
    return x, TaskData(np.arange(len(subjects)), y, subjects)


def test_the_linear_probe_chooses_its_penalty_on_validation():
    rng = np.random.default_rng(0)
    x_train, x_val = rng.normal(size=(40, 30)), rng.normal(size=(20, 30))
    w = rng.normal(size=30)
    # an exact linear target: any shrinkage only hurts -> the weakest penalty
    assert select_linear_alpha(x_train, x_train @ w, x_val, x_val @ w, False) == 0.01
    # pure noise with 30 features for 40 scans: fitting it hurts -> shrink to the mean
    noise_train, noise_val = rng.normal(size=40), rng.normal(size=20)
    assert select_linear_alpha(x_train, noise_train, x_val, noise_val, False) >= 100
    labels = (x_train[:, 0] > 0).astype(float), (x_val[:, 0] > 0).astype(float)
    assert select_linear_alpha(x_train, labels[0], x_val, labels[1], True) <= 1.0


def test_cross_validation_recovers_a_linear_signal():
    x, data = synthetic_task(False)
    result = cross_validate(x, data, "age", folds=5, epochs=40)
    assert result["linear"]["r2"]["mean"] > 0.95 and result["mlp"]["r2"]["mean"] > 0.6
    assert len(result["linear"]["r2"]["folds"]) == 5
    assert not np.isnan(result["oof"]["mlp"]).any()          # every scan tested exactly once
    x, data = synthetic_task(True, seed=1)
    result = cross_validate(x, data, "smci-pmci", folds=5, epochs=40)
    assert result["linear"]["auc"]["mean"] > 0.9 and result["mlp"]["auc"]["mean"] > 0.8
    assert result["n_subjects"] == 40


@pytest.mark.slow
def test_evaluate_command_end_to_end(age_contrast_store, tmp_path, capsys):
    from conftest import lsor_run_config

    from hpcbrain.cli import main
    from hpcbrain.job import run_training

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = run_training(lsor_run_config(
        age_contrast_store, tmp_path / "runs", "ae", "method=ae", "train.epochs=2",
        "tracking.enabled=true", f"tracking.uri={uri}", "tracking.registered_model=eval-ae"))
    out = tmp_path / "age.json"
    assert main(["evaluate", result.model_uri, "--store", str(age_contrast_store), "--task", "age",
                 "--epochs", "5", "--out", str(out), "--tracking-uri", uri]) == 0
    saved = json.loads(out.read_text())
    assert saved["task"] == "age" and saved["n_subjects"] == 8 and saved["model"] == result.model_uri
    assert set(saved["mlp"]) == {"r2", "rmse", "mae"} and len(saved["mlp"]["rmse"]["folds"]) == 5
    assert "age/linear/rmse" in capsys.readouterr().out
    import mlflow

    runs = mlflow.search_runs(experiment_names=["hpcbrain-evaluate"])
    assert len(runs) == 1 and runs["metrics.age/mlp/rmse"].iloc[0] == pytest.approx(
        saved["mlp"]["rmse"]["mean"])
    # its artifacts beside the sqlite store, as a training run's, not in the working folder
    assert runs["artifact_uri"].iloc[0].startswith((tmp_path / "mlartifacts").as_uri())
    assert main(["evaluate", result.model_uri, "--store", str(age_contrast_store), "--task",
                 "smci-pmci", "--tracking-uri", uri]) == 2
    assert "smci-pmci" in capsys.readouterr().err
