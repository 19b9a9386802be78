"""How far the best possible brain-age model — the cohort's own true brain age — meets issue 23's
targets, over many cohort pairs: no images, no training, only the subject plans `hpcbrain synth`
draws (ages, true brain ages), so hundreds of pairs take seconds.

For each pair (A: seed S, B: seed S + 1000, both drawn like `hpcbrain synth --subjects N`), the
true brain age is calibrated on A exactly as the benchmark calibrates it (ridge on the one
feature, cross-fitted over A's subjects, Beheshti's bias line on the out-of-fold predictions)
and applied to every visit of B. Printed: the share of pairs where |Spearman(corrected gap, age)|
≤ 0.10 and where MAE ≤ 0.8 × the constant predictor's, with the spread of both figures — what
the targets of `bench/science/brain_age.py` can promise at this cohort size.

    .venv/bin/python -m bench.science.brain_age_ceiling --pairs 200 --subjects 160
"""
from __future__ import annotations

import argparse

import numpy as np


def cohort_visits(seed: int, n_subjects: int, gap_sd: float | None = None):
    """(age, true brain age, subject) per visit of the cohort `hpcbrain synth` would draw."""
    from hpcbrain.data.synth_subjects import aging_model, assign_groups, plan_subject

    model = aging_model("registered", brain_age_gap_sd=gap_sd)
    rows = [(v.age, v.brain_age, s.participant_id)
            for k, group in enumerate(assign_groups(n_subjects))
            for s in [plan_subject(k, group, seed, model)] for v in s.sessions]
    age, truth, subject = zip(*rows)
    return np.array(age), np.array(truth), np.array(subject)


def one_pair(seed: int, n_subjects: int) -> tuple[float, float]:
    """(Spearman(corrected gap, age), MAE / constant MAE) of the ceiling on B."""
    from scipy.stats import spearmanr

    from hpcbrain.evaluate.age_calibration import apply_calibration, cross_fitted_predictions, fit_calibration
    from hpcbrain.evaluate.ridge import fit_ridge

    age_a, truth_a, subjects_a = cohort_visits(seed, n_subjects)
    age_b, truth_b, _ = cohort_visits(seed + 1000, n_subjects)
    features = truth_a[:, None]
    oof = cross_fitted_predictions(features, age_a, subjects_a, folds=5, seed=0)
    calibration = fit_calibration(oof, age_a, subjects_a)
    ridge = fit_ridge(features, age_a, groups=subjects_a, seed=0, standardize=False)
    predicted = ridge.predict(truth_b[:, None])
    calibrated = apply_calibration(calibration, predicted, age_b)
    rho = float(spearmanr(calibrated.brain_age_gap_corrected, age_b)[0])
    constant_mae = float(np.abs(age_b - age_a.mean()).mean())
    return rho, float(np.abs(predicted - age_b).mean()) / constant_mae


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=200)
    parser.add_argument("--subjects", type=int, nargs="+", default=[160])
    parser.add_argument("--first-seed", type=int, default=10_000)
    args = parser.parse_args()
    print("| subjects per cohort | pairs | Spearman(corrected gap, age): mean ± sd | "
          "share with abs ≤ 0.10 | MAE / constant: mean ± sd | share ≤ 0.8 |")
    print("|---|---|---|---|---|---|")
    for n in args.subjects:
        figures = np.array([one_pair(args.first_seed + 7 * p, n) for p in range(args.pairs)])
        rho, ratio = figures[:, 0], figures[:, 1]
        print(f"| {n} | {args.pairs} | {rho.mean():+.3f} ± {rho.std(ddof=1):.3f} | "
              f"{np.mean(np.abs(rho) <= 0.10):.2f} | {ratio.mean():.3f} ± "
              f"{ratio.std(ddof=1):.3f} | {np.mean(ratio <= 0.8):.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
