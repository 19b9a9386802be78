"""Brain age a lab can publish: accuracy, age bias, intervals, test–retest reliability and
validity against the true brain age, on cohorts the model never saw.

Cohort A (`hpcbrain synth --seed S`, 160 subjects) trains the age model: AdapN with
configs/adapn.yaml + bench-cpu.yaml + brain-age-cpu.yaml (every subject trains the registered
encoder; 5 fold runs, each trained without a fifth of the subjects, predict those subjects to
calibrate it), once per training seed. Then, as a user
would, `hpcbrain predict-age MODEL <every scan> --out …` on two new cohorts with a rescan of
every visit (`--rescans 1`): B, drawn like A (seed S + 1000), and C with a wider true brain-age
gap (`--brain-age-gap-sd 5`, seed S + 2000). Ages come from the cohorts' BIDS tables.

Rows beside the model, calibrated the same way on A (cross-fitted over A's subjects): the
constant predictor (A's mean age), ridge on A's raw 32³ voxels, and the true brain age
(derivatives/synth/brain_age.tsv) linearly mapped to age — the ceiling. Optionally
(`--lsor`) LSOR trained on A with configs/lsor.yaml + configs/demo.yaml, and how often
`hpcbrain embed` puts both runs of a visit in the same or a neighbouring SOM node.

Scores on each test cohort (run-1 scans, one per visit; reliability over run-1 × run-2):
MAE, RMSE, r, R² of the predicted age, uncorrected and with the age-bias correction (predicted
= age + corrected gap); Spearman(gap, age) before and after; interval coverage and mean width;
Pearson r(corrected gap, true gap); ICC(2,1) of predicted age and of the corrected gap.

    .venv/bin/python -m bench.science.brain_age --cohort-seed 600 --train-seeds 0 1 2 \
        --lsor --out runs/bench/brain_age

Writes OUT/table.md and OUT/table.json and prints the table; finished steps are reused.
"""
from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np

from bench.common import ROOT, VENV, make_cohort, run

TRAIN = ["--cfg", "adapn.yaml", "--cfg", "bench-cpu.yaml", "--cfg", "brain-age-cpu.yaml"]


def bids_scans(bids: Path) -> list[Path]:
    return sorted(bids.glob("sub-*/ses-*/anat/*_T1w.nii.gz"))


def true_brain_age(bids: Path, scans: list[Path]) -> np.ndarray:
    from hpcbrain.evaluate.reliability import visits_of

    with open(bids / "derivatives" / "synth" / "brain_age.tsv", newline="") as handle:
        truth = {(r["participant_id"].removeprefix("sub-"), r["session_id"].removeprefix("ses-")):
                 float(r["brain_age"]) for r in csv.DictReader(handle, delimiter="\t")}
    return np.array([truth[key] for key in visits_of(scans)[0]])


