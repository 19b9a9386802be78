"""Which contrastive loss learns brain age, against honest baselines? (AdapN paper, Table 3)

Trains the family on one synthetic cohort (bimodal ages by default: the sparse middle is the
setting AdapN was made for) across subject folds × training seeds, and scores every run the same
way: ridge age regression (standardised features, alpha by subject-grouped inner CV) fitted on
the fold's training scans, MAE on its test scans, on backbone and on projection features.

    .venv/bin/python -m bench.science.contrastive_table --preset quick --seed 0 --out DIR

Presets: ``quick`` (≤ 15 minutes on 2 cores: 80 subjects, 3 folds × 2 seeds, AdapN,
Exponential, SimCLR and the supervised bound, 30 epochs), ``cpu`` (the full CPU table: 160
subjects, every loss, 3 folds × 2 seeds with configs/bench-cpu.yaml: ~2 hours, run it in the
background) and ``gpu`` (the paper's scale: 1,000 subjects at 64³, the method configs as they
are (ResNet-18 at width 64, 50 epochs), 5 folds × 5 seeds; `--plan` prints its cost from counted
FLOPs without training).

Writes DIR/table.md and DIR/table.json and one MLflow run per training plus a summary run
(DIR/mlflow.db unless --tracking-uri). Baselines on the same folds: the constant (training mean),
ridge on raw voxels, the untrained encoder, and the supervised network of the same architecture
(MSE on age) as the upper bound. The table gives MAE mean ± sd over runs, the paired difference
of every loss against Exponential with a bootstrap 95 % interval over runs (an ordering is only
claimed where it excludes 0 and at least 5 paired runs back it), and MAE in sparse vs dense age
bins. With `--slurm` (or where
`sbatch` is on PATH and `--local` is not given) the trainings go out as one Slurm job array; a
run whose checkpoint is complete is never retrained.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bench.common import ROOT, make_cohort, ridge_errors

FAMILY = ["adapn", "exponential", "threshold", "yaware", "rnc", "simclr", "nnclr"]
REFERENCE = "exponential"       # AdapN's paper compares against Barbano's Exponential
SCANS_PER_SUBJECT = 3.77       # hpcbrain synth's mean visits (603 scans of 160 subjects)
MIN_PAIRED_RUNS = 5             # fewer paired runs: an interval is printed, no ordering claimed


@dataclass
class Preset:
    subjects: int
    folds: int
    seeds: list[int]
    methods: list[str]
    configs: list[str] = field(default_factory=lambda: ["bench-cpu.yaml"])
    overrides: list[str] = field(default_factory=list)
    input_size: int = 32


PRESETS = {
    "quick": Preset(subjects=80, folds=3, seeds=[0, 1],
                    methods=["adapn", "exponential", "simclr", "supervised"],
                    overrides=["train.epochs=30"]),
    "cpu": Preset(subjects=160, folds=3, seeds=[0, 1], methods=FAMILY + ["supervised"]),
    # the method configs as they are (the paper's ResNet-18 at width 64, 50 epochs, lr 1e-4) at
    # 64³ on a cohort of the paper's order of size
    "gpu": Preset(subjects=1000, folds=5, seeds=[0, 1, 2, 3, 4], methods=FAMILY + ["supervised"],
                  configs=[], input_size=64),
}


def run_config(preset: Preset, method: str, store: Path, fold: int, seed: int, out: Path,
               uri: str):
    from hpcbrain.config import load_config

    return load_config([f"{method}.yaml", *preset.configs], [
        f"data.store={store}", f"data.input_size={preset.input_size}",
        f"data.n_folds={preset.folds}", f"data.fold={fold}", f"train.seed={seed}",
        f"run.root={out / 'runs'}", f"run.name={method}-fold{fold}-seed{seed}",
        f"tracking.uri={uri}", f"tracking.experiment=contrastive-table-{out.name}",
        "tracking.registered_model=null", "tracking.registered_age_model=null",
        "evaluate.ridge=false",            # scored below, on both feature kinds
        *preset.overrides])


def is_complete(cfg) -> bool:
    from hpcbrain.job import load_result, run_dir_of

    return load_result(run_dir_of(cfg)) is not None


def train_all(configs: list, use_slurm: bool) -> None:
    todo = [cfg for cfg in configs if not is_complete(cfg)]
    print(f"{len(configs) - len(todo)} of {len(configs)} runs already complete; training "
          f"{len(todo)} {'as one Slurm job array' if use_slurm and todo else 'here'}", flush=True)
    if not todo:
        return
    if use_slurm:
        from hpcbrain import launcher

        params = launcher.executor_parameters(todo[0], "contrastive-table")
        plan = launcher.LaunchPlan(configs=todo, names=[str(c.run.name) for c in todo],
                                   parameters=params, log_dir=launcher.log_dir_of(todo[0]),
                                   max_requeues=int(todo[0].slurm.max_requeues),
                                   world_size=params["nodes"] * params["ntasks_per_node"])
        jobs = launcher.launch(plan)
        failed = [str(error) for _, _, error in launcher.wait(jobs) if error is not None]
        if failed:
            raise RuntimeError(f"{len(failed)} array elements failed; first: {failed[0]}")
        return
    from hpcbrain.job import run_training

    for cfg in todo:
        started = time.perf_counter()
        run_training(cfg)
        print(f"trained {cfg.run.name} in {time.perf_counter() - started:.0f} s", flush=True)


def trained_method(cfg):
    """The run's method with its final weights, built from the config the run saved: what the
    method resolved at training time (NNCLR's queue capped to the training set) is in it."""
    from hpcbrain.config import load_config
    from hpcbrain.engine import checkpoint
    from hpcbrain.job import run_dir_of
    from hpcbrain.methods import build_method

    run_dir = run_dir_of(cfg)
    method = build_method(load_config([str(run_dir / "config.yaml")], []))
    state = checkpoint.load(checkpoint.latest_checkpoint(run_dir))
    method.load_state_dict(state["engine"]["method"])
    return method.eval()


def feature_sets(method) -> dict:
    """name → encoder: backbone features, and the projection where the method has one."""
    from hpcbrain.models.heads import FeatureExtractor

    sets = {"backbone": FeatureExtractor(method.backbone)}
    head = getattr(method, "head", None)
    if head is not None:
        sets["projection"] = FeatureExtractor(method.backbone, head)
    return sets


def density_classes(ages: np.ndarray, width: float = 5.0) -> np.ndarray:
    """'sparse' / 'dense' per scan: the scan's age falls in a `width`-year bin holding fewer /
    at least as many scans as the median non-empty bin of the cohort."""
    edges = np.arange(np.floor(ages.min()), ages.max() + width, width)
    counts, _ = np.histogram(ages, bins=edges)
    which = np.clip(np.digitize(ages, edges) - 1, 0, len(counts) - 1)
    median = np.median(counts[counts > 0])
    return np.where(counts[which] < median, "sparse", "dense")


def bootstrap_interval(values: np.ndarray, n: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95 % percentile interval of the mean of `values` (resampled with replacement)."""
    rng = np.random.default_rng(seed)
    means = rng.choice(values, size=(n, len(values)), replace=True).mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def score(preset: Preset, store_path: Path, out: Path, uri: str) -> list[dict]:
    """One row per (method, feature kind, fold, seed): MAE and the test scans' errors."""
    import torch

    from hpcbrain.config import load_config
    from hpcbrain.data.store import CohortStore
    from hpcbrain.evaluate.ridge import extract_features
    from hpcbrain.job import build_datasets
    from hpcbrain.methods import build_method

    store = CohortStore(store_path)
    ages = np.asarray(store.column("age"), dtype=np.float64)
    subjects = np.asarray(store.column("subject")).astype(str)
    voxels = np.stack([store.read_image(i).ravel() for i in range(len(ages))])
    cpu = torch.device("cpu")
    rows = []

    def add(method, features, fold, seed, test, errors):
        rows.append({"method": method, "features": features, "fold": fold, "seed": seed,
                     "mae": float(errors.mean()), "test": test.tolist(),
                     "errors": errors.tolist()})

    untrained_features = {}       # per seed: an untrained encoder is the same for every fold
    for seed in preset.seeds:
        torch.manual_seed(seed)
        untrained = build_method(load_config([f"{REFERENCE}.yaml", *preset.configs],
                                             [f"data.input_size={preset.input_size}",
                                              *preset.overrides])).eval()
        untrained_features[seed] = {kind: extract_features(encoder, store, np.arange(len(ages)), cpu)
                                    for kind, encoder in feature_sets(untrained).items()}
    for fold in range(preset.folds):
        base = run_config(preset, preset.methods[0], store_path, fold, preset.seeds[0], out, uri)
        split, _, _ = build_datasets(base, store, "scans")
        train, test = split.train, split.test
        y_train, y_test, groups = ages[train], ages[test], subjects[train]
        add("constant", "-", fold, -1, test, np.abs(y_test - y_train.mean()))
        add("ridge on raw voxels", "-", fold, -1, test,
            ridge_errors(voxels[train], y_train, groups, voxels[test], y_test))
        for seed in preset.seeds:
            for kind, fx in untrained_features[seed].items():
                add("untrained encoder", kind, fold, seed, test,
                    ridge_errors(fx[train], y_train, groups, fx[test], y_test))
            for method_name in preset.methods:
                cfg = run_config(preset, method_name, store_path, fold, seed, out, uri)
                method = trained_method(cfg)
                for kind, encoder in feature_sets(method).items():
                    fx = extract_features(encoder, store, np.arange(len(ages)), cpu)
                    add(method_name, kind, fold, seed, test,
                        ridge_errors(fx[train], y_train, groups, fx[test], y_test))
    return rows


def summarise(rows: list[dict], ages: np.ndarray) -> tuple[str, dict]:
    classes = density_classes(ages)
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["method"], row["features"]), []).append(row)
    constant = np.mean([r["mae"] for r in groups[("constant", "-")]])
    summary = {}
    lines = ["| method | features | runs | age MAE (mean ± sd over runs) | × constant | "
             f"Δ vs {REFERENCE} (95 % CI over paired runs) | MAE sparse ages | MAE dense ages |",
             "|---|---|---|---|---|---|---|---|"]
    order = sorted(groups, key=lambda key: np.mean([r["mae"] for r in groups[key]]))
    for key in order:
        runs = groups[key]
        maes = np.array([r["mae"] for r in runs])
        errors = np.concatenate([r["errors"] for r in runs])
        scans = np.concatenate([r["test"] for r in runs]).astype(int)
        by_class = {c: float(errors[classes[scans] == c].mean()) if (classes[scans] == c).any()
                    else float("nan") for c in ("sparse", "dense")}
        entry = {"runs": len(runs), "mae_mean": float(maes.mean()),
                 "mae_sd": float(maes.std(ddof=1)) if len(maes) > 1 else 0.0,
                 "mae_sparse": by_class["sparse"], "mae_dense": by_class["dense"]}
        reference = {(r["fold"], r["seed"]): r["mae"] for r in groups.get((REFERENCE, key[1]), [])}
        paired = np.array([r["mae"] - reference[(r["fold"], r["seed"])] for r in runs
                           if (r["fold"], r["seed"]) in reference])
        delta = "–"
        if key[0] != REFERENCE and len(paired):
            lo, hi = bootstrap_interval(paired)
            entry.update(delta_mean=float(paired.mean()), delta_lo=lo, delta_hi=hi)
            verdict = ("better" if hi < 0 else "worse" if lo > 0 else "not resolved") \
                if len(paired) >= MIN_PAIRED_RUNS else f"{len(paired)} runs: no claim"
            delta = f"{paired.mean():+.2f} [{lo:+.2f}, {hi:+.2f}] ({verdict})"
        summary[f"{key[0]} / {key[1]}"] = entry
        spread = f" ± {entry['mae_sd']:.2f}" if len(runs) > 1 else ""
        lines.append(f"| {key[0]} | {key[1]} | {len(runs)} | {entry['mae_mean']:.2f}{spread} | "
                     f"{entry['mae_mean'] / constant:.2f} | {delta} | {entry['mae_sparse']:.2f} | "
                     f"{entry['mae_dense']:.2f} |")
    n_sparse = int((classes == "sparse").sum())
    lines += ["", f"Sparse ages: scans in 5-year bins holding fewer scans than the median bin "
                  f"({n_sparse} of {len(ages)} scans)."]
    return "\n".join(lines) + "\n", summary


