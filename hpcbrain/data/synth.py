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
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from hpcbrain.data.synth_anatomy import SCALE_SLOPE, load_template, render_scan, subject_warp, write_nifti
from hpcbrain.data.synth_subjects import (
    AGE_DISTRIBUTIONS,
    GROUPS,
    INTENSITY_SCALE,
    LSOR_GROUP_COUNTS,
    PRESETS,
    AgingModel,
    SubjectPlan,
    aging_model,
    assign_groups,
    plan_subject,
)

__all__ = ["SynthSummary", "AgingModel", "aging_model", "assign_groups", "synthesize_cohort",
           "MARKER", "PRESETS", "AGE_DISTRIBUTIONS", "LSOR_GROUP_COUNTS", "LEARNABILITY",
           "SCALE_SLOPE"]

# Written last into derivatives/synth/: its presence marks a folder as a complete synth output.
MARKER = Path("derivatives") / "synth" / "synth_parameters.json"
# How well age can be predicted from the images, measured on the cohort just written.
LEARNABILITY = Path("derivatives") / "synth" / "learnability.json"
# The learnability report scores the volumes as `hpcbrain convert --shape 32` stores them, and
# needs enough subjects for a 5-fold subject-grouped cross-validation.
REPORT_SIZE = 32
MIN_SUBJECTS_FOR_REPORT = 10
BIDS_VERSION = "1.9.0"


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


def _write_tables(root: Path, subjects: list[SubjectPlan], seed: int, voxel_size_mm: float,
                  model: AgingModel, ventricle_ml: dict, rescans: int = 0) -> None:
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
                  "rescans": rescans,
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


def _rescan(subject: SubjectPlan, session, tpl, model: AgingModel, seed: int, visit: int,
            run: int) -> np.ndarray:
    """Run `run` (≥ 2) of one visit: the visit's anatomy (brain age, ventricles, cortex) with
    its own noise, bias-field change and residual pose (the subject's pose plus a fresh draw at
    the preset's pose sd: a head placed again in the scanner, then registered). Its random
    stream is its own, so rescans never move the run-1 images or one another."""
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(subject.index,
                                                                         visit + 1, run)))
    placed = replace(subject,
                     rotation_deg=subject.rotation_deg + rng.normal(0.0, model.rotation_sd_deg, 3),
                     translation_mm=subject.translation_mm
                     + rng.normal(0.0, model.translation_sd_mm, 3))
    return render_scan(placed, session, subject_warp(placed, tpl, model), tpl, model, rng)[0]


# ----------------------------------------------------------------------------- entry point

def synthesize_cohort(out_dir: str | Path, n_subjects: int, seed: int = 0, *,
                      voxel_size_mm: float = 2.0, progress: bool = True,
                      preset: str = "registered", age_distribution: str = "normal",
                      age_range: tuple[float, float] | None = None,
                      brain_age_gap_sd: float | None = None,
                      learnability: bool = True, rescans: int = 0) -> SynthSummary:
    """Write a synthetic longitudinal BIDS cohort of `n_subjects` to `out_dir`.

    `preset`, `age_distribution`, `age_range` and `brain_age_gap_sd` choose the generative model
    (`aging_model`). `rescans` K > 0: every visit is scanned K + 1 times, as BIDS runs
    (``run-1`` the visit's scan, ``run-2`` … its repeats: same anatomy, independent noise, bias
    field and residual pose), the test–retest data of reliability studies. With `learnability`
    (and at least MIN_SUBJECTS_FOR_REPORT = 10 subjects) the cohort's learnability report --
    constant predictor, subject-grouped ridge on the 32³ voxels, oracle -- goes to
    derivatives/synth/learnability.json (`hpcbrain.data.learnability`); it scores run-1 only.

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
    if isinstance(rescans, bool) or not isinstance(rescans, (int, np.integer)) or rescans < 0:
        raise ValueError(f"synth: rescans must be a non-negative integer, got {rescans!r}")
    rescans = int(rescans)
    out_dir = Path(out_dir).expanduser().absolute()
    _check_out_dir(out_dir)

    from tqdm.auto import tqdm

    from hpcbrain.data.learnability import cohort_learnability
    from hpcbrain.data.preprocess import preprocess_array

    model = aging_model(preset, age_distribution=age_distribution, age_range=age_range,
                        brain_age_gap_sd=brain_age_gap_sd)
    subjects = [plan_subject(k, g, seed, model) for k, g in enumerate(assign_groups(n_subjects))]
    n_scans = sum(len(s.sessions) for s in subjects)
    tpl = load_template(voxel_size_mm)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.synth-tmp-", dir=out_dir.parent))
    tmp.chmod(0o755)          # mkdtemp makes it private; the dataset is meant to be shared
    try:
        ventricle_ml = {}
        want_report = learnability and n_subjects >= MIN_SUBJECTS_FOR_REPORT
        report_volumes, report_rows = [], []
        with tqdm(total=n_scans * (1 + rescans), desc="synth", unit="scan",
                  disable=not progress) as bar:
            for s in subjects:
                warp = subject_warp(s, tpl, model)
                for v, session in enumerate(s.sessions):
                    rng = np.random.default_rng(
                        np.random.SeedSequence(seed, spawn_key=(s.index, v + 1)))
                    image, ventricle_ml[s.participant_id, session.session_id] = render_scan(
                        s, session, warp, tpl, model, rng)
                    anat = tmp / s.participant_id / session.session_id / "anat"
                    anat.mkdir(parents=True)
                    stem = f"{s.participant_id}_{session.session_id}"
                    write_nifti(anat / (f"{stem}_run-1_T1w.nii.gz" if rescans
                                        else f"{stem}_T1w.nii.gz"), image, tpl, s.orientation)
                    if want_report:
                        report_volumes.append(preprocess_array(image, (voxel_size_mm,) * 3,
                                                               REPORT_SIZE)[0].ravel())
                        report_rows.append((s.index, session.age, session.brain_age))
                    bar.update()
                    for run in range(2, rescans + 2):
                        rescan = _rescan(s, session, tpl, model, seed, v, run)
                        write_nifti(anat / f"{stem}_run-{run}_T1w.nii.gz", rescan, tpl,
                                    s.orientation)
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
        _write_tables(tmp, subjects, seed, voxel_size_mm, model, ventricle_ml, rescans)
        _check_out_dir(out_dir)       # it may have filled up while we worked
        _publish(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    counts = {g: sum(s.group == g for s in subjects) for g in GROUPS}
    return SynthSummary(out_dir=out_dir, n_subjects=n_subjects, n_scans=n_scans * (1 + rescans),
                        seed=seed,
                        voxel_size_mm=voxel_size_mm, shape=tpl.out_shape, group_counts=counts,
                        elapsed_s=time.perf_counter() - started, preset=preset,
                        learnability=report)
