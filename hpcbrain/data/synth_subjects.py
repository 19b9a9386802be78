"""Who the synthetic cohort's subjects are: the ageing model of each preset and age
distribution, the groups in the LSOR paper's proportions, and each subject's plan (sex, pose,
deformation, scanner, visits with their latent brain ages). Numbers only: no image is made here
(`hpcbrain.data.synth_anatomy` renders them, `hpcbrain.data.synth` writes the BIDS dataset).

Randomness: `SeedSequence(seed, spawn_key=(k, ...))` per subject k, so subject k's plan does not
depend on the number of subjects nor on the voxel size.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np

GROUPS = ("NC", "sMCI", "pMCI", "AD")
# LSOR paper's ADNI-1 cohort (632 subjects): the proportions every synthetic cohort follows.
LSOR_GROUP_COUNTS = {"NC": 185, "sMCI": 193, "pMCI": 135, "AD": 119}
#: "registered": what scans look like after affine registration to MNI (the pipelines behind
#: both papers register); "raw": unregistered head size and pose, for testing registration.
PRESETS = ("registered", "raw")
AGE_DISTRIBUTIONS = ("normal", "uniform", "bimodal")
INTENSITY_SCALE = 1000.0     # template intensity (0..1) -> image units (WM ~ 860, CSF ~ 280)
# Every 5th subject (sub-005, sub-010, ...) is stored in one of these orientations, in turn.
ODD_ORIENTATIONS = (("L", "A", "S"), ("L", "P", "S"), ("P", "I", "R"))


@dataclass(frozen=True)
class AgingModel:
    """Every number of the generative model (written to derivatives/synth/synth_parameters.json)."""

    # brain-years per calendar year (NC = normal ageing by definition; others from the ratios
    # of hippocampal / whole-brain atrophy rates in aging-facts.md)
    rate: dict = field(default_factory=lambda: {"NC": 1.0, "sMCI": 1.5, "pMCI": 2.1, "AD": 2.5})
    rate_sd: float = 0.15
    rate_min: float = 0.6
    # mean brain-age gap (brain age - age) at baseline, years, and its between-subject sd
    baseline_gap: dict = field(default_factory=lambda: {"NC": 0.0, "sMCI": 2.0, "pMCI": 4.0,
                                                        "AD": 8.0})
    baseline_gap_sd: float = 3.0
    # baseline age within `baseline_age_range`: "normal" ~ N(mean, sd) clipped (LSOR cohort:
    # mean 75-76 in every group), "uniform", or "bimodal" (a dense young and a dense old mode,
    # sparse in between: the non-uniform label density AdapN was made for)
    baseline_age_distribution: str = "normal"
    baseline_age_mean: float = 75.5
    baseline_age_sd: float = 7.0
    baseline_age_range: tuple = (60.0, 90.0)
    # visits: count 2..5 with these probabilities (mean 3.8 = LSOR's 2389 scans / 632 subjects),
    # gaps drawn from ADNI-like 6/12/18/24-month intervals, jittered, within [0.5, 2] years
    visit_count_p: tuple = (0.15, 0.25, 0.25, 0.35)
    visit_gaps: tuple = (0.5, 1.0, 1.0, 1.5, 2.0)
    visit_gap_jitter: float = 0.08
    # ADAS-Cog = base[group] + subject offset + k * (gap - baseline_gap[group]) + noise
    adas_base: dict = field(default_factory=lambda: {"NC": 6.0, "sMCI": 10.5, "pMCI": 12.0,
                                                     "AD": 19.0})
    adas_per_gap_year: float = 1.5
    adas_subject_sd: float = 2.0
    adas_visit_sd: float = 1.0
    # image effects of brain age, counted from `reference_age` (the template is a young-adult
    # average: its ventricles, ~13 mL, are those of a brain younger than any in the cohort)
    reference_age: float = 50.0
    ventricle_mm_per_year: float = 0.15     # outward shift of the lateral ventricles' walls
    ventricle_max_mm: float = 10.0          # soft ceiling (tanh), keeps it strictly monotone
    ventricle_reach_mm: float = 25.0        # tissue within this distance is pushed aside
    cortex_per_year: float = 0.012          # fraction of the outer GM signal lost per year
    cortex_max: float = 0.7
    # subject anatomy and pose (the "raw", unregistered look; `aging_model("registered")` shrinks
    # them to what is left after an affine registration to MNI)
    preset: str = "raw"
    head_scale_mean: dict = field(default_factory=lambda: {"M": 1.03, "F": 0.97})
    head_scale_sd: float = 0.03
    deformation_rms_mm: float = 3.0
    deformation_modes: int = 5              # DCT modes per axis of the smooth random field
    deformation_smoothness: float = 1.5     # Gaussian width (in modes) of its spectrum
    rotation_sd_deg: float = 1.5
    translation_sd_mm: float = 2.0
    # scanner: a subject keeps its site's bias field and noise level, with small changes per scan
    bias_sd: float = 0.06                   # sd of each quadratic log-bias coefficient
    bias_scan_sd: float = 0.01              # its change from scan to scan
    noise_sd_range: tuple = (0.015, 0.03)   # Rician sigma as a fraction of INTENSITY_SCALE
    noise_scan_jitter: float = 0.1          # scan's sigma = subject's * U(1 -/+ jitter)


def aging_model(preset: str = "registered", *, age_distribution: str = "normal",
                age_range: tuple[float, float] | None = None,
                brain_age_gap_sd: float | None = None) -> AgingModel:
    """The generative model of a preset, with the cohort's age distribution and brain-age gap.

    "registered" removes what an affine registration to MNI removes: head size differences
    (scale sd 1 %, no sex difference), pose (0.3° / 0.3 mm), and leaves a milder residual warp
    (1.5 mm rms) and bias field (sd 0.02). Measured in docs/synthetic-cohort.md (40 subjects,
    32³): brain age explains 8.0 % of the voxel variance instead of 2.0 %. "raw" is the
    unregistered look (AgingModel's defaults)."""
    if preset not in PRESETS:
        raise ValueError(f"synth: unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    if age_distribution not in AGE_DISTRIBUTIONS:
        raise ValueError(f"synth: unknown age distribution {age_distribution!r}; choose one of "
                         f"{', '.join(AGE_DISTRIBUTIONS)}")
    changes: dict = {"preset": preset, "baseline_age_distribution": age_distribution}
    if preset == "registered":
        changes.update(head_scale_mean={"M": 1.0, "F": 1.0}, head_scale_sd=0.01,
                       rotation_sd_deg=0.3, translation_sd_mm=0.3, deformation_rms_mm=1.5,
                       bias_sd=0.02, bias_scan_sd=0.005)
    if age_range is not None:
        lo, hi = (float(a) for a in age_range)
        if not (0.0 <= lo < hi <= 120.0):
            raise ValueError(f"synth: age range must satisfy 0 <= LO < HI <= 120, got {lo} {hi}")
        # a normal distribution centred on the range, the range spanning ±2.15 sd (60-90: sd 7)
        changes.update(baseline_age_range=(lo, hi), baseline_age_mean=(lo + hi) / 2,
                       baseline_age_sd=(hi - lo) / 4.3)
    if brain_age_gap_sd is not None:
        if not 0.0 <= float(brain_age_gap_sd) <= 20.0:
            raise ValueError(f"synth: brain-age gap sd must lie in [0, 20] years, got "
                             f"{brain_age_gap_sd}")
        changes["baseline_gap_sd"] = float(brain_age_gap_sd)
    return replace(AgingModel(), **changes)


def _baseline_age(rng: np.random.Generator, model: AgingModel) -> float:
    lo, hi = model.baseline_age_range
    kind = model.baseline_age_distribution
    if kind == "normal":
        age = rng.normal(model.baseline_age_mean, model.baseline_age_sd)
    elif kind == "uniform":
        age = rng.uniform(lo, hi)
    elif kind == "bimodal":
        # 45 % around each end (centres 15 % in from the ends, sd 7 % of the range), 10 %
        # spread uniformly: the middle third holds ~3.4 % of the subjects (normal: ~53 %).
        width = hi - lo
        pick = rng.random()
        if pick < 0.45:
            age = rng.normal(lo + 0.15 * width, 0.07 * width)
        elif pick < 0.9:
            age = rng.normal(hi - 0.15 * width, 0.07 * width)
        else:
            age = rng.uniform(lo, hi)
    else:
        raise ValueError(f"synth: unknown age distribution {kind!r}")
    return round(float(np.clip(age, lo, hi)), 2)


@dataclass
class SessionPlan:
    session_id: str
    age: float
    brain_age: float
    diagnosis: str
    adas_cog: float
    ventricle_dilation_mm: float
    cortex_thinning: float


@dataclass
class SubjectPlan:
    index: int
    participant_id: str
    sex: str
    group: str
    aging_rate: float
    head_scale: float
    rotation_deg: np.ndarray
    translation_mm: np.ndarray
    deformation: np.ndarray          # (3, K, K, K) DCT coefficients, mm
    bias: np.ndarray                 # (3, 3, 3) log-bias polynomial coefficients
    noise_sd: float
    orientation: tuple
    sessions: list


def assign_groups(n_subjects: int) -> list[str]:
    """Groups of subjects 0..n-1: the first four cover every group, then each next subject goes
    to the group furthest below its LSOR share. Prefix-stable: subject k's group does not
    depend on n."""
    total = sum(LSOR_GROUP_COUNTS.values())
    share = {g: LSOR_GROUP_COUNTS[g] / total for g in GROUPS}
    first = sorted(GROUPS, key=lambda g: -share[g])      # sMCI, NC, pMCI, AD
    counts = dict.fromkeys(GROUPS, 0)
    groups = []
    for k in range(n_subjects):
        if k < len(first):
            g = first[k]
        else:
            g = max(GROUPS, key=lambda g: share[g] * (k + 1) - counts[g])
        counts[g] += 1
        groups.append(g)
    return groups


def _aging_effect(years: float, per_year: float, ceiling: float) -> float:
    """~ per_year * years for years >> 0, ~0 below 0, saturating towards `ceiling`; strictly
    increasing everywhere, so an older brain always shows a larger effect."""
    softplus = max(years, 0.0) + math.log1p(math.exp(-abs(years)))
    return ceiling * math.tanh(per_year * softplus / ceiling)


def plan_subject(k: int, group: str, seed: int, model: AgingModel) -> SubjectPlan:
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(k, 0)))
    sex = "M" if rng.random() < 0.5 else "F"
    n_visits = 2 + int(rng.choice(4, p=model.visit_count_p))
    ages = [_baseline_age(rng, model)]
    for _ in range(n_visits - 1):
        gap = float(rng.choice(model.visit_gaps)) + rng.uniform(-1, 1) * model.visit_gap_jitter
        ages.append(round(ages[-1] + round(float(np.clip(gap, 0.5, 2.0)), 2), 2))
    rate = max(model.rate_min, float(rng.normal(model.rate[group], model.rate_sd)))
    gap0 = float(rng.normal(model.baseline_gap[group], model.baseline_gap_sd))
    adas_offset = float(rng.normal(0.0, model.adas_subject_sd))
    conversion = int(rng.integers(1, n_visits)) if group == "pMCI" else None
    head_scale = float(np.clip(rng.normal(model.head_scale_mean[sex], model.head_scale_sd),
                               0.88, 1.12))
    rotation = np.clip(rng.normal(0.0, model.rotation_sd_deg, 3), -4.0, 4.0)
    translation = rng.normal(0.0, model.translation_sd_mm, 3)
    deformation = rng.standard_normal((3,) + (model.deformation_modes,) * 3)
    bias = rng.normal(0.0, model.bias_sd, (3, 3, 3))
    noise_sd = float(rng.uniform(*model.noise_sd_range)) * INTENSITY_SCALE

    sessions = []
    for v, age in enumerate(ages):
        brain_age = ages[0] + gap0 + rate * (age - ages[0])
        if group == "NC":
            diagnosis = "CN"
        elif group == "AD" or (group == "pMCI" and v >= conversion):
            diagnosis = "AD"
        else:
            diagnosis = "MCI"
        excess_gap = brain_age - age - model.baseline_gap[group]
        adas = (model.adas_base[group] + adas_offset + model.adas_per_gap_year * excess_gap
                + rng.normal(0.0, model.adas_visit_sd))
        older = brain_age - model.reference_age
        sessions.append(SessionPlan(
            session_id=f"ses-{v + 1:02d}", age=age, brain_age=brain_age, diagnosis=diagnosis,
            adas_cog=float(np.clip(adas, 0.0, 70.0)),
            ventricle_dilation_mm=_aging_effect(older, model.ventricle_mm_per_year,
                                                model.ventricle_max_mm),
            cortex_thinning=_aging_effect(older, model.cortex_per_year, model.cortex_max)))
    orientation = (ODD_ORIENTATIONS[((k + 1) // 5 - 1) % len(ODD_ORIENTATIONS)]
                   if (k + 1) % 5 == 0 else ("R", "A", "S"))
    return SubjectPlan(index=k, participant_id=f"sub-{k + 1:03d}", sex=sex, group=group,
                    aging_rate=rate, head_scale=head_scale, rotation_deg=rotation,
                    translation_mm=translation, deformation=deformation, bias=bias,
                    noise_sd=noise_sd, orientation=orientation, sessions=sessions)