def gpu_cost(preset: Preset, n_scans: int) -> str:
    """Training FLOPs of the preset from counted forward FLOPs (×3 for forward + backward)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from hpcbrain.config import load_config
    from hpcbrain.methods import build_method

    cfg = load_config([f"{REFERENCE}.yaml", *preset.configs],
                      [f"data.input_size={preset.input_size}", *preset.overrides])
    method = build_method(cfg)
    views = torch.zeros(2, 1, *(preset.input_size,) * 3)
    with FlopCounterMode(display=False) as counter:
        method.head(method.backbone(views))
    per_view = counter.get_total_flops() / 2
    train_scans = n_scans * (preset.folds - 1) / preset.folds
    runs = preset.folds * len(preset.seeds) * len(preset.methods)
    total = per_view * 3 * 2 * train_scans * int(cfg.train.epochs) * runs
    h100_hours = total / (0.4 * 400e12) / 3600      # bf16 at 40 % of ~400 TFLOP/s dense
    return (f"{per_view / 1e9:.3g} GFLOP per view forward; {runs} runs × {int(cfg.train.epochs)} "
            f"epochs × {train_scans:.0f} scans × 2 views × 3 (fwd+bwd) = {total / 1e15:.3g} PFLOP "
            f"≈ {h100_hours:.2g} GPU-hours on an H100-class GPU at 40 % of its bf16 peak")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    parser.add_argument("--seed", type=int, default=0, help="cohort seed")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench" / "contrastive")
    parser.add_argument("--age-distribution", default="bimodal",
                        choices=["normal", "uniform", "bimodal"])
    parser.add_argument("--tracking-uri", default=None)
    parser.add_argument("--plan", action="store_true", help="print the cost, train nothing")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--slurm", action="store_true", help="train as one Slurm job array")
    where.add_argument("--local", action="store_true", help="train here even with Slurm")
    args = parser.parse_args()
    preset = PRESETS[args.preset]
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    uri = args.tracking_uri or f"sqlite:///{out}/mlflow.db"
    if args.plan:   # before synthesising anything: the gpu cohort takes a while on a CPU
        n_scans = round(preset.subjects * SCANS_PER_SUBJECT)
        print(f"preset {args.preset}: ≈{n_scans} scans; {gpu_cost(preset, n_scans)}")
        return 0
    store = make_cohort(out, args.seed, preset.subjects,
                        ["--age-distribution", args.age_distribution], shape=preset.input_size)
    from hpcbrain.data.store import CohortStore

    n_scans = len(CohortStore(store))
    print(f"preset {args.preset}: {n_scans} scans; {gpu_cost(preset, n_scans)}", flush=True)
    configs = [run_config(preset, m, store, fold, seed, out, uri) for m in preset.methods
               for fold in range(preset.folds) for seed in preset.seeds]
    use_slurm = args.slurm or (not args.local and shutil.which("sbatch") is not None)
    started = time.perf_counter()
    train_all(configs, use_slurm)
    rows = score(preset, store, out, uri)
    ages = np.asarray(CohortStore(store).column("age"), dtype=np.float64)
    table, summary = summarise(rows, ages)
    header = (f"Preset `{args.preset}`, cohort seed {args.seed} ({args.age_distribution} ages, "
              f"{preset.subjects} subjects, {n_scans} scans, {preset.input_size}³), "
              f"{preset.folds} subject folds × training seeds {preset.seeds}; configs "
              f"{[m + '.yaml' for m in preset.methods]} + {preset.configs} {preset.overrides}. "
              f"Wall time {time.perf_counter() - started:.0f} s.\n\n")
    (out / "table.md").write_text(header + table)
    (out / "table.json").write_text(json.dumps({"preset": args.preset, "seed": args.seed,
                                                "summary": summary, "runs": rows}, indent=1))
    import mlflow

    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(f"contrastive-table-{out.name}")
    with mlflow.start_run(run_name=f"table-{args.preset}-seed{args.seed}"):
        for name, entry in summary.items():
            key = name.replace(" / ", "__").replace(" ", "_").replace("(", "").replace(")", "")
            mlflow.log_metric(f"{key}/mae_mean", entry["mae_mean"])
        mlflow.log_artifact(str(out / "table.md"))
        mlflow.log_artifact(str(out / "table.json"))
    print(header + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
