"""The synthetic cohort's images: the MNI152 template (from nilearn's wheel), each subject's
pose, size and smooth deformation, the ageing of each session (ventricles enlarged, cortex
thinned), the scanner's bias field and Rician noise, written as NIfTI. The subjects' numbers
come from `hpcbrain.data.synth_subjects`; `hpcbrain.data.synth` drives both.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from hpcbrain.data.synth_subjects import INTENSITY_SCALE, AgingModel, SessionPlan, SubjectPlan

SCALE_SLOPE = 0.1            # NIfTI scl_slope of every image: int16 stores intensity / 0.1


@dataclass(frozen=True)
class Template:
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
def load_template(voxel_size_mm: float) -> Template:
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
    return Template(t1=t1, thinning=thinning, support=support,
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


def _output_axes_mm(tpl: Template) -> list[np.ndarray]:
    return [tpl.out_affine[i, 3] + tpl.out_affine[i, i] * np.arange(n)
            for i, n in enumerate(tpl.out_shape)]


@dataclass
class SubjectWarp:
    """Where each output voxel of one subject samples the template (template voxel units)."""

    points: np.ndarray        # (M,) flat indices of the output voxels inside the support
    voxels: tuple             # their (x, y, z) output voxel indices, int32
    coords: np.ndarray        # (3, M) float32 template voxel coordinates
    near: np.ndarray          # (V,) positions (into points) within reach of the ventricles
    to_ventricle: np.ndarray  # (3, V) float32 vector to the nearest ventricle voxel (voxels)
    distance_mm: np.ndarray   # (V,) float32 its length in mm


def subject_warp(subject: SubjectPlan, tpl: Template, model: AgingModel) -> SubjectWarp:
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
    return SubjectWarp(points=points, voxels=voxels, coords=coords, near=near,
                        to_ventricle=to_ventricle, distance_mm=distance.astype(np.float32))


def _ventricle_pull(session: SessionPlan, warp: SubjectWarp, model: AgingModel) -> np.ndarray:
    """Fraction of the way to the nearest ventricle voxel each nearby output voxel samples.

    Push m(d) = D (1 - d/R)^2 (zero beyond R) and sample at d - m(d), never past the wall:
    the walls move out by exactly d* = ventricle_dilation_mm (D solves d* = m(d*)), the
    tissue within R is squeezed, and d - m(d) increases with d so nothing folds."""
    d_star, reach = session.ventricle_dilation_mm, model.ventricle_reach_mm
    push_at_wall = d_star / (1.0 - d_star / reach) ** 2
    d = warp.distance_mm
    push = push_at_wall * np.clip(1.0 - d / reach, 0.0, None) ** 2
    return np.where(push >= d, 1.0, push / np.maximum(d, 1e-6)).astype(np.float32)


def _bias_field(coefficients: np.ndarray, tpl: Template, warp: SubjectWarp) -> np.ndarray:
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


def render_scan(subject: SubjectPlan, session: SessionPlan, warp: SubjectWarp, tpl: Template,
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


def write_nifti(path: Path, image: np.ndarray, tpl: Template, orientation: tuple) -> None:
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