def scores(predicted, age, calibration, truth, scans) -> dict:
    """Every figure of one predictor on one test cohort (see the module doc)."""
    from scipy.stats import pearsonr, spearmanr

    from hpcbrain.evaluate.age_calibration import apply_calibration
    from hpcbrain.evaluate.reliability import icc_2_1, runs_table, visits_of

    out = apply_calibration(calibration, predicted, age)
    first = np.asarray(visits_of(scans)[1]) == 1

    def accuracy(pred, suffix):
        err = pred[first] - age[first]
        r = pearsonr(pred[first], age[first])[0] if np.ptp(pred[first]) > 0 else float("nan")
        return {f"mae{suffix}": float(np.abs(err).mean()),
                f"rmse{suffix}": float(np.sqrt(np.mean(err ** 2))), f"r{suffix}": float(r),
                f"r2{suffix}": float(1 - np.sum(err ** 2)
                                     / np.sum((age[first] - age[first].mean()) ** 2))}

    def spread(values) -> bool:
        return bool(np.isfinite(values).all() and np.ptp(values) > 1e-9)

    def spearman(values):
        return float(spearmanr(values[first], age[first])[0]) if spread(values[first]) \
            else float("nan")

    def icc(values):
        table = runs_table(scans, values)
        return icc_2_1(table) if table.size and spread(table) else float("nan")

    corrected_gap = out.brain_age_gap_corrected
    if np.ptp(predicted) < 1e-3:
        # a constant: its gap is −(age − constant), and "correcting" it removes all of it;
        # nothing about the scan is left to correct or to compare
        corrected_gap = np.full_like(predicted, np.nan)
    true_gap = truth - age
    covered = (age >= out.interval_low) & (age <= out.interval_high)
    low, high = _subject_bootstrap_spearman(corrected_gap[first], age[first],
                                            [k[0] for k, f in zip(visits_of(scans)[0], first)
                                             if f])
    return {**accuracy(predicted, ""), **accuracy(age + corrected_gap, "_corrected"),
            "spearman_gap_age": spearman(out.brain_age_gap),
            "spearman_gap_age_corrected": spearman(corrected_gap),
            "spearman_corrected_ci_low": low, "spearman_corrected_ci_high": high,
            "coverage": float(covered[first].mean()),
            "interval_width": float(np.mean(out.interval_high - out.interval_low)),
            "r_gap_true_gap": float(pearsonr(corrected_gap[first], true_gap[first])[0])
            if spread(corrected_gap[first]) else float("nan"),
            "icc_age": icc(predicted), "icc_gap_corrected": icc(corrected_gap),
            "n_scans": int(first.sum()), "n_rescan_visits": int(runs_table(scans, age).shape[0])}


def _subject_bootstrap_spearman(gap, age, subjects, draws: int = 1000,
                                seed: int = 0) -> tuple[float, float]:
    """95 % interval of Spearman(gap, age) over resamples of the test cohort's subjects: how
    far the test cohort's own sampling moves the figure the target is set on."""
    from scipy.stats import spearmanr

    if not (np.isfinite(gap).all() and np.ptp(gap) > 1e-9):
        return float("nan"), float("nan")
    subjects = np.asarray(subjects)
    labels = np.unique(subjects)
    rows = {s: np.flatnonzero(subjects == s) for s in labels}
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(draws):
        pick = np.concatenate([rows[s] for s in rng.choice(labels, labels.size)])
        values.append(spearmanr(gap[pick], age[pick])[0])
    return float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))


def reference_predictors(a_store: Path, bids_by_cohort: dict, a_bids: Path) -> dict:
    """Constant, ridge on raw voxels and the true brain age: fitted and calibrated on A
    (cross-fitted over A's subjects), predictions on every scan of each test cohort."""
    from hpcbrain.data.preprocess import load_scan
    from hpcbrain.data.store import CohortStore
    from hpcbrain.evaluate.age_calibration import cross_fitted_predictions, fit_calibration
    from hpcbrain.evaluate.ridge import fit_ridge
    from hpcbrain.evaluate.truth import synthetic_brain_age

    store = CohortStore(a_store)
    ages = np.asarray(store.column("age"), np.float64)
    subjects = np.asarray(store.column("subject")).astype(str)
    voxels = np.stack([store.read_image(i).ravel() for i in range(len(store))]).astype(float)
    truth = synthetic_brain_age(store)[:, None]
    out = {}
    for name, features, standardize in (("ridge on raw 32³ voxels", voxels, True),
                                        ("true brain age (ceiling)", truth, False)):
        oof = cross_fitted_predictions(features, ages, subjects, folds=5, seed=0)
        calibration = fit_calibration(oof, ages, subjects)
        model = fit_ridge(features, ages, groups=subjects, seed=0, standardize=standardize)
        out[name] = (model, calibration, features is truth)
    constant = float(ages.mean())
    rng = np.random.default_rng(0)     # a constant has no spread: a hair of noise keeps the
    oof = constant + 1e-6 * rng.standard_normal(ages.size)   # bias line well defined
    out["constant (A's mean age)"] = (constant, fit_calibration(oof, ages, subjects), None)
    predictions = {}
    for cohort, (bids, scans) in bids_by_cohort.items():
        cohort_voxels = np.stack([load_scan(s, store.shape[-1])[0].ravel() for s in scans])
        truth_c = true_brain_age(bids, scans)[:, None]
        for name, (model, calibration, uses_truth) in out.items():
            if uses_truth is None:
                predicted = np.full(len(scans), model)
            else:
                predicted = model.predict(truth_c if uses_truth else cohort_voxels)
            predictions[cohort, name] = (predicted, calibration)
    return predictions


