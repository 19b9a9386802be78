"""A synthetic longitudinal cohort with a known ground truth, written as a BIDS dataset.

Every feature (convert, train, evaluate) can then run end to end without ADNI, and an encoder's
brain-age predictions can be checked against the age the images were actually made with.

    synthesize_cohort("data/synth", n_subjects=20, seed=0)            # 2 mm, MNI grid
    synthesize_cohort("/tmp/tiny", n_subjects=8, seed=1, voxel_size_mm=4.0, progress=False)

The generative model (details and the chosen rates in docs/synthetic-cohort.md):

- base anatomy: the MNI152 2009 template and its GM map shipped in nilearn's wheel (2 mm);
- a subject: group (NC, sMCI, pMCI, AD in the LSOR paper's proportions), sex, a pose and size
  (rotation, translation, global scale), a smooth random deformation, 2-5 visits;
- a session: a latent brain age, rising `rate` brain-years per year (faster in pMCI and AD),
  that enlarges the lateral ventricles and thins the cortex; the subject's bias field and
  noise level (its scanner) with small changes per scan, and Rician noise;
- the ground truth (brain age and every other latent) goes to derivatives/synth/.

Randomness: `SeedSequence(seed, spawn_key=(k, ...))` per subject k, so subject k's tables do not
depend on the number of subjects nor on the voxel size, nor its images on the number of
subjects. The same arguments give byte-identical files.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path

import numpy as np

__all__ = ["SynthSummary", "AgingModel", "aging_model", "synthesize_cohort", "MARKER", "PRESETS",
           "AGE_DISTRIBUTIONS", "LEARNABILITY"]

GROUPS = ("NC", "sMCI", "pMCI", "AD")
# LSOR paper's ADNI-1 cohort (632 subjects): the proportions every synthetic cohort follows.
LSOR_GROUP_COUNTS = {"NC": 185, "sMCI": 193, "pMCI": 135, "AD": 119}
# Written last into derivatives/synth/: its presence marks a folder as a complete synth output.
MARKER = Path("derivatives") / "synth" / "synth_parameters.json"
# How well age can be predicted from the images, measured on the cohort just written.
LEARNABILITY = Path("derivatives") / "synth" / "learnability.json"
#: "registered": what scans look like after affine registration to MNI (the pipelines behind
#: both papers register); "raw": unregistered head size and pose, for testing registration.
PRESETS = ("registered", "raw")
AGE_DISTRIBUTIONS = ("normal", "uniform", "bimodal")
# The learnability report scores the volumes as `hpcbrain convert --shape 32` stores them, and
# needs enough subjects for a 5-fold subject-grouped cross-validation.
REPORT_SIZE = 32
MIN_SUBJECTS_FOR_REPORT = 10
BIDS_VERSION = "1.9.0"
SCALE_SLOPE = 0.1            # NIfTI scl_slope of every image: int16 stores intensity / 0.1
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


@dataclass(frozen=True)
class SynthSummary:
    """What `synthesize_cohort` wrote."""

    out_dir: Path
    n_subjects: int
    n_scans: int
    seed: int
    voxel_size_mm: float
    shape: tuple[int, int, int]
    group_counts: dict
    elapsed_s: float
    preset: str = "registered"
    learnability: dict | None = None     # what derivatives/synth/learnability.json holds

    def __str__(self) -> str:
        groups = ", ".join(f"{g} {n}" for g, n in self.group_counts.items())
        return (f"{self.n_subjects} subjects ({groups}), {self.n_scans} scans of "
                f"{'x'.join(map(str, self.shape))} at {self.voxel_size_mm:g} mm, {self.preset} "
                f"preset, seed {self.seed} -> {self.out_dir} in {self.elapsed_s:.1f} s")


# ----------------------------------------------------------------------------- subjects

@dataclass
class _Session:
    session_id: str
    age: float
    brain_age: float
    diagnosis: str
    adas_cog: float
    ventricle_dilation_mm: float
    cortex_thinning: float


@dataclass
class _Subject:
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


def _plan_subject(k: int, group: str, seed: int, model: AgingModel) -> _Subject:
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
        sessions.append(_Session(
            session_id=f"ses-{v + 1:02d}", age=age, brain_age=brain_age, diagnosis=diagnosis,
            adas_cog=float(np.clip(adas, 0.0, 70.0)),
            ventricle_dilation_mm=_aging_effect(older, model.ventricle_mm_per_year,
                                                model.ventricle_max_mm),
            cortex_thinning=_aging_effect(older, model.cortex_per_year, model.cortex_max)))
    orientation = (ODD_ORIENTATIONS[((k + 1) // 5 - 1) % len(ODD_ORIENTATIONS)]
                   if (k + 1) % 5 == 0 else ("R", "A", "S"))
    return _Subject(index=k, participant_id=f"sub-{k + 1:03d}", sex=sex, group=group,
                    aging_rate=rate, head_scale=head_scale, rotation_deg=rotation,
                    translation_mm=translation, deformation=deformation, bias=bias,
                    noise_sd=noise_sd, orientation=orientation, sessions=sessions)


# ----------------------------------------------------------------------------- anatomy

@dataclass(frozen=True)
class _Template:
    """The MNI152 template on its 2 mm grid, prefiltered for one output voxel size."""

    t1: np.ndarray                # (X, Y, Z) float32, image units, prefiltered
    thinning: np.ndarray          # (X, Y, Z) signal lost at full cortical thinning, prefiltered
    support: np.ndarray           # (X, Y, Z) bool: where the template can be non-zero
    ventricles: np.ndarray        # (X, Y, Z) bool: lateral ventricles
    ventricle_distance: np.ndarray   # (X, Y, Z) float32 mm to the nearest ventricle voxel
    ventricle_nearest: np.ndarray    # (3, X, Y, Z) int16 index of that voxel
    affine: np.ndarray            # template voxel -> mm
    spacing_mm: float
    center_mm: np.ndarray         # brain centroid, mm
    out_shape: tuple
    out_affine: np.ndarray        # output voxel (RAS) -> mm


_NILEARN_FILES = {"t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
                  "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz"}


def _nilearn_file(key: str) -> Path:
    """Path of a template file inside nilearn's wheel. Found without importing nilearn (which
    takes ~3 s); falls back to its public MNI152_FILE_PATH / GM_MNI152_FILE_PATH constants."""
    import importlib.util

    spec = importlib.util.find_spec("nilearn")
    for location in (spec.submodule_search_locations or []) if spec else []:
        path = Path(location) / "datasets" / "data" / _NILEARN_FILES[key]
        if path.is_file():
            return path
    from nilearn import datasets

    return Path({"t1": datasets.MNI152_FILE_PATH, "gm": datasets.GM_MNI152_FILE_PATH}[key])


@lru_cache(maxsize=1)
def _mni152():
    """Template (0..1), GM probability and brain mask on nilearn's 2 mm MNI152 grid.

    Identical to nilearn.datasets.load_mni152_template / _gm_template / _brain_mask with
    resolution=2 (their resampling lands exactly on every second 1 mm voxel), but ~40x faster."""
    import nibabel as nib

    maps = {}
    for key in ("t1", "gm"):
        img = nib.load(_nilearn_file(key))
        if not np.allclose(img.affine[:3, :3], np.eye(3)):
            raise RuntimeError(f"synth: expected nilearn's 1 mm RAS template, got {img.affine}")
        data = np.asarray(img.dataobj, dtype=np.float32)
        maps[key] = data[::2, ::2, ::2] / data.max()
    affine = np.array(img.affine, dtype=np.float64)
    affine[:3, :3] *= 2.0
    mask = maps["t1"] > 0.2                 # nilearn's load_mni152_brain_mask threshold
    return maps["t1"], maps["gm"], mask, affine


def _lateral_ventricles(t1: np.ndarray, mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """The two lateral ventricles: the largest dark components left and right of the midline
    in a central box, deep inside the brain."""
    from scipy import ndimage as ndi

    mm = np.einsum("ij,j...->i...", affine[:3, :3], np.indices(t1.shape, dtype=np.float32))
    mm += affine[:3, 3, None, None, None]
    box = ((np.abs(mm[0]) < 35) & (mm[1] > -50) & (mm[1] < 35) & (mm[2] > -5) & (mm[2] < 35))
    dark = (t1 < 0.4) & box & ndi.binary_erosion(mask, iterations=4)
    labels, n = ndi.label(dark)
    index = np.arange(1, n + 1)
    sizes = ndi.sum(dark, labels, index)
    x_mm = affine[0, :3] @ np.array(ndi.center_of_mass(dark, labels, index)).T + affine[0, 3]
    ventricles = np.zeros_like(dark)
    for side in (-1, 1):
        best = [(size, label) for size, label, x in zip(sizes, index, x_mm) if side * x > 5]
        if not best or max(best)[0] < 100:
            raise RuntimeError("synth: could not find the lateral ventricles in nilearn's MNI152 "
                               "template; has the template changed?")
        ventricles |= labels == max(best)[1]
    return ventricles


@lru_cache(maxsize=1)
def _anatomy() -> dict:
    """Everything derived from the template on its own grid (shared by every voxel size)."""
    from scipy import ndimage as ndi

    t1, gm, mask, affine = _mni152()
    spacing = float(affine[0, 0])
    if not np.allclose(affine[:3, :3], np.eye(3) * spacing):
        raise RuntimeError(f"synth: expected an isotropic RAS template, got affine {affine}")
    ventricles = _lateral_ventricles(t1, mask, affine)
    distance, nearest = ndi.distance_transform_edt(~ventricles, sampling=spacing,
                                                   return_indices=True)
    # Cortical thinning takes signal from GM next to the CSF outside the ventricles (sulci and
    # the brain's surface): the outer layer of the ribbon darkens first, i.e. the cortex thins.
    outside = ~mask | ((t1 < 0.4) & ~ndi.binary_dilation(ventricles, iterations=3))
    near_outside = np.clip(2.0 * ndi.gaussian_filter(outside.astype(np.float32), 1.0), 0, 1)
    csf_level = float(np.median(t1[ventricles]))
    thinning = gm * near_outside * np.clip(t1 - csf_level, 0, None)
    # Uniform CSF inside the ventricles, so the tissue their growth replaces becomes CSF,
    # not a copy of the partial-volume voxels at their edge.
    t1 = np.where(ventricles, np.float32(csf_level), t1)
    return {"t1": (t1 * INTENSITY_SCALE).astype(np.float32),
            "thinning": (thinning * INTENSITY_SCALE).astype(np.float32),
            "mask": mask, "ventricles": ventricles,
            "ventricle_distance": distance.astype(np.float32),
            "ventricle_nearest": nearest.astype(np.int16), "affine": affine, "spacing": spacing,
            "center_mm": affine[:3, :3] @ np.array(ndi.center_of_mass(mask)) + affine[:3, 3]}


@lru_cache(maxsize=4)
def _template(voxel_size_mm: float) -> _Template:
    from scipy import ndimage as ndi

    anatomy = _anatomy()
    t1, thinning, affine, spacing = (anatomy[k] for k in ("t1", "thinning", "affine", "spacing"))
    # Anti-aliasing before sampling a coarser grid (sigma = (factor - 1) / 2 voxels).
    sigma = max(0.0, (voxel_size_mm / spacing - 1.0) / 2.0)
    if sigma > 0:
        t1 = ndi.gaussian_filter(t1, sigma)
        thinning = ndi.gaussian_filter(thinning, sigma)
    support = ndi.binary_dilation(anatomy["mask"], iterations=2 + int(math.ceil(2 * sigma)))

    # The output grid covers the template's field of view, centred on it.
    fov_mm = np.array(t1.shape) * spacing
    out_shape = tuple(max(1, int(s / voxel_size_mm + 0.5)) for s in fov_mm)
    grid_center = affine[:3, :3] @ ((np.array(t1.shape) - 1) / 2) + affine[:3, 3]
    out_affine = np.eye(4)
    out_affine[:3, :3] *= voxel_size_mm
    out_affine[:3, 3] = grid_center - (np.array(out_shape) - 1) / 2 * voxel_size_mm
    return _Template(t1=t1, thinning=thinning, support=support,
                     ventricles=anatomy["ventricles"],
                     ventricle_distance=anatomy["ventricle_distance"],
                     ventricle_nearest=anatomy["ventricle_nearest"], affine=affine,
                     spacing_mm=spacing, center_mm=anatomy["center_mm"], out_shape=out_shape,
                     out_affine=out_affine)


def _rotation(degrees: np.ndarray) -> np.ndarray:
    a, b, c = np.deg2rad(degrees)
    rx = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    ry = np.array([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    rz = np.array([[math.cos(c), -math.sin(c), 0], [math.sin(c), math.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _separable_field(coefficients: np.ndarray, bases: list[np.ndarray]) -> np.ndarray:
    """sum_abc C[a,b,c] Bx[i,a] By[j,b] Bz[k,c] as a float32 (X, Y, Z) array."""
    return np.einsum("abc,ia,jb,kc->ijk", coefficients.astype(np.float32),
                     *(b.astype(np.float32) for b in bases), optimize=True)


def _output_axes_mm(tpl: _Template) -> list[np.ndarray]:
    return [tpl.out_affine[i, 3] + tpl.out_affine[i, i] * np.arange(n)
            for i, n in enumerate(tpl.out_shape)]


@dataclass
class _SubjectWarp:
    """Where each output voxel of one subject samples the template (template voxel units)."""

    points: np.ndarray        # (M,) flat indices of the output voxels inside the support
    voxels: tuple             # their (x, y, z) output voxel indices, int32
    coords: np.ndarray        # (3, M) float32 template voxel coordinates
    near: np.ndarray          # (V,) positions (into points) within reach of the ventricles
    to_ventricle: np.ndarray  # (3, V) float32 vector to the nearest ventricle voxel (voxels)
    distance_mm: np.ndarray   # (V,) float32 its length in mm


def _subject_warp(subject: _Subject, tpl: _Template, model: AgingModel) -> _SubjectWarp:
    """Output voxel -> template: global scale, rotation and translation about the brain's
    centre, plus a smooth random deformation (a low-pass, Gaussian-spectrum random field)."""
    axes = _output_axes_mm(tpl)
    lengths = [a[-1] - a[0] + tpl.out_affine[i, i] for i, a in enumerate(axes)]
    modes = np.arange(model.deformation_modes)
    bases = [np.cos(np.pi * np.outer(a - a[0], modes) / length) for a, length in zip(axes, lengths)]
    a, b, c = np.meshgrid(modes, modes, modes, indexing="ij")
    spectrum = np.exp(-(a**2 + b**2 + c**2) / (2 * model.deformation_smoothness**2))
    spectrum[0, 0, 0] = 0.0                                  # translation is drawn separately
    mean_square = np.sum(spectrum**2 * 0.5 ** ((a > 0) + (b > 0) + (c > 0)))
    amplitude = model.deformation_rms_mm / math.sqrt(mean_square)

    # voxel = inv(A) @ (center + R (y - center) / s + t + u(y)); the affine part is separable
    # over the output axes and u is linear in its coefficients, so inv(A) folds into them.
    inv = np.linalg.inv(tpl.affine)
    linear = inv[:3, :3] @ _rotation(subject.rotation_deg) / subject.head_scale
    offset = inv[:3, :3] @ (tpl.center_mm + subject.translation_mm) + inv[:3, 3]
    rel = [ax - cen for ax, cen in zip(axes, tpl.center_mm)]
    coefficients = np.einsum("ij,j...->i...", inv[:3, :3] * amplitude,
                             subject.deformation * spectrum)
    coords = np.empty((3,) + tpl.out_shape, dtype=np.float32)
    for i in range(3):
        along = [(linear[i, j] * rel[j] + (offset[i] if j == 0 else 0.0)).astype(np.float32)
                 for j in range(3)]
        coords[i] = _separable_field(coefficients[i], bases)
        coords[i] += along[0][:, None, None]
        coords[i] += along[1][None, :, None]
        coords[i] += along[2][None, None, :]
    coords = coords.reshape(3, -1)

    # Keep the output voxels whose nearest template voxel lies in the support; a one-voxel
    # false border around the support's lookup table makes every clipped index valid.
    lookup = np.pad(tpl.support, 1).ravel()
    padded_shape = np.array(tpl.support.shape) + 2
    flat = np.zeros(coords.shape[1], dtype=np.int32)
    for i in range(3):
        index = np.rint(coords[i]).astype(np.int32)
        index += 1
        np.clip(index, 0, padded_shape[i] - 1, out=index)
        flat *= padded_shape[i]
        flat += index
    points = np.flatnonzero(lookup[flat])
    coords = coords[:, points]
    voxel = tuple(np.rint(coords).astype(np.intp))
    near = np.flatnonzero(tpl.ventricle_distance[voxel] < model.ventricle_reach_mm)
    near_voxel = tuple(v[near] for v in voxel)
    to_ventricle = (tpl.ventricle_nearest[(slice(None),) + near_voxel].astype(np.float32)
                    - coords[:, near])
    distance = np.sqrt(np.sum(to_ventricle**2, axis=0)) * tpl.spacing_mm
    voxels = tuple(v.astype(np.int32) for v in np.unravel_index(points, tpl.out_shape))
    return _SubjectWarp(points=points, voxels=voxels, coords=coords, near=near,
                        to_ventricle=to_ventricle, distance_mm=distance.astype(np.float32))


def _ventricle_pull(session: _Session, warp: _SubjectWarp, model: AgingModel) -> np.ndarray:
    """Fraction of the way to the nearest ventricle voxel each nearby output voxel samples.

    Push m(d) = D (1 - d/R)^2 (zero beyond R) and sample at d - m(d), never past the wall:
    the walls move out by exactly d* = ventricle_dilation_mm (D solves d* = m(d*)), the
    tissue within R is squeezed, and d - m(d) increases with d so nothing folds."""
    d_star, reach = session.ventricle_dilation_mm, model.ventricle_reach_mm
    push_at_wall = d_star / (1.0 - d_star / reach) ** 2
    d = warp.distance_mm
    push = push_at_wall * np.clip(1.0 - d / reach, 0.0, None) ** 2
    return np.where(push >= d, 1.0, push / np.maximum(d, 1e-6)).astype(np.float32)


def _bias_field(coefficients: np.ndarray, tpl: _Template, warp: _SubjectWarp) -> np.ndarray:
    """exp(quadratic polynomial in x, y, z) at the warp's points: a smooth multiplicative
    intensity inhomogeneity."""
    bases = [np.stack([np.ones(n), np.linspace(-1, 1, n), np.linspace(-1, 1, n) ** 2 - 1 / 3], 1)
             for n in tpl.out_shape]
    a, b, c = np.meshgrid(range(3), range(3), range(3), indexing="ij")
    coefficients = np.where(a + b + c <= 2, coefficients, 0.0)
    in_plane = np.einsum("abc,ia,jb->ijc", coefficients, bases[0], bases[1]).astype(np.float32)
    x, y, z = warp.voxels
    along_z = bases[2].astype(np.float32)
    log_bias = in_plane[x, y, 0] * along_z[z, 0]
    for k in (1, 2):
        log_bias += in_plane[x, y, k] * along_z[z, k]
    return np.exp(log_bias)


def _render_scan(subject: _Subject, session: _Session, warp: _SubjectWarp, tpl: _Template,
                 model: AgingModel, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """One scan in RAS on the output grid (float32 image units) and its true ventricle volume.

    Skull-stripped like the template (and LSOR's preprocessed inputs): zero outside the
    warped brain mask dilated by ~4 mm, bias field and Rician noise inside it."""
    from scipy import ndimage as ndi

    aged = tpl.t1 - np.float32(session.cortex_thinning) * tpl.thinning
    coords = warp.coords.copy()
    pull = _ventricle_pull(session, warp, model)
    coords[:, warp.near] += pull * warp.to_ventricle
    signal = ndi.map_coordinates(aged, coords, order=1, mode="constant", cval=0.0,
                                 prefilter=False, output=np.float32)
    near_voxel = tuple(np.clip(np.rint(coords[:, warp.near]).astype(np.int64), 0,
                               np.array(tpl.t1.shape)[:, None] - 1))
    ventricle_ml = (np.count_nonzero(tpl.ventricles[near_voxel])
                    * float(np.prod(np.diag(tpl.out_affine)[:3])) / 1000.0)

    bias = subject.bias + rng.normal(0.0, model.bias_scan_sd, subject.bias.shape)
    signal *= _bias_field(bias, tpl, warp)
    jitter = model.noise_scan_jitter
    sigma = np.float32(subject.noise_sd * rng.uniform(1 - jitter, 1 + jitter))
    noise = rng.standard_normal((2, signal.size), dtype=np.float32)
    noise *= sigma
    signal += noise[0]
    image = np.zeros(int(np.prod(tpl.out_shape)), dtype=np.float32)
    image[warp.points] = np.hypot(signal, noise[1])              # Rician magnitude
    return image.reshape(tpl.out_shape), ventricle_ml


def _write_nifti(path: Path, image: np.ndarray, tpl: _Template, orientation: tuple) -> None:
    import nibabel as nib
    from nibabel import orientations as ornt

    stored = np.clip(np.rint(image / SCALE_SLOPE), 0, np.iinfo(np.int16).max).astype(np.int16)
    affine = tpl.out_affine
    if orientation != ("R", "A", "S"):
        transform = ornt.ornt_transform(ornt.io_orientation(affine), ornt.axcodes2ornt(orientation))
        affine = affine @ ornt.inv_ornt_aff(transform, stored.shape)
        stored = np.ascontiguousarray(ornt.apply_orientation(stored, transform))
    img = nib.Nifti1Image(stored, affine)
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    img.header.set_slope_inter(SCALE_SLOPE, 0.0)
    img.header["descrip"] = b"hpcbrain synth"
    nib.save(img, str(path))


# ----------------------------------------------------------------------------- files

def _tsv(path: Path, columns: list[str], rows: list[list]) -> None:
    def cell(value) -> str:
        return f"{value:.2f}" if isinstance(value, float) else str(value)

    lines = ["\t".join(columns)] + ["\t".join(cell(v) for v in row) for row in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("hpcbrain")
    except Exception:  # not installed: the version is cosmetic here
        return "unknown"


def _write_tables(root: Path, subjects: list[_Subject], seed: int, voxel_size_mm: float,
                  model: AgingModel, ventricle_ml: dict) -> None:
    """Everything but the images; the marker (synth_parameters.json) is written last."""
    generated_by = [{"Name": "hpcbrain", "Version": _version(),
                     "Description": f"hpcbrain synth: synthetic longitudinal cohort, seed={seed}, "
                                    f"n_subjects={len(subjects)}, voxel_size_mm={voxel_size_mm:g}"}]
    _json(root / "dataset_description.json", {
        "Name": f"hpcbrain synthetic longitudinal cohort (seed {seed})",
        "BIDSVersion": BIDS_VERSION, "DatasetType": "raw",
        "GeneratedBy": generated_by})
    (root / "README").write_text(
        "Synthetic longitudinal T1w cohort made by `hpcbrain synth` (hpcbrain.data.synth).\n"
        "Ground truth (latent brain age per session) is in derivatives/synth/brain_age.tsv.\n"
        "Model and parameters: docs/synthetic-cohort.md in hpcbrain and "
        "derivatives/synth/synth_parameters.json.\n", encoding="utf-8")
    _tsv(root / "participants.tsv", ["participant_id", "sex", "group"],
         [[s.participant_id, s.sex, s.group] for s in subjects])
    _json(root / "participants.json", {
        "sex": {"Description": "sex", "Levels": {"M": "male", "F": "female"}},
        "group": {"Description": "clinical group over the whole follow-up",
                  "Levels": {"NC": "normal control", "sMCI": "stable MCI",
                             "pMCI": "MCI converting to AD during follow-up",
                             "AD": "Alzheimer's disease"}}})
    sessions_sidecar = {
        "age": {"Description": "age at the scan", "Units": "year"},
        "diagnosis": {"Description": "diagnosis at the visit",
                      "Levels": {"CN": "cognitively normal", "MCI": "mild cognitive impairment",
                                 "AD": "Alzheimer's disease"}},
        "adas_cog": {"Description": "ADAS-Cog score (0-70, higher is worse)"}}
    for s in subjects:
        _tsv(root / s.participant_id / f"{s.participant_id}_sessions.tsv",
             ["session_id", "age", "diagnosis", "adas_cog"],
             [[v.session_id, v.age, v.diagnosis, v.adas_cog] for v in s.sessions])
        _json(root / s.participant_id / f"{s.participant_id}_sessions.json", sessions_sidecar)

    truth = root / "derivatives" / "synth"
    truth.mkdir(parents=True, exist_ok=True)
    _json(truth / "dataset_description.json", {
        "Name": "hpcbrain synth ground truth", "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative", "GeneratedBy": generated_by})
    columns = ["participant_id", "session_id", "group", "age", "brain_age", "brain_age_gap",
               "aging_rate", "ventricle_dilation_mm", "ventricle_volume_ml", "cortex_thinning",
               "head_scale", "orientation"]
    rows = [[s.participant_id, v.session_id, s.group, v.age, v.brain_age, v.brain_age - v.age,
             s.aging_rate, v.ventricle_dilation_mm, ventricle_ml[s.participant_id, v.session_id],
             f"{v.cortex_thinning:.4f}", s.head_scale, "".join(s.orientation)]
            for s in subjects for v in s.sessions]
    _tsv(truth / "brain_age.tsv", columns, rows)
    _json(truth / "brain_age.json", {
        "brain_age": {"Description": "latent brain age the images were made with: baseline age "
                                     "+ baseline gap + aging_rate * (age - baseline age)",
                      "Units": "year"},
        "brain_age_gap": {"Description": "brain_age - age", "Units": "year"},
        "aging_rate": {"Description": "brain-years per calendar year of this subject"},
        "ventricle_dilation_mm": {"Description": "outward shift of the lateral ventricles' "
                                                 "walls relative to the template", "Units": "mm"},
        "ventricle_volume_ml": {"Description": "lateral ventricle volume in the image (output "
                                               "voxels sampling the template's ventricles)",
                                "Units": "mL"},
        "cortex_thinning": {"Description": "fraction of the outer cortical GM signal removed"},
        "head_scale": {"Description": "global size of the subject relative to the template"},
        "orientation": {"Description": "voxel axis codes the T1w image is stored in"}})
    parameters = {"generator": "hpcbrain.data.synth", "version": _version(), "seed": seed,
                  "n_subjects": len(subjects), "voxel_size_mm": voxel_size_mm,
                  "scale_slope": SCALE_SLOPE, "intensity_scale": INTENSITY_SCALE,
                  "template": "MNI152 2009 (nilearn, 2 mm)", "model": asdict(model)}
    _json(root / MARKER, parameters)


def _is_synth_output(path: Path) -> bool:
    try:
        return json.loads((path / MARKER).read_text())["generator"] == "hpcbrain.data.synth"
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _check_out_dir(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"synth: {out_dir} exists and is not a folder; choose another --out")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not _is_synth_output(out_dir):
        raise ValueError(
            f"synth: {out_dir} is not empty and is not a previous `hpcbrain synth` output "
            f"(no {MARKER}); refusing to overwrite it. Choose a new or empty folder for --out, "
            f"or delete {out_dir} yourself if you really mean to replace it.")


def _publish(tmp: Path, out_dir: Path) -> None:
    """Move the finished dataset to its final name; a previous synth output is replaced."""
    if out_dir.is_dir() and any(out_dir.iterdir()):
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.synth-old-", dir=out_dir.parent))
        os.replace(out_dir, old / "dataset")
        try:
            os.replace(tmp, out_dir)
        except BaseException:
            os.replace(old / "dataset", out_dir)     # put the previous output back
            raise
        finally:
            if out_dir.is_dir():                     # never delete the only copy
                shutil.rmtree(old, ignore_errors=True)
    else:
        if out_dir.is_dir():
            out_dir.rmdir()
        os.replace(tmp, out_dir)


# ----------------------------------------------------------------------------- entry point

def synthesize_cohort(out_dir: str | Path, n_subjects: int, seed: int = 0, *,
                      voxel_size_mm: float = 2.0, progress: bool = True,
                      preset: str = "registered", age_distribution: str = "normal",
                      age_range: tuple[float, float] | None = None,
                      brain_age_gap_sd: float | None = None,
                      learnability: bool = True) -> SynthSummary:
    """Write a synthetic longitudinal BIDS cohort of `n_subjects` to `out_dir`.

    `preset`, `age_distribution`, `age_range` and `brain_age_gap_sd` choose the generative model
    (`aging_model`). With `learnability` (and at least MIN_SUBJECTS_FOR_REPORT = 10 subjects)
    the cohort's learnability report -- constant predictor, subject-grouped ridge on the 32³
    voxels, oracle -- goes to derivatives/synth/learnability.json (`hpcbrain.data.learnability`).

    Refuses (ValueError) a non-empty `out_dir` that is not a previous synth output, and replaces
    one that is. The dataset is built in a hidden sibling folder and renamed at the end, so an
    interrupted run never leaves a partial dataset under `out_dir`."""
    started = time.perf_counter()
    if isinstance(n_subjects, bool) or not isinstance(n_subjects, (int, np.integer)) \
            or n_subjects < 1:
        raise ValueError(f"synth: n_subjects must be a positive integer, got {n_subjects!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"synth: seed must be a non-negative integer, got {seed!r}")
    voxel_size_mm = float(voxel_size_mm)
    if not 1.0 <= voxel_size_mm <= 16.0:
        raise ValueError(f"synth: voxel_size_mm must be within [1, 16] mm, got {voxel_size_mm}")
    n_subjects, seed = int(n_subjects), int(seed)
    out_dir = Path(out_dir).expanduser().absolute()
    _check_out_dir(out_dir)

    from tqdm.auto import tqdm

    from hpcbrain.data.preprocess import preprocess_array
    from hpcbrain.data.learnability import cohort_learnability

    model = aging_model(preset, age_distribution=age_distribution, age_range=age_range,
                        brain_age_gap_sd=brain_age_gap_sd)
    subjects = [_plan_subject(k, g, seed, model) for k, g in enumerate(assign_groups(n_subjects))]
    n_scans = sum(len(s.sessions) for s in subjects)
    tpl = _template(voxel_size_mm)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.synth-tmp-", dir=out_dir.parent))
    tmp.chmod(0o755)          # mkdtemp makes it private; the dataset is meant to be shared
    try:
        ventricle_ml = {}
        want_report = learnability and n_subjects >= MIN_SUBJECTS_FOR_REPORT
        report_volumes, report_rows = [], []
        with tqdm(total=n_scans, desc="synth", unit="scan", disable=not progress) as bar:
            for s in subjects:
                warp = _subject_warp(s, tpl, model)
                for v, session in enumerate(s.sessions):
                    rng = np.random.default_rng(
                        np.random.SeedSequence(seed, spawn_key=(s.index, v + 1)))
                    image, ventricle_ml[s.participant_id, session.session_id] = _render_scan(
                        s, session, warp, tpl, model, rng)
                    anat = tmp / s.participant_id / session.session_id / "anat"
                    anat.mkdir(parents=True)
                    name = f"{s.participant_id}_{session.session_id}_T1w.nii.gz"
                    _write_nifti(anat / name, image, tpl, s.orientation)
                    if want_report:
                        report_volumes.append(preprocess_array(image, (voxel_size_mm,) * 3,
                                                               REPORT_SIZE)[0].ravel())
                        report_rows.append((s.index, session.age, session.brain_age))
                    bar.update()
        report = None
        if want_report:
            subject_ids, ages, brain_ages = (np.array(c) for c in zip(*report_rows))
            report = cohort_learnability(np.stack(report_volumes), ages, brain_ages,
                                         subject_ids, seed=seed)
            report.update(preset=preset, age_distribution=age_distribution,
                          input_size=REPORT_SIZE)
            (tmp / LEARNABILITY).parent.mkdir(parents=True, exist_ok=True)
            _json(tmp / LEARNABILITY, report)
        _write_tables(tmp, subjects, seed, voxel_size_mm, model, ventricle_ml)
        _check_out_dir(out_dir)       # it may have filled up while we worked
        _publish(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    counts = {g: sum(s.group == g for s in subjects) for g in GROUPS}
    return SynthSummary(out_dir=out_dir, n_subjects=n_subjects, n_scans=n_scans, seed=seed,
                        voxel_size_mm=voxel_size_mm, shape=tpl.out_shape, group_counts=counts,
                        elapsed_s=time.perf_counter() - started, preset=preset,
                        learnability=report)
