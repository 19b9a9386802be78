"""NIfTI / BIDS cohorts → a cohort store (see `hpcbrain.data.store` for the layout).

``hpcbrain convert SRC --out STORE.zarr --shape S [--workers K] [--skip-bad]`` calls
`convert_cohort`.

Sources
-------
* **BIDS folder**: ``participants.tsv`` (``participant_id`` + any columns, optional),
  ``sub-*/sub-*_sessions.tsv`` (``session_id``, ``age`` + any columns) and images
  ``sub-*/ses-*/anat/sub-*_ses-*[_entities]_T1w.nii[.gz]``. Scans are ordered by subject then
  session. Session-level values win over participant-level ones of the same name; the
  participant-level column is then kept as ``participant_<name>`` (e.g. a baseline ``age`` in
  participants.tsv becomes ``participant_age``).
  A subject **without session folders** (``sub-X/anat/sub-X_T1w.nii.gz``) has one scan, labelled
  session ``ses-01``; its age comes from participants.tsv's ``age`` column.
  Several T1w images for one subject/session (e.g. two runs) are a *duplicate*: name the one to
  use in a CSV manifest.
* **CSV manifest** (``.csv``; ``.tsv`` is read tab-separated): columns ``path``, ``subject``,
  ``age`` (required), ``session`` (optional, default ``ses-01``), then any columns. Relative paths
  resolve against the manifest's folder. Rows keep the manifest's order.

Every further column becomes a per-scan column: numeric (every non-missing value parses as a
number) → float32 with NaN for missing; otherwise str with ``""`` for missing. Missing means an
empty cell or ``n/a`` / ``NA`` / ``nan`` / ``null`` / ``none`` (any case). Names are sanitised to
``[A-Za-z0-9_.-]``; a name the store reserves gets a prefix (``participant_``, ``session_``,
``extra_``). Always present: ``subject``, ``session``, ``age`` (float32), ``source_path``
(absolute path), ``affine`` (N, 4, 4: the source affine after reorientation to RAS+) and
``voxel_size_mm`` (float32, the output voxel size of each scan; the attribute ``spacing_mm`` is
``[v, v, v]`` when every scan has the same, else null).

Preprocessing (`preprocess_image`, recorded in ``attrs["hpcbrain"]["preprocessing"]``)
---------------------------------------------------------------------------------------
1. ``nibabel.load``; a 4D image whose extra dimensions are all 1 is squeezed to 3D; any other
   4D image (several volumes), a 2D image or a 3D image with a single slice is rejected.
2. Reorientation to RAS+ (``nibabel.as_closest_canonical``); ``get_fdata(dtype=float32)`` (so
   scl_slope / scl_inter are applied). NaN or Inf voxels reject the scan.
3. The field of view is padded, centred, to a cube in mm (side L = the largest extent) and
   resampled to S³ voxels of L/S mm with ``scipy.ndimage.affine_transform`` (order 1), which
   keeps the physical aspect ratio. Along an axis downsampled by a factor f > 1, a Gaussian of
   σ = (f − 1)/2 input voxels is applied first (anti-aliasing, as skimage's resize does).
   Padding takes the image minimum (its background level).
4. Foreground mask: voxels above ``lo + 0.1 (p99 − lo)``, lo = the image minimum, p99 = the 99th
   percentile of voxels above lo. It is a head/brain foreground mask, not a skull strip.
5. z-score with the mean and std of the mask voxels; voxels outside the mask are set to the
   z-scored background level ``(lo − mean)/std`` (uniform, the darkest value: the image keeps its
   natural look and the background carries no noise). A constant image is rejected.
6. Cast to the store's dtype (float16 by default).

Writing: atomic, resumable
--------------------------
The store is written as ``OUT.partial`` next to ``OUT`` and renamed to ``OUT`` only once it is
complete. An existing ``OUT`` is never overwritten: delete it or pass another ``--out``.
The main process writes whole shards (``scans_per_shard`` scans) in scan order and, after each,
records in ``OUT.partial/hpcbrain_progress.json`` how far it got, together with a fingerprint
of the inputs (scan list, file sizes and mtimes, metadata, shape, dtype, scans per shard,
preprocessing version). Rerunning the same command resumes after the last complete shard; a
different fingerprint discards the partial store and starts over (and says so).
With ``workers > 1`` a process pool (``spawn`` context) loads and preprocesses scans; results
are consumed in scan order, so the store is identical for any number of workers. As always with
``spawn``, a script that calls ``convert_cohort(workers > 1)`` needs an
``if __name__ == "__main__":`` guard (the ``hpcbrain`` command has one).

Bad input
---------
By default everything is checked first-to-last (metadata, then every image), and one
`ConversionError` lists every bad scan and why; no store and no ``.partial`` folder is left.
With ``skip_bad=True`` the bad scans are left out (both scans of a duplicate pair), printed, and
recorded in ``attrs["hpcbrain"]["skipped"]``; if nothing is left, it is an error.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from hpcbrain.data.store import (
    ATTRS_KEY,
    IMAGES,
    SCHEMA_VERSION,
    ImageLayout,
    create_images_array,
    write_columns,
)

PREPROCESSING_VERSION = 1
MASK_FRACTION = 0.1
MASK_PERCENTILE = 99.0
PARTIAL_SUFFIX = ".partial"
PROGRESS_FILE = "hpcbrain_progress.json"
DEFAULT_SESSION = "ses-01"
FIXED_COLUMNS = ("subject", "session", "age", "source_path", "affine", "voxel_size_mm")
RESERVED_NAMES = frozenset((IMAGES, *FIXED_COLUMNS))
MISSING_TEXT = frozenset(("", "n/a", "na", "nan", "null", "none"))
_AFFINE = "affine"
_VOXEL = "voxel_size_mm"

PREPROCESSING = {
    "version": PREPROCESSING_VERSION,
    "load": "nibabel.load; 4D images whose extra dimensions are all 1 are squeezed to 3D, "
            "other 4D, 2D and single-slice images are rejected",
    "reorient": "RAS+ (nibabel.as_closest_canonical)",
    "intensity": "get_fdata(dtype=float32): scl_slope/scl_inter applied; NaN/Inf rejected",
    "field_of_view": "padded, centred, to a cube in mm (side = largest extent); padding = "
                     "image minimum",
    "resample": {"function": "scipy.ndimage.affine_transform", "order": 1,
                 "antialias": "gaussian, sigma = (f - 1)/2 input voxels along axes "
                              "downsampled by f > 1"},
    "mask": {"rule": "v > lo + fraction * (p99 - lo); lo = image minimum, p99 = percentile "
                     "of voxels above lo", "fraction": MASK_FRACTION,
             "percentile": MASK_PERCENTILE, "note": "foreground mask, not a skull strip"},
    "normalisation": "z-score with mean/std over mask voxels; outside the mask = "
                     "(lo - mean)/std (z-scored background level)",
}


class ConversionError(ValueError):
    """A conversion cannot proceed; for bad scans the message lists every one and why.

    ``bad`` holds ``(path, subject, session, reason)`` for each bad scan (empty for other
    errors, e.g. an existing output store).
    """

    def __init__(self, message: str, bad: list[tuple[str, str, str, str]] | None = None):
        super().__init__(message)
        self.bad = list(bad or [])


class BadScanError(ValueError):
    """One image cannot be used (unreadable, wrong dimensionality, non-finite, constant)."""


@dataclass
class ConversionReport:
    n_converted: int
    skipped: list[tuple[str, str]]  # (path, reason)
    out: Path
    seconds: float
    resumed_shards: int


@dataclass
class Scan:
    """One scan as discovered from the source, before its image is read."""

    path: Path | None
    subject: str
    session: str
    age: float | None
    meta: dict[str, str | None] = field(default_factory=dict)  # further columns, raw text
    problems: list[str] = field(default_factory=list)


# ============================================================================================
# Discovery: BIDS folder or CSV manifest → list[Scan]
# ============================================================================================
def _is_missing(value: Any) -> bool:
    return value is None or str(value).strip().lower() in MISSING_TEXT


def _clean(value: Any) -> str | None:
    return None if _is_missing(value) else str(value).strip()


def _parse_age(text: str | None, where: str) -> tuple[float | None, str | None]:
    if text is None:
        return None, f"age is missing (empty or n/a) in {where}"
    try:
        age = float(text)
    except ValueError:
        return None, f"age {text!r} in {where} is not a number"
    if not math.isfinite(age):
        return None, f"age {text!r} in {where} is not finite"
    return age, None


def _read_table(path: Path, sep: str = "\t"):
    import pandas as pd

    try:
        table = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False)
    except Exception as exc:
        raise ConversionError(f"cannot read {path}: {exc}") from exc
    table.columns = [str(c).strip() for c in table.columns]
    return table


def _column_name(name: str, prefix: str) -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", name.strip()) or "column"
    if name.startswith(".") or name.startswith("__"):
        name = "col" + name
    return prefix + name if name in RESERVED_NAMES else name


def _label(value: str, prefix: str) -> str:
    value = value.strip()
    return value if value.startswith(prefix) else prefix + value


def _t1w_images(anat: Path, prefix: str) -> list[Path]:
    if not anat.is_dir():
        return []
    return sorted(p for p in anat.glob(f"{prefix}_*T1w.nii*")
                  if p.name.endswith(("_T1w.nii", "_T1w.nii.gz")) and p.is_file())


def _read_bids(root: Path) -> list[Scan]:
    subjects = sorted(d for d in root.glob("sub-*") if d.is_dir())
    if not subjects:
        raise ConversionError(f"{root} holds no sub-* folders: not a BIDS dataset (or pass a "
                              f"CSV manifest with columns path, subject, session, age)")
    participants: dict[str, dict[str, str | None]] = {}
    participant_dups: set[str] = set()
    ptsv = root / "participants.tsv"
    if ptsv.exists():
        table = _read_table(ptsv)
        if "participant_id" not in table.columns:
            raise ConversionError(f"{ptsv} has no participant_id column")
        for row in table.to_dict("records"):
            sub = _label(row.pop("participant_id"), "sub-")
            if sub in participants:
                participant_dups.add(sub)
            participants[sub] = {k: _clean(v) for k, v in row.items()}

    # Read every sessions.tsv first: a name found in any of them wins over participants.tsv.
    sessions: dict[str, dict[str, dict[str, str | None]] | None] = {}
    session_dups: dict[str, set[str]] = {}
    session_names: set[str] = set()
    for subdir in subjects:
        stsv = subdir / f"{subdir.name}_sessions.tsv"
        if not stsv.exists():
            sessions[subdir.name] = None
            continue
        table = _read_table(stsv)
        if "session_id" not in table.columns:
            raise ConversionError(f"{stsv} has no session_id column")
        rows: dict[str, dict[str, str | None]] = {}
        for row in table.to_dict("records"):
            ses = _label(row.pop("session_id"), "ses-")
            if ses in rows:
                session_dups.setdefault(subdir.name, set()).add(ses)
            rows[ses] = {k: _clean(v) for k, v in row.items()}
            session_names.update(k for k in rows[ses] if k != "age")
        sessions[subdir.name] = rows

    def participant_meta(sub: str, sessionless: bool) -> dict[str, str | None]:
        meta = {}
        for key, value in participants.get(sub, {}).items():
            if key == "age" and sessionless:
                continue  # it is the scan's age
            name = _column_name(key, "participant_")  # a reserved name (age) gets the prefix
            if key in session_names and not name.startswith("participant_"):
                name = "participant_" + name  # sessions.tsv has the same name: it wins
            meta[name] = value
        return meta

    scans: list[Scan] = []
    for subdir in subjects:
        sub = subdir.name
        ses_dirs = sorted(d for d in subdir.glob("ses-*") if d.is_dir())
        common = [f"participant {sub} is listed twice in {ptsv}"] if sub in participant_dups \
            else []
        if not ses_dirs:  # a BIDS dataset without sessions: one scan, session ses-01
            where = f"{ptsv} (column age)"
            age_text = participants.get(sub, {}).get("age")
            if not ptsv.exists():
                age, problem = None, f"no {ptsv} to give the age of a session-less subject"
            elif sub not in participants:
                age, problem = None, f"{sub} has no row in {ptsv}"
            else:
                age, problem = _parse_age(age_text, where)
            for image in _t1w_images(subdir / "anat", sub):
                scans.append(Scan(image, sub, DEFAULT_SESSION, age, participant_meta(sub, True),
                                  common + ([problem] if problem else [])))
            continue
        stsv = subdir / f"{sub}_sessions.tsv"
        rows = sessions[sub]
        for ses_dir in ses_dirs:
            ses = ses_dir.name
            images = _t1w_images(ses_dir / "anat", f"{sub}_{ses}")
            if not images:
                continue
            problems = list(common)
            if rows is None:
                age, problem = None, f"no {stsv.name} to give the age"
                row = {}
            elif ses not in rows:
                age, problem = None, f"{ses} has no row in {stsv.name} (age unknown)"
                row = {}
            else:
                row = rows[ses]
                age, problem = _parse_age(row.get("age"), stsv.name)
                if ses in session_dups.get(sub, ()):
                    problems.append(f"{ses} is listed twice in {stsv.name}")
            if problem:
                problems.append(problem)
            meta = participant_meta(sub, False)
            for key, value in row.items():
                if key != "age":
                    meta[_column_name(key, "session_")] = value
            for image in images:
                scans.append(Scan(image, sub, ses, age, dict(meta), list(problems)))
    return scans


def _read_manifest(path: Path) -> list[Scan]:
    table = _read_table(path, sep="\t" if path.suffix.lower() == ".tsv" else ",")
    missing = [c for c in ("path", "subject", "age") if c not in table.columns]
    if missing:
        raise ConversionError(f"manifest {path} lacks columns {missing}; it needs path, "
                              f"subject, session, age (then any columns)")
    scans = []
    for line, row in enumerate(table.to_dict("records"), start=2):
        problems = []
        text = _clean(row.pop("path"))
        image: Path | None = None
        if text is None:
            problems.append(f"manifest line {line}: empty path")
        else:
            image = Path(text).expanduser()
            if not image.is_absolute():
                image = path.parent / image
            image = Path(os.path.abspath(image))
            if not image.is_file():
                problems.append("file does not exist")
        subject = _clean(row.pop("subject"))
        if subject is None:
            problems.append(f"manifest line {line}: empty subject")
        session = _clean(row.pop("session", None)) or DEFAULT_SESSION
        age, problem = _parse_age(_clean(row.pop("age")), f"manifest line {line}")
        if problem:
            problems.append(problem)
        meta = {_column_name(k, "extra_"): _clean(v) for k, v in row.items()}
        scans.append(Scan(image, subject or "", session, age, meta, problems))
    return scans


def discover_scans(source: str | Path) -> tuple[list[Scan], str]:
    """List the scans of a BIDS folder or CSV manifest with their metadata problems.

    Returns ``(scans, format)`` with format ``"bids"`` or ``"manifest"``. Problems found
    without reading images (missing or bad age, missing file, duplicate subject/session) are
    in each scan's ``problems``.
    """
    source = Path(source).expanduser()
    if not source.exists():
        raise ConversionError(f"source {source} does not exist")
    if source.is_dir():
        scans, fmt = _read_bids(source), "bids"
    else:
        scans, fmt = _read_manifest(source), "manifest"
    groups: dict[tuple[str, str], list[int]] = {}
    for i, scan in enumerate(scans):
        if scan.subject:
            groups.setdefault((scan.subject, scan.session), []).append(i)
    for (subject, session), members in groups.items():
        if len(members) > 1:
            for i in members:
                others = ", ".join(str(scans[j].path) for j in members if j != i)
                scans[i].problems.append(
                    f"duplicate subject/session {subject} {session} (also: {others})")
    return scans, fmt


# ============================================================================================
# Images: load, check, preprocess
# ============================================================================================
def _as_3d(img):
    import nibabel as nib

    shape = img.shape
    if len(shape) < 3:
        raise BadScanError(f"{len(shape)}D image of shape {shape}: a T1w scan must be 3D")
    if len(shape) > 3:
        if any(d != 1 for d in shape[3:]):
            raise BadScanError(f"{len(shape)}D image of shape {shape} holds several volumes: "
                               f"a T1w scan must be 3D")
        img = nib.squeeze_image(img)
    if min(img.shape[:3]) < 2:
        raise BadScanError(f"image of shape {img.shape} is a single slice (2D)")
    return img


def preprocess_array(data: np.ndarray, voxel_mm, size: int) -> tuple[np.ndarray, float]:
    """RAS+ float data with voxel sizes `voxel_mm` → (S³ z-scored float32, output voxel mm).

    Steps 3–5 of the module docstring (cube FOV, resample, mask, z-score).
    """
    from scipy import ndimage

    data = np.asarray(data, dtype=np.float32)
    n = np.asarray(data.shape[:3], dtype=np.float64)
    vox = np.asarray(voxel_mm, dtype=np.float64)
    lo = float(data.min())
    if float(data.max()) <= lo:
        raise BadScanError("constant image (no foreground to normalise)")
    side = float((n * vox).max())  # the cube's side in mm
    out_vox = side / size
    scale = out_vox / vox  # input voxels per output voxel, per axis
    sigma = np.maximum(0.0, (scale - 1.0) / 2.0)
    if sigma.max() > 0:
        data = ndimage.gaussian_filter(data, sigma=sigma, mode="constant", cval=lo)
    # output voxel j has its centre at (j + 0.5) out_vox − side/2 mm from the FOV centre; input
    # voxel i at (i + 0.5) vox − n vox/2: i = scale j + offset
    offset = (0.5 * out_vox - side / 2 + n * vox / 2) / vox - 0.5
    out = ndimage.affine_transform(data, scale, offset=offset, output_shape=(size,) * 3,
                                   order=1, mode="constant", cval=lo, prefilter=False)
    above = out[out > lo]
    if above.size == 0:
        raise BadScanError("no foreground after resampling")
    threshold = lo + MASK_FRACTION * (float(np.percentile(above, MASK_PERCENTILE)) - lo)
    mask = out > threshold
    if mask.sum() < 2:
        raise BadScanError("foreground mask is (nearly) empty")
    values = out[mask].astype(np.float64)
    mean, std = float(values.mean()), float(values.std())
    if not std > 0:
        raise BadScanError("constant foreground (std 0)")
    result = np.full(out.shape, (lo - mean) / std, dtype=np.float32)
    result[mask] = ((values - mean) / std).astype(np.float32)
    return result, out_vox


def preprocess_image(img, size: int) -> tuple[np.ndarray, np.ndarray, float]:
    """A nibabel image → (S³ float32 volume, RAS+ affine of the source, output voxel mm).

    The exact preprocessing of the store (use it to embed new scans the same way).
    """
    import nibabel as nib

    img = nib.as_closest_canonical(_as_3d(img))
    try:
        data = img.get_fdata(dtype=np.float32)
    except Exception as exc:
        raise BadScanError(f"cannot read voxel data (truncated or corrupt file?): "
                           f"{type(exc).__name__}: {exc}") from exc
    finite = np.isfinite(data)
    if not finite.all():
        raise BadScanError(f"{int(finite.size - finite.sum())} NaN/Inf voxels")
    voxel_mm = np.sqrt((img.affine[:3, :3] ** 2).sum(axis=0))
    volume, out_vox = preprocess_array(data, voxel_mm, size)
    return volume, np.asarray(img.affine, dtype=np.float64), out_vox


def load_scan(path: str | Path, size: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Load a NIfTI file and preprocess it; raises `BadScanError` saying why it is unusable."""
    import nibabel as nib

    try:
        img = nib.load(str(path))
    except Exception as exc:
        raise BadScanError(f"cannot read image: {type(exc).__name__}: {exc}") from exc
    if not hasattr(img, "affine"):
        raise BadScanError(f"not a spatial image ({type(img).__name__})")
    return preprocess_image(img, size)