def predict_with_cli(model_uri: str, scans: list[Path], out: Path, env: dict):
    from hpcbrain.evaluate.age_calibration import load_calibration

    if not out.exists():
        run([VENV / "hpcbrain", "predict-age", model_uri, *scans, "--out", out], env)
    with open(out, newline="") as handle:
        rows = {row["path"]: row for row in csv.DictReader(handle)}
    predicted = np.array([float(rows[str(s)]["predicted_age"]) for s in scans])
    import mlflow.artifacts

    calibration = load_calibration(mlflow.artifacts.download_artifacts(artifact_uri=model_uri))
    return predicted, calibration


def lsor_agreement(a_store: Path, out: Path, env: dict, scans: list[Path]) -> dict:
    from hpcbrain.evaluate.reliability import node_agreement

    latents = out / "lsor_embed.csv"
    if not latents.exists():
        run([VENV / "hpcbrain", "train", "--cfg", "lsor.yaml", "--cfg", "demo.yaml",
             f"data.store={a_store}", f"run.root={out / 'runs'}", "run.name=lsor",
             "tracking.registered_model=ba-lsor", "tracking.experiment=brain-age"], env)
        run([VENV / "hpcbrain", "embed", "models:/ba-lsor@current", *scans, "--out", latents],
            env)
    with open(latents, newline="") as handle:
        rows = {row["path"]: row for row in csv.DictReader(handle)}
    return node_agreement(scans, np.array([int(rows[str(s)]["som_row"]) for s in scans]),
                          np.array([int(rows[str(s)]["som_col"]) for s in scans]))


def summarise(rows: list[dict]) -> dict:
    keys = [k for k in rows[0] if isinstance(rows[0][k], float)]
    return {k: (float(np.mean([r[k] for r in rows])), float(np.std([r[k] for r in rows])))
            for k in keys} | {"runs": len(rows)}


COLUMNS = [("mae", "MAE"), ("ratio", "× const"), ("rmse", "RMSE"), ("r", "r"), ("r2", "R²"),
           ("mae_corrected", "MAE corr"), ("r2_corrected", "R² corr"),
           ("spearman_gap_age", "ρ(gap, age)"), ("spearman_gap_age_corrected", "ρ(gap corr, age)"),
           ("spearman_corrected_ci_low", "its 95 % CI low"),
           ("spearman_corrected_ci_high", "high"),
           ("coverage", "90 % coverage"), ("interval_width", "width"),
           ("r_gap_true_gap", "r(gap corr, true gap)"), ("icc_age", "ICC age"),
           ("icc_gap_corrected", "ICC gap corr")]


