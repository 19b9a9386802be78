"""LSOR's Table 1: the six methods trained the same way on one cohort store, frozen, evaluated on
sMCI vs pMCI (BACC, AUC) and ADAS-Cog (R², RMSE) with `hpcbrain evaluate`'s protocol.

    .venv/bin/python -m bench.science.lsor_table --preset smoke|cpu|gpu --store STORE --out DIR \
        [--eval-store LARGER_STORE]

Methods: lsor, ae, vae, simclr (on LSOR's encoder, `model.backbone=lsor`), lssl, lne, each from
its config (configs/METHOD.yaml) plus the preset's settings, registered in DIR/mlflow.db, then
`hpcbrain.evaluate.downstream.evaluate_model` (the paper's MLP; 5-fold subject CV, 10 %
validation) on both tasks, on --eval-store when given (a larger cohort of the same kind: the
encoders are self-supervised, so evaluating them on more subjects than they were trained on
narrows the intervals without retraining). Two reference rows go through the same protocol: the
synthetic truth (each scan's true brain age — the ceiling of what a scan holds about ageing;
skipped on real data) and raw voxels average-pooled to 8³ (what a predictor gets for free).

Writes DIR/table.json — ``{"methods": {name: {"bacc", "auc", "r2", "rmse"}}}``, each ``{"mean",
"std"}`` over folds; ``"lsor_minus"``: LSOR's BACC and ADAS-Cog R² minus each other row's on the
pooled out-of-fold predictions, with 95 % intervals from resampling subjects, and DeLong's p of
the AUCs (also in ``"delong_vs_lsor"``) — and DIR/table.md. A method whose DIR/METHOD.json
exists is not retrained, and an evaluation kept in DIR/NAME.eval.json for the same evaluation
store is not redone (resume after an interruption).

Presets: ``smoke`` (minutes: tiny networks, 2 epochs — checks the machinery, not the science);
``cpu`` (the demo's networks at 32³, LSOR with demo.yaml's node speed and grid start; 24 epochs
each, LSOR's 8 + 16, sized for a 40-subject training cohort; an hour on 2 cores, measured in
bench/README.md); ``gpu`` (the paper's: 64³, each config as it is, 50 epochs;
documented, not run here: six trainings of the paper's length on the cohort).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

METHODS = ["lsor", "ae", "vae", "simclr", "lssl", "lne"]
REFERENCE = "lsor"
ORACLE, VOXELS = "oracle: true brain age", "raw voxels 8³"
REFERENCES = (ORACLE, VOXELS)
TASKS = ("smci-pmci", "adas-cog")


@dataclass
class Preset:
    overrides: list[str]
    lsor_configs: list[str] = field(default_factory=list)
    mlp_epochs: int = 80


PRESETS = {
    "smoke": Preset(overrides=["model.widths=[4,8]", "train.epochs=2", "train.batch_size=8",
                               "train.max_steps_per_epoch=3", "data.num_workers=0",
                               "data.n_folds=1", "lsor.warmup_epochs=1", "lsor.grid_rows=2",
                               "lsor.grid_cols=2", "lsor.kmeans_n_init=1",
                               "model.resnet_width=2", "model.projection_dim=8",
                               "train.precision=fp32"],
                    mlp_epochs=10),
    # measured on a 40-subject cohort: 24 epochs (LSOR: 8 warm-up + 16 SOM, node speed and grid
    # start from demo.yaml) give the ~280 steps the demo's 80 subjects get from 12
    "cpu": Preset(overrides=["train.epochs=24", "lsor.warmup_epochs=8", "train.batch_size=16",
                             "data.n_folds=1", "data.val_fraction=0.15", "train.precision=fp32"],
                  lsor_configs=["demo.yaml"]),
    "gpu": Preset(overrides=[]),
}


def method_config(name: str, preset: Preset, store: Path, size: int, out: Path):
    from hpcbrain.config import load_config

    files = ["simclr.yaml" if name == "simclr" else f"{name}.yaml"]
    if name == "lsor":
        files += preset.lsor_configs
    extra = ["model.backbone=lsor", "contrastive.nn_final=2"] if name == "simclr" else []
    return load_config(files, [
        f"data.store={store}", f"data.input_size={size}", *preset.overrides, *extra,
        f"run.root={out / 'runs'}", f"run.name={name}", "tracking.enabled=true",
        f"tracking.uri=sqlite:///{out.resolve()}/mlflow.db",
        f"tracking.registered_model=lsor-table-{name}", "tracking.registered_age_model=null"])


def train_method(name: str, preset: Preset, store: Path, size: int, out: Path) -> dict:
    """Train and register one method; DIR/METHOD.json records its model (kept: not retrained)."""
    from hpcbrain.job import run_training

    cached = out / f"{name}.json"
    if cached.exists():
        return json.loads(cached.read_text())
    started = time.perf_counter()
    result = run_training(method_config(name, preset, store, size, out))
    record = {"method": name, "model": result.model_uri,
              "seconds": round(time.perf_counter() - started, 1)}
    cached.write_text(json.dumps(record))
    return record


def cached_evaluation(path: Path, eval_store: Path, compute) -> dict:
    """DIR/NAME.eval.json when it was made on `eval_store`, else compute() and keep it."""
    if path.exists():
        kept = json.loads(path.read_text())
        if kept.get("eval_store") == str(eval_store):
            return kept
    record = {"eval_store": str(eval_store), "evaluations": compute()}
    path.write_text(json.dumps(record))
    return record


def evaluate_method(name: str, model_uri: str, eval_store: Path, out: Path, epochs: int) -> dict:
    import mlflow

    from hpcbrain.evaluate.downstream import evaluate_model

    mlflow.set_tracking_uri(f"sqlite:///{out.resolve()}/mlflow.db")
    return cached_evaluation(out / f"{name}.eval.json", eval_store, lambda: {
        task: evaluate_model(model_uri, str(eval_store), task, epochs=epochs) for task in TASKS})


def reference_features(kind: str, store, indices):
    """Features no encoder learned: the synthetic truth (the ceiling of what a scan holds about
    ageing: its brain age) or the scan's voxels average-pooled to 8³ (what a predictor gets for
    free). None when the store has no synthetic truth."""
    import torch

    from hpcbrain.evaluate.ridge import extract_features
    from hpcbrain.evaluate.truth import synthetic_brain_age

    if kind == ORACLE:
        brain_age = synthetic_brain_age(store, indices)
        return None if brain_age is None else brain_age[:, None]
    pool = torch.nn.Sequential(torch.nn.AdaptiveAvgPool3d(8), torch.nn.Flatten())
    return extract_features(pool, store, indices, torch.device("cpu"))


def evaluate_references(eval_store: Path, out: Path, epochs: int) -> dict[str, dict]:
    from hpcbrain.data.store import CohortStore
    from hpcbrain.evaluate.downstream import cross_validate, task_data

    store = CohortStore(eval_store)
    rows = {}
    for kind in REFERENCES:
        def compute(kind=kind):
            evaluations = {}
            for task in TASKS:
                data = task_data(store, task)
                features = reference_features(kind, store, data.indices)
                if features is None:
                    return None
                evaluations[task] = cross_validate(features, data, task, epochs=epochs)
            return evaluations
        record = cached_evaluation(out / f"{kind}.eval.json", eval_store, compute)
        if record["evaluations"] is not None:
            rows[kind] = record
    return rows


def paired_comparisons(evaluations: dict[str, dict]) -> dict[str, dict]:
    """LSOR minus each other row on the pooled out-of-fold MLP predictions: ΔBACC and ΔR² with
    95 % subject-bootstrap intervals, and DeLong's p of the AUCs."""
    import numpy as np

    from hpcbrain.evaluate.downstream import (
        balanced_accuracy,
        delong_auc_test,
        paired_subject_bootstrap,
        regression_metrics,
    )

    def r2(y, pred):
        return regression_metrics(y, pred)["r2"]

    reference = evaluations[REFERENCE]
    comparisons = {}
    for name, evaluation in evaluations.items():
        if name == REFERENCE:
            continue
        row = {}
        for task, metric, key in (("smci-pmci", balanced_accuracy, "bacc"), ("adas-cog", r2, "r2")):
            mine, theirs = reference[task], evaluation[task]
            y = np.asarray(mine["targets"])
            row[key] = paired_subject_bootstrap(
                y, np.asarray(mine["oof"]["mlp"]), np.asarray(theirs["oof"]["mlp"]),
                np.asarray(mine["subjects"]), metric)
        cls = reference["smci-pmci"]
        row["auc_delong_p"] = delong_auc_test(np.asarray(cls["targets"]),
                                              np.asarray(cls["oof"]["mlp"]),
                                              np.asarray(evaluation["smci-pmci"]["oof"]["mlp"]))[2]
        comparisons[name] = row
    return comparisons