def _convert_one(path: str, size: int, dtype: str):
    """Worker task: (volume as dtype, affine, voxel mm, None) or (None, None, None, reason)."""
    try:
        volume, affine, out_vox = load_scan(path, size)
        volume = volume.astype(dtype)
        if not np.isfinite(volume).all():
            raise BadScanError(f"values overflow {dtype}")
        return volume, affine, out_vox, None
    except BadScanError as exc:
        return None, None, None, str(exc)
    except Exception as exc:  # anything else a broken file can trigger
        return None, None, None, f"cannot convert: {type(exc).__name__}: {exc}"


def _results(tasks: list[tuple[int, str]], size: int, dtype: str,
             workers: int) -> Iterator[tuple[int, tuple]]:
    """Yield (index, _convert_one result) in task order, with a process pool if workers > 1."""
    workers = min(workers, len(tasks))
    if workers <= 1:
        for index, path in tasks:
            yield index, _convert_one(path, size, dtype)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    pool = ProcessPoolExecutor(max_workers=workers,
                               mp_context=multiprocessing.get_context("spawn"))
    try:
        pending = deque()
        queue = iter(tasks)
        for index, path in queue:
            pending.append((index, pool.submit(_convert_one, path, size, dtype)))
            if len(pending) >= 3 * workers:
                break
        while pending:
            index, future = pending.popleft()
            try:
                result = future.result()
            except BrokenProcessPool as exc:
                raise RuntimeError(
                    "a conversion worker process died (out of memory? killed? or a script "
                    "calling convert_cohort(workers > 1) without an `if __name__ == "
                    "'__main__':` guard, which worker processes re-run); the partial store is "
                    "kept and rerunning the same command resumes") from exc
            nxt = next(queue, None)
            if nxt is not None:
                pending.append((nxt[0], pool.submit(_convert_one, nxt[1], size, dtype)))
            yield index, result
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# ============================================================================================
# Columns, fingerprint, progress
# ============================================================================================
def _build_columns(scans: list[Scan]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    columns: dict[str, np.ndarray] = {
        "subject": np.array([s.subject for s in scans], dtype=object),
        "session": np.array([s.session for s in scans], dtype=object),
        "age": np.array([s.age for s in scans], dtype=np.float32),
        "source_path": np.array([str(s.path) for s in scans], dtype=object),
    }
    names: list[str] = []
    for scan in scans:
        names.extend(k for k in scan.meta if k not in names)
    for name in names:
        raw = [scan.meta.get(name) for scan in scans]
        try:
            columns[name] = np.array([np.nan if v is None else float(v) for v in raw],
                                     dtype=np.float32)
        except ValueError:
            columns[name] = np.array(["" if v is None else v for v in raw], dtype=object)
    types = {k: ("str" if v.dtype == object else str(v.dtype)) for k, v in columns.items()}
    return columns, types


def _fingerprint(scans: list[Scan], size: int, dtype: str, scans_per_shard: int) -> str:
    items = []
    for scan in scans:
        try:
            stat = scan.path.stat() if scan.path else None
            file = [stat.st_size, stat.st_mtime_ns] if stat else None
        except OSError:
            file = None
        items.append([str(scan.path), file, scan.subject, scan.session, scan.age,
                      sorted(scan.meta.items()), scan.problems])
    blob = json.dumps({"scans": items, "shape": size, "dtype": dtype,
                       "scans_per_shard": scans_per_shard,
                       "preprocessing": PREPROCESSING}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _read_progress(partial: Path, fingerprint: str) -> dict | None:
    """The saved progress of an earlier run with the same inputs, else None (and clean up)."""
    if not partial.exists():
        return None
    try:
        state = json.loads((partial / PROGRESS_FILE).read_text())
        if state.get("fingerprint") == fingerprint:
            return state
        why = "different inputs or settings"
    except (OSError, ValueError):
        why = "no readable progress record"
    print(f"hpcbrain convert: {partial} was left by an earlier conversion ({why}): "
          f"starting over", file=sys.stderr)
    shutil.rmtree(partial)
    return None


def _write_progress(partial: Path, state: dict) -> None:
    tmp = partial / (PROGRESS_FILE + ".tmp")
    tmp.write_text(json.dumps(state))
    os.replace(tmp, partial / PROGRESS_FILE)


def _describe(bad: list[tuple[str, str, str, str]], n_scans: int, header: str = "") -> str:
    lines = [header or f"{len(bad)} of {n_scans} scans are bad; nothing was written "
                       f"(fix them, or pass --skip-bad / skip_bad=True to convert the rest):"]
    lines += [f"  {sub or '?'} {ses or '?'}  {path}: {reason}" for path, sub, ses, reason in bad]
    return "\n".join(lines)


# ============================================================================================
# The conversion
# ============================================================================================
def convert_cohort(source: str | Path, out: str | Path, shape: int, *, workers: int = 1,
                   skip_bad: bool = False, dtype: str = "float16", scans_per_shard: int = 16,
                   progress: bool = True) -> ConversionReport:
    """Convert a BIDS folder or CSV manifest into the cohort store `out` (S³ images)."""
    import zarr
    from tqdm import tqdm

    started = time.perf_counter()
    size = int(shape)
    if size < 2:
        raise ConversionError(f"shape must be at least 2, got {shape}")
    try:
        if np.dtype(dtype).kind != "f":
            raise TypeError
    except TypeError:
        raise ConversionError(f"dtype must be a numpy float type (float16, float32), "
                              f"got {dtype!r}") from None
    dtype = np.dtype(dtype).name
    workers = max(1, int(workers))
    scans_per_shard = max(1, int(scans_per_shard))
    out = Path(os.path.abspath(Path(out).expanduser()))
    source = Path(os.path.abspath(Path(source).expanduser()))
    partial = out.with_name(out.name + PARTIAL_SUFFIX)
    if out.exists():
        raise ConversionError(f"{out} already exists: hpcbrain never overwrites a store; "
                              f"delete it (rm -r {out}) or pass another --out")

    scans, fmt = discover_scans(source)
    if not scans:
        raise ConversionError(f"no T1w images found in {source}")
    fingerprint = _fingerprint(scans, size, dtype, scans_per_shard)
    reasons: dict[int, list[str]] = {i: list(s.problems) for i, s in enumerate(scans)
                                     if s.problems}
    candidates = [i for i in range(len(scans)) if i not in reasons]

    def bad_list() -> list[tuple[str, str, str, str]]:
        return [(str(scans[i].path), scans[i].subject, scans[i].session, "; ".join(r))
                for i, r in sorted(reasons.items())]

    def fail(header: str = "") -> None:
        if partial.exists():
            shutil.rmtree(partial)
        raise ConversionError(_describe(bad_list(), len(scans), header), bad_list())

    nothing_left = f"nothing left to convert: all {len(scans)} scans are bad:"

    if reasons and not skip_bad:
        # Bad metadata: nothing will be written, but still check every image for the report.
        tasks = [(i, str(s.path)) for i, s in enumerate(scans)
                 if s.path is not None and s.path.is_file()]
        bar = tqdm(total=len(tasks), disable=not progress, unit="scan", desc="check")
        for index, (_, _, _, reason) in _results(tasks, size, dtype, workers):
            if reason:
                reasons.setdefault(index, []).append(reason)
            bar.update()
        bar.close()
        fail()
    if not candidates:
        fail(nothing_left)

    per_shard = max(1, min(scans_per_shard, len(candidates)))
    state = _read_progress(partial, fingerprint)
    if state is None:
        state = {"fingerprint": fingerprint, "done": 0, "written": 0, "shards": [], "bad": {}}
    for key, reason in state["bad"].items():
        reasons.setdefault(int(key), []).append(reason)
    resumed_shards = len(state["shards"])
    if resumed_shards:
        print(f"hpcbrain convert: resuming {partial}: {resumed_shards} shard(s), "
              f"{state['written']} scans already written", file=sys.stderr)
    writing = skip_bad or not state["bad"]
    group = images = None

    def open_store():
        nonlocal group, images
        if group is None:
            if partial.exists():
                group = zarr.open_group(str(partial), mode="r+")
                # Shards after the last recorded one are rewritten: drop whatever a killed run
                # left of them (zarr reads an existing shard file before writing into it).
                first = -(-state["written"] // per_shard)  # ceil: a short last shard counts
                for shard_dir in (partial / IMAGES / "c").glob("*"):
                    if shard_dir.name.isdigit() and int(shard_dir.name) >= first:
                        shutil.rmtree(shard_dir)
            else:
                group = zarr.open_group(str(partial), mode="w", zarr_format=3)
                layout = ImageLayout((size,) * 3, dtype=dtype, scans_per_shard=per_shard)
                create_images_array(group, len(candidates), layout)
                group.create_array(_AFFINE, shape=(len(candidates), 4, 4), dtype="float64",
                                   chunks=(max(per_shard, 1024), 4, 4), fill_value=0)
                group.create_array(_VOXEL, shape=(len(candidates),), dtype="float32",
                                   chunks=(max(per_shard, 1024),), fill_value=0)
                _write_progress(partial, state)
            images = group[IMAGES]
        return group

    buffer: list[tuple[int, np.ndarray, np.ndarray, float]] = []
    consumed = state["done"]

    def flush() -> None:
        start = state["written"]
        if not buffer:
            return
        g = open_store()
        stop = start + len(buffer)
        images[start:stop] = np.stack([b[1] for b in buffer])
        g[_AFFINE][start:stop] = np.stack([b[2] for b in buffer])
        g[_VOXEL][start:stop] = np.array([b[3] for b in buffer], dtype=np.float32)
        state["shards"].append(start // per_shard)
        state["written"] = stop
        state["done"] = consumed
        _write_progress(partial, state)
        buffer.clear()

    tasks = [(i, str(scans[i].path)) for i in candidates[state["done"]:]]
    bar = tqdm(total=len(candidates), initial=state["done"], disable=not progress,
               unit="scan", desc=f"convert {out.name}")
    try:
        for index, (volume, affine, out_vox, reason) in _results(tasks, size, dtype, workers):
            consumed += 1
            if reason:
                reasons.setdefault(index, []).append(reason)
                state["bad"][str(index)] = reason
                writing = writing and skip_bad
            elif writing:
                buffer.append((index, volume, affine, out_vox))
                if len(buffer) == per_shard:
                    flush()
            bar.update()
        if writing:
            flush()
    finally:
        bar.close()
    if reasons and not skip_bad:
        fail()
    good = [i for i in candidates if i not in reasons]
    if not good:
        fail(nothing_left)

    # Finalise: trim, metadata columns, attributes, then the atomic rename.
    group = open_store()
    n = len(good)
    assert state["written"] == n, (state["written"], n)
    if images.shape[0] != n:
        images.resize((n, size, size, size))
    affines = np.asarray(group[_AFFINE][:n])
    voxels = np.asarray(group[_VOXEL][:n], dtype=np.float32)
    columns, types = _build_columns([scans[i] for i in good])
    columns[_AFFINE] = affines
    columns[_VOXEL] = voxels
    types[_AFFINE] = "float64 (4, 4)"
    types[_VOXEL] = "float32"
    write_columns(group, columns)
    # isotropic output voxels; null when scans differ in field of view (see voxel_size_mm)
    spacing = [float(voxels[0])] * 3 if np.allclose(voxels, voxels[0], rtol=1e-5) else None
    skipped = [{"path": p, "subject": sub, "session": ses, "reason": r}
               for p, sub, ses, r in bad_list()]
    group.attrs[ATTRS_KEY] = {
        "schema_version": SCHEMA_VERSION,
        "shape": [size] * 3,
        "spacing_mm": spacing,
        "dtype": dtype,
        "n_scans": n,
        "scans_per_shard": int(images.shards[0]) if images.shards else 1,
        "columns": list(columns),
        "column_types": types,
        "preprocessing": PREPROCESSING,
        "skipped": skipped,
        "source": {"path": str(source), "format": fmt},
        "created_by": f"hpcbrain {_version()} (hpcbrain.data.convert.convert_cohort)",
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    (partial / PROGRESS_FILE).unlink(missing_ok=True)
    if out.exists():
        raise ConversionError(f"{out} appeared while converting; the finished store is left "
                              f"at {partial}")
    os.rename(partial, out)
    if skipped:
        print(f"hpcbrain convert: skipped {len(skipped)} bad scan(s):", file=sys.stderr)
        for p, sub, ses, r in bad_list():
            print(f"  {sub} {ses}  {p}: {r}", file=sys.stderr)
    return ConversionReport(n_converted=n, skipped=[(p, r) for p, _, _, r in bad_list()],
                            out=out, seconds=time.perf_counter() - started,
                            resumed_shards=resumed_shards)


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("hpcbrain")
    except Exception:
        return "unknown"