def table_md(results: dict) -> str:
    lines = ["| cohort | predictor | runs | " + " | ".join(c[1] for c in COLUMNS) + " |",
             "|---" * (3 + len(COLUMNS)) + "|"]
    for (cohort, name), summary in results.items():
        const = results[cohort, "constant (A's mean age)"]["mae"][0]
        cells = []
        for key, _ in COLUMNS:
            mean, sd = (summary["mae"][0] / const, 0.0) if key == "ratio" else summary[key]
            cells.append("–" if not np.isfinite(mean) else
                         f"{mean:.2f}" + (f" ± {sd:.2f}" if summary["runs"] > 1 else ""))
        lines.append(f"| {cohort} | {name} | {summary['runs']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cohort-seed", type=int, default=600)
    parser.add_argument("--train-seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--subjects", type=int, default=160)
    parser.add_argument("--rescans", type=int, default=1)
    parser.add_argument("--wide-gap-sd", type=float, default=5.0)
    parser.add_argument("--lsor", action="store_true", help="also LSOR's node agreement")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench" / "brain_age")
    parser.add_argument("overrides", nargs="*", help="config overrides for the AdapN runs")
    args = parser.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{out}/mlflow.db"}
    import os

    os.environ.update(env)
    seed = args.cohort_seed
    a_store = make_cohort(out, seed, args.subjects, [])
    tests = {"B (like A)": (seed + 1000, []),
             f"C (gap sd {args.wide_gap_sd:g})": (seed + 2000,
                                                  ["--brain-age-gap-sd", str(args.wide_gap_sd)])}
    cohorts = {}
    for cohort, (cohort_seed, extra) in tests.items():
        make_cohort(out, cohort_seed, args.subjects, ["--rescans", str(args.rescans), *extra])
        bids = out / f"bids{cohort_seed}"
        cohorts[cohort] = (bids, bids_scans(bids))

    results: dict = {}
    per_run: dict = {}
    for (cohort, name), (predicted, calibration) in reference_predictors(
            a_store, cohorts, out / f"bids{seed}").items():
        bids, scans = cohorts[cohort]
        age = ages_of(scans)
        per_run.setdefault((cohort, name), []).append(
            scores(predicted, age, calibration, true_brain_age(bids, scans), scans))
    for train_seed in args.train_seeds:
        name = f"ba-adapn-s{train_seed}"
        model = f"models:/{name}-age@current"
        if not (out / "runs" / name / "DONE").exists():
            run([VENV / "hpcbrain", "train", *TRAIN, f"data.store={a_store}",
                 f"train.seed={train_seed}", f"run.root={out / 'runs'}", f"run.name={name}",
                 f"tracking.registered_model={name}-encoder",
                 f"tracking.registered_age_model={name}-age", "tracking.experiment=brain-age",
                 *args.overrides], env)
            (out / "runs" / name / "DONE").write_text("")
        for cohort, (bids, scans) in cohorts.items():
            csv_path = out / f"{name}_{cohort.split()[0]}.csv"
            predicted, calibration = predict_with_cli(model, scans, csv_path, env)
            per_run.setdefault((cohort, "AdapN"), []).append(
                scores(predicted, ages_of(scans), calibration, true_brain_age(bids, scans),
                       scans))
    order = ["constant (A's mean age)", "ridge on raw 32³ voxels", "AdapN",
             "true brain age (ceiling)"]
    for cohort in cohorts:
        for name in order:
            results[cohort, name] = summarise(per_run[cohort, name])
    text = table_md(results)
    payload = {"cohort_seed": seed, "train_seeds": args.train_seeds,
               "configs": TRAIN + args.overrides,
               "rows": [{"cohort": c, "predictor": n, **s} for (c, n), s in results.items()],
               "per_run": {f"{c} | {n}": rows for (c, n), rows in per_run.items()}}
    if args.lsor:
        bids, scans = cohorts["B (like A)"]
        agreement = lsor_agreement(a_store, out, env, scans)
        payload["lsor_node_agreement"] = agreement
        text += (f"\nLSOR (lsor.yaml + demo.yaml on A), cohort B rescans: same node "
                 f"{agreement['same_node']:.2f}, same or neighbouring node "
                 f"{agreement['same_or_neighbour']:.2f} over {int(agreement['pairs'])} visit "
                 f"pairs\n")
    (out / "table.md").write_text(text)
    (out / "table.json").write_text(json.dumps(payload, indent=1))
    print(text)
    return 0


def ages_of(scans: list[Path]) -> np.ndarray:
    from hpcbrain.evaluate.scan_ages import chronological_ages

    return chronological_ages(scans)


if __name__ == "__main__":
    raise SystemExit(main())