def metric_rows(evaluations: dict[str, dict], predictor: str) -> dict[str, dict]:
    """{name: {bacc, auc, r2, rmse}}, each {"mean", "std"} over folds, for one predictor."""
    rows = {}
    for name, evaluation in evaluations.items():
        cls, reg = evaluation["smci-pmci"][predictor], evaluation["adas-cog"][predictor]
        rows[name] = {metric: {"mean": source[metric]["mean"], "std": source[metric]["std"]}
                      for metric, source in (("bacc", cls), ("auc", cls), ("r2", reg),
                                             ("rmse", reg))}
    return rows


def build_table(evaluations: dict[str, dict]) -> dict:
    table: dict = {"methods": metric_rows(evaluations, "mlp"), "predictor": "mlp (the paper's)",
                   "linear_probe": metric_rows(evaluations, "linear")}
    comparisons = paired_comparisons(evaluations)
    table["lsor_minus"] = comparisons
    table["delong_vs_lsor"] = {name: row["auc_delong_p"] for name, row in comparisons.items()}
    return table


def markdown(table: dict) -> str:
    lines = ["| method | sMCI/pMCI BACC | AUC | ADAS-Cog R² | RMSE | AUC vs LSOR (DeLong p) |",
             "|---|---|---|---|---|---|"]
    for name, m in table["methods"].items():
        p = table["delong_vs_lsor"].get(name)
        cells = [f"{m[k]['mean']:.3f} ± {m[k]['std']:.3f}" for k in ("bacc", "auc", "r2", "rmse")]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {'–' if p is None else f'{p:.3f}'} |")
    lines += ["", "mean ± sd over 5 subject folds (the paper's MLP).", "",
              "| linear probe | sMCI/pMCI BACC | AUC | ADAS-Cog R² | RMSE |", "|---|---|---|---|---|"]
    for name, m in table["linear_probe"].items():
        cells = [f"{m[k]['mean']:.3f} ± {m[k]['std']:.3f}" for k in ("bacc", "auc", "r2", "rmse")]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "the same folds; penalty chosen on the validation subjects.", "",
              "| LSOR minus | ΔBACC [95 % CI] | ΔR² ADAS-Cog [95 % CI] |", "|---|---|---|"]
    for name, row in table["lsor_minus"].items():
        cells = [f"{row[k]['diff']:+.3f} [{row[k]['low']:+.3f}, {row[k]['high']:+.3f}]"
                 for k in ("bacc", "r2")]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "pooled out-of-fold predictions; intervals from 2,000 resamples of subjects."]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=list(PRESETS), default="smoke")
    parser.add_argument("--store", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--eval-store", type=Path, default=None,
                        help="evaluate the frozen encoders on this store (default: --store), "
                             "e.g. a larger cohort of the same kind, for narrower intervals")
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    args = parser.parse_args()
    from hpcbrain.data.store import CohortStore

    if REFERENCE not in args.methods:
        args.methods = [REFERENCE, *args.methods]
    args.out.mkdir(parents=True, exist_ok=True)
    size = CohortStore(args.store).shape[0]
    preset = PRESETS[args.preset]
    eval_store = args.eval_store or args.store
    evaluations = {}
    for name in args.methods:
        record = train_method(name, preset, args.store, size, args.out)
        evaluations[name] = evaluate_method(name, record["model"], eval_store, args.out,
                                            preset.mlp_epochs)["evaluations"]
    for name, record in evaluate_references(eval_store, args.out, preset.mlp_epochs).items():
        evaluations[name] = record["evaluations"]
    table = build_table(evaluations)
    table.update(preset=args.preset, store=str(args.store), eval_store=str(eval_store))
    (args.out / "table.json").write_text(json.dumps(table, indent=2))
    text = markdown(table)
    (args.out / "table.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
