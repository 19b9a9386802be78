"""Does contrastive regression learn an age that carries over to a cohort it never saw?

For each cohort seed S: cohort A (`hpcbrain synth --seed S`) and a disjoint cohort B (seed
S + 1000), both bimodal in age by default, converted to 32³. Each method is trained on all of A
with its config and configs/bench-cpu.yaml (`data.n_folds=1`), once per training seed. Then, as
a user would: `hpcbrain embed` of every scan of A and of B with the registered encoder, a ridge
fitted on A's features (alpha by subject-grouped inner CV, standardised features), and its age
MAE on B. Baselines on the same pair: the constant (A's mean age), ridge on A's raw 32³ voxels,
the oracle (age fitted on true brain age in A).

    .venv/bin/python -m bench.science.contrastive_transfer --cohort-seeds 200 \
        --methods adapn simclr --train-seeds 0 1 --out runs/bench/transfer

Writes OUT/table.md and OUT/table.json and prints the table. ~5 minutes per training run on a
2-core CPU; a run whose scores exist is not retrained.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import numpy as np

from bench.common import ROOT, VENV, make_cohort, ridge_errors, run


def cohort_table(store_path: Path):
    from hpcbrain.data.store import CohortStore
    from hpcbrain.evaluate.truth import synthetic_brain_age

    store = CohortStore(store_path)
    paths = [str(p) for p in store.metadata["source_path"]]
    ages = np.asarray(store.column("age"), dtype=np.float64)
    subjects = np.asarray(store.column("subject")).astype(str)
    return store, paths, ages, subjects, synthetic_brain_age(store)


def embed(model_uri: str, paths: list[str], out: Path, env: dict) -> np.ndarray:
    if not out.exists():
        run([str(VENV / "hpcbrain"), "embed", model_uri, *paths, "--out", str(out)], env)
    with open(out, newline="") as handle:
        rows = {row["path"]: row for row in csv.DictReader(handle)}
    columns = [c for c in next(iter(rows.values())) if c.startswith("z")]
    return np.array([[float(rows[p][c]) for c in columns] for p in paths])


def transfer_mae(train_x, train_y, groups, test_x, test_y) -> float:
    return float(ridge_errors(train_x, train_y, groups, test_x, test_y).mean())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cohort-seeds", type=int, nargs="+", default=[200])
    parser.add_argument("--methods", nargs="+", default=["adapn", "simclr"])
    parser.add_argument("--train-seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--subjects", type=int, default=160)
    parser.add_argument("--age-distribution", default="bimodal",
                        choices=["normal", "uniform", "bimodal"])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench" / "transfer")
    parser.add_argument("overrides", nargs="*", help="config overrides for every training run")
    args = parser.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{out}/mlflow.db"
    env = {"MLFLOW_TRACKING_URI": uri}
    synth_args = ["--age-distribution", args.age_distribution]
    results = []
    for cohort_seed in args.cohort_seeds:
        a_store = make_cohort(out, cohort_seed, args.subjects, synth_args)
        b_store = make_cohort(out, cohort_seed + 1000, args.subjects, synth_args)
        a, a_paths, a_age, a_subj, a_brain = cohort_table(a_store)
        b, b_paths, b_age, _, b_brain = cohort_table(b_store)
        base = {"cohort_seed": cohort_seed, "n_train": len(a_age), "n_test": len(b_age)}
        results.append({**base, "method": "constant",
                        "mae": float(np.mean(np.abs(b_age - a_age.mean())))})
        a_vox = np.stack([a.read_image(i).ravel() for i in range(len(a_age))])
        b_vox = np.stack([b.read_image(i).ravel() for i in range(len(b_age))])
        results.append({**base, "method": "ridge on raw voxels",
                        "mae": transfer_mae(a_vox, a_age, a_subj, b_vox, b_age)})
        results.append({**base, "method": "oracle (true brain age)",
                        "mae": transfer_mae(a_brain[:, None], a_age, a_subj, b_brain[:, None], b_age)})
        for method in args.methods:
            for train_seed in args.train_seeds:
                name = f"{method}-c{cohort_seed}-s{train_seed}"
                score_file = out / name / "transfer.json"
                if score_file.exists():
                    results.append(json.loads(score_file.read_text()))
                    continue
                model = f"bench-transfer-{name}"
                started = time.perf_counter()
                run([str(VENV / "python"), "launch/submit.py", "--cfg", f"{method}.yaml",
                     "--cfg", "bench-cpu.yaml", "--local", f"data.store={a_store}",
                     "data.n_folds=1", f"train.seed={train_seed}", f"run.root={out}",
                     f"run.name={name}", f"tracking.uri={uri}",
                     f"tracking.registered_model={model}", "tracking.registered_age_model=null",
                     *args.overrides])
                train_s = time.perf_counter() - started
                a_x = embed(f"models:/{model}@current", a_paths, out / name / "latents_a.csv", env)
                b_x = embed(f"models:/{model}@current", b_paths, out / name / "latents_b.csv", env)
                row = {**base, "method": method, "train_seed": train_seed,
                       "mae": transfer_mae(a_x, a_age, a_subj, b_x, b_age),
                       "train_s": round(train_s, 1)}
                score_file.write_text(json.dumps(row, indent=1))
                results.append(row)
    lines = ["| cohort seed | method | runs | age MAE on the unseen cohort (mean ± sd over runs) "
             "| × constant |", "|---|---|---|---|---|"]
    for cohort_seed in args.cohort_seeds:
        rows = [r for r in results if r["cohort_seed"] == cohort_seed]
        constant = next(r["mae"] for r in rows if r["method"] == "constant")
        for method in dict.fromkeys(r["method"] for r in rows):
            maes = np.array([r["mae"] for r in rows if r["method"] == method])
            spread = f" ± {maes.std(ddof=1):.2f}" if len(maes) > 1 else ""
            lines.append(f"| {cohort_seed} | {method} | {len(maes)} | {maes.mean():.2f}{spread} | "
                         f"{maes.mean() / constant:.2f} |")
    table = "\n".join(lines)
    (out / "table.md").write_text(table + "\n")
    (out / "table.json").write_text(json.dumps({"results": results, "overrides": args.overrides,
                                                "synth": synth_args}, indent=2))
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
