"""LSOR's Table 1: the six methods trained the same way on one cohort store, frozen, evaluated on
sMCI vs pMCI (BACC, AUC) and ADAS-Cog (R², RMSE) with `hpcbrain evaluate`'s protocol.

    .venv/bin/python bench/science/lsor_table.py --preset smoke|cpu|gpu --store STORE --out DIR

Methods: lsor, ae, vae, simclr (on LSOR's encoder, `model.backbone=lsor`), lssl, lne, each from
its config (configs/METHOD.yaml) plus the preset's settings, registered in DIR/mlflow.db, then
`hpcbrain.evaluate.downstream.evaluate_model` (the paper's MLP; 5-fold subject CV, 10 %
validation) on both tasks. Writes DIR/table.json — ``{"methods": {name: {"bacc", "auc", "r2",
"rmse"}}}``, each ``{"mean", "std"}`` over folds, plus each method's AUC against LSOR's by
DeLong's test on the pooled out-of-fold predictions — and DIR/table.md. A method whose
DIR/METHOD.json exists is not retrained (resume after an interruption).

Presets: ``smoke`` (minutes: tiny networks, 2 epochs — checks the machinery, not the science);
``cpu`` (the demo's scale: 32³, LSOR with demo.yaml's settings, 24 epochs each; not run yet —
six trainings of the demo's length, about six demo runs); ``gpu`` (the paper's: 64³, each config
as it is, 50 epochs; documented, not run here: six trainings of the paper's length on the
cohort).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

METHODS = ["lsor", "ae", "vae", "simclr", "lssl", "lne"]
REFERENCE = "lsor"


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
    "cpu": Preset(overrides=["train.epochs=24", "train.batch_size=16", "data.n_folds=1",
                             "data.val_fraction=0.15", "train.precision=fp32"],
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


def run_method(name: str, preset: Preset, store: Path, size: int, out: Path) -> dict:
    import mlflow

    from hpcbrain.evaluate.downstream import evaluate_model
    from hpcbrain.job import run_training

    cached = out / f"{name}.json"
    if cached.exists():
        return json.loads(cached.read_text())
    started = time.perf_counter()
    result = run_training(method_config(name, preset, store, size, out))
    mlflow.set_tracking_uri(f"sqlite:///{out.resolve()}/mlflow.db")
    evaluations = {task: evaluate_model(result.model_uri, str(store), task,
                                        epochs=preset.mlp_epochs)
                   for task in ("smci-pmci", "adas-cog")}
    record = {"method": name, "model": result.model_uri,
              "seconds": round(time.perf_counter() - started, 1), "evaluations": evaluations}
    cached.write_text(json.dumps(record))
    return record


def build_table(records: dict[str, dict]) -> dict:
    import numpy as np

    from hpcbrain.evaluate.downstream import delong_auc_test

    table: dict = {"methods": {}, "delong_vs_lsor": {}, "predictor": "mlp (the paper's)"}
    for name, record in records.items():
        cls, reg = record["evaluations"]["smci-pmci"]["mlp"], record["evaluations"]["adas-cog"]["mlp"]
        table["methods"][name] = {metric: {"mean": source[metric]["mean"],
                                           "std": source[metric]["std"]}
                                  for metric, source in (("bacc", cls), ("auc", cls),
                                                         ("r2", reg), ("rmse", reg))}
    reference = records[REFERENCE]["evaluations"]["smci-pmci"]
    y = np.asarray(reference["targets"])
    for name, record in records.items():
        if name == REFERENCE:
            continue
        mine = np.asarray(record["evaluations"]["smci-pmci"]["oof"]["mlp"])
        _, _, p = delong_auc_test(y, np.asarray(reference["oof"]["mlp"]), mine)
        table["delong_vs_lsor"][name] = p
    return table


def markdown(table: dict) -> str:
    lines = ["| method | sMCI/pMCI BACC | AUC | ADAS-Cog R² | RMSE | AUC vs LSOR (DeLong p) |",
             "|---|---|---|---|---|---|"]
    for name, m in table["methods"].items():
        p = table["delong_vs_lsor"].get(name)
        cells = [f"{m[k]['mean']:.3f} ± {m[k]['std']:.3f}" for k in ("bacc", "auc", "r2", "rmse")]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {'–' if p is None else f'{p:.3f}'} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=list(PRESETS), default="smoke")
    parser.add_argument("--store", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    args = parser.parse_args()
    from hpcbrain.data.store import CohortStore

    if REFERENCE not in args.methods:
        args.methods = [REFERENCE, *args.methods]
    args.out.mkdir(parents=True, exist_ok=True)
    size = CohortStore(args.store).shape[0]
    preset = PRESETS[args.preset]
    records = {name: run_method(name, preset, args.store, size, args.out) for name in args.methods}
    table = build_table(records)
    table.update(preset=args.preset, store=str(args.store))
    (args.out / "table.json").write_text(json.dumps(table, indent=2))
    text = markdown(table)
    (args.out / "table.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
