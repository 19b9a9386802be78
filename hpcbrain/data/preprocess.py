"""How a scan becomes a model input: NIfTI → RAS+ → cube → S³ → foreground z-score
(`load_scan`, `preprocess_image`, `preprocess_array`). The converter stores scans this way and
`hpcbrain embed` / `predict-age` preprocess new scans the same way.

Preprocessing (`preprocess_image`, recorded in ``attrs["hpcbrain"]["preprocessing"]``)
---------------------------------------------------------------------------------------
1. ``nibabel.load``; a 4D image whose extra dimensions are all 1 is squeezed to 3D; any other
   4D image (several volumes), a 2D image or a 3D image with a single slice is rejected.
   With registration (``hpcbrain convert --register``, `hpcbrain.data.register`): N4 bias-field
   correction and affine registration to MNI152 (2 mm) first; the rest applies to the result.
2. Reorientation to RAS+ (``nibabel.as_closest_canonical``); ``get_fdata(dtype=float32)`` (so
   scl_slope / scl_inter are applied). NaN or Inf voxels reject the scan.
3. Resampled onto the store's grid (`volume_grid.VolumeGrid`) with
   ``scipy.ndimage.affine_transform`` (order 1). A field-of-view grid (``--shape S`` or
   ``--shape D H W``): the field of view is padded, centred, to a box of the grid's aspect in mm
   (a cube: side L = the largest extent) and resampled to isotropic voxels (L/S mm), which
   keeps the physical aspect ratio. A fixed MNI152 box (``--grid mni2mm``/``mni1mm``): the scan
   is sampled at the box's world coordinates through its affine; a scan with less than
   `MIN_FOREGROUND_IN_BOX` of its foreground inside the box is rejected (not in MNI152 space).
   Along an axis downsampled by a factor f > 1, a Gaussian of σ = (f − 1)/2 input voxels is
   applied first (anti-aliasing, as skimage's resize does). Outside the scan's field of view
   takes the image minimum (its background level).
4. Foreground mask: voxels above ``lo + 0.1 (p99 − lo)``, lo = the image minimum, p99 = the 99th
   percentile of voxels above lo. It is a head/brain foreground mask, not a skull strip.
5. z-score with the mean and std of the mask voxels; voxels outside the mask are set to the
   z-scored background level ``(lo − mean)/std`` (uniform, the darkest value: the image keeps its
   natural look and the background carries no noise). A constant image is rejected.
6. Cast to the store's dtype (float16 by default).
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

from hpcbrain.volume_grid import VolumeGrid, as_shape

PREPROCESSING_VERSION = 1
MASK_FRACTION = 0.1
MASK_PERCENTILE = 99.0

PREPROCESSING = {
    "version": PREPROCESSING_VERSION,
    "load": "nibabel.load; 4D images whose extra dimensions are all 1 are squeezed to 3D, "
            "other 4D, 2D and single-slice images are rejected",
    "reorient": "RAS+ (nibabel.as_closest_canonical)",
    "intensity": "get_fdata(dtype=float32): scl_slope/scl_inter applied; NaN/Inf rejected",
    "field_of_view": "padded, centred, to a cube in mm (side = largest extent); padding = "
                     "image minimum",   # a cube's; other grids: `field_of_view`
    "resample": {"function": "scipy.ndimage.affine_transform", "order": 1,
                 "antialias": "gaussian, sigma = (f - 1)/2 input voxels along axes "
                              "downsampled by f > 1"},
    "mask": {"rule": "v > lo + fraction * (p99 - lo); lo = image minimum, p99 = percentile "
                     "of voxels above lo", "fraction": MASK_FRACTION,
             "percentile": MASK_PERCENTILE, "note": "foreground mask, not a skull strip"},
    "normalisation": "z-score with mean/std over mask voxels; outside the mask = "
                     "(lo - mean)/std (z-scored background level)",
}


class BadScanError(ValueError):
    """One image cannot be used (unreadable, wrong dimensionality, non-finite, constant)."""


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


def _as_grid(grid) -> VolumeGrid:
    return grid if isinstance(grid, VolumeGrid) else VolumeGrid(as_shape(grid))


def _antialias(data: np.ndarray, steps: np.ndarray, lo: float) -> np.ndarray:
    """Gaussian of σ = (f − 1)/2 input voxels along each axis sampled every f > 1 voxels."""
    from scipy import ndimage

    sigma = np.maximum(0.0, (steps - 1.0) / 2.0)
    if sigma.max() > 0:
        data = ndimage.gaussian_filter(data, sigma=sigma, mode="constant", cval=lo)
    return data


def _affine_resample(data: np.ndarray, matrix, offset, shape, lo: float) -> np.ndarray:
    from scipy import ndimage

    with warnings.catch_warnings():
        # a 1-D matrix is a diagonal one (what we mean); scipy still warns that it was
        # read differently before 0.18, once per scan and worker
        warnings.filterwarnings("ignore", message="The behavior of affine_transform")
        return ndimage.affine_transform(data, matrix, offset=offset, output_shape=tuple(shape),
                                        order=1, mode="constant", cval=lo, prefilter=False)


def _sample_fov(data: np.ndarray, voxel_mm, shape: tuple[int, int, int], lo: float
                ) -> tuple[np.ndarray, float]:
    """Step 3 on a field-of-view grid: the FOV padded, centred, to the box's aspect in mm,
    resampled to `shape` isotropic voxels (a cube: side = the largest extent)."""
    n = np.asarray(data.shape[:3], dtype=np.float64)
    vox = np.asarray(voxel_mm, dtype=np.float64)
    sides = np.asarray(shape, dtype=np.float64)
    extent = n * vox
    k = int(np.argmax(extent / sides))          # the axis that fills its side of the box
    out_vox = float(extent[k] / sides[k])
    # the box's sides in mm; exactly the largest extent along every axis of a cube (as
    # before boxes: the same bytes)
    box = np.array([extent[k] if sides[i] == sides[k] else extent[k] * sides[i] / sides[k]
                    for i in range(3)])
    scale = out_vox / vox  # input voxels per output voxel, per axis
    data = _antialias(data, scale, lo)
    # output voxel j has its centre at (j + 0.5) out_vox − box/2 mm from the FOV centre; input
    # voxel i at (i + 0.5) vox − n vox/2: i = scale j + offset
    offset = (0.5 * out_vox - box / 2 + n * vox / 2) / vox - 0.5
    return _affine_resample(data, scale, offset, shape, lo), out_vox


#: a scan sampled on a fixed MNI152 box must have at least this share of its foreground inside
#: the box: a scan in scanner space (not registered) rarely does
MIN_FOREGROUND_IN_BOX = 0.6


def _sample_box(data: np.ndarray, affine: np.ndarray, grid: VolumeGrid, lo: float
                ) -> np.ndarray:
    """Step 3 on a fixed box: the scan sampled at the box's world coordinates (RAS mm)."""
    to_input = np.linalg.inv(np.asarray(affine, dtype=np.float64)) @ grid.affine()
    matrix, offset = to_input[:3, :3], to_input[:3, 3]
    foreground = _foreground(data, lo)
    if foreground is not None:
        inside = _share_inside(foreground, np.linalg.inv(to_input), grid.shape)
        if inside < MIN_FOREGROUND_IN_BOX:
            raise BadScanError(
                f"only {100 * inside:.0f} % of its foreground lies inside the {grid.name} box "
                f"(MNI152 mm x {grid.attrs()['world_box_mm'][0]}, y "
                f"{grid.attrs()['world_box_mm'][1]}, z {grid.attrs()['world_box_mm'][2]}): "
                f"is it in MNI152 space? Convert with --register, or give registered scans")
    steps = np.sqrt((matrix ** 2).sum(axis=1))   # input voxels per output voxel, per input axis
    data = _antialias(data, steps, lo)
    return _affine_resample(data, matrix, offset, grid.shape, lo)


def _foreground(data: np.ndarray, lo: float) -> np.ndarray | None:
    """Voxel indices [N, 3] of the foreground (step 4's rule) on a grid thinned to ~200,000
    voxels: enough to tell where the head lies, cheap on a 1 mm scan."""
    step = max(1, int(round((data.size / 2e5) ** (1 / 3))))
    thinned = data[::step, ::step, ::step]
    above = thinned[thinned > lo]
    if above.size == 0:
        return None
    return np.argwhere(thinned > _mask_threshold(above, lo)) * step


def _mask_threshold(above: np.ndarray, lo: float) -> float:
    """Step 4's foreground threshold from the voxels above the image minimum `lo`."""
    return lo + MASK_FRACTION * (float(np.percentile(above, MASK_PERCENTILE)) - lo)


def _share_inside(voxels: np.ndarray, input_to_box: np.ndarray, shape) -> float:
    """The share of input `voxels` [N, 3] whose centres fall inside the box."""
    at = voxels.astype(np.float64) @ input_to_box[:3, :3].T + input_to_box[:3, 3]
    inside = np.all((at >= -0.5) & (at <= np.asarray(shape) - 0.5), axis=1)
    return float(inside.mean())


def preprocess_array(data: np.ndarray, voxel_mm, grid: VolumeGrid | int | Sequence[int],
                     affine: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """RAS+ float data with voxel sizes `voxel_mm` → (the grid's z-scored float32 volume,
    output voxel mm). `grid`: a `VolumeGrid`, or S / (D, H, W) for a field-of-view grid; a
    fixed box (MNI152) needs the data's `affine` (RAS+ voxel → mm).

    Steps 3–5 of the module docstring (resample onto the grid, mask, z-score).
    """
    grid = _as_grid(grid)
    data = np.asarray(data, dtype=np.float32)
    lo = float(data.min())
    if float(data.max()) <= lo:
        raise BadScanError("constant image (no foreground to normalise)")
    if grid.fixed:
        if affine is None:
            raise ValueError(f"preprocess_array: the {grid.name} box needs the scan's affine")
        out, out_vox = _sample_box(data, affine, grid, lo), float(grid.voxel_mm)
    else:
        out, out_vox = _sample_fov(data, voxel_mm, grid.shape, lo)
    return _normalise(out, lo), out_vox


def _normalise(out: np.ndarray, lo: float) -> np.ndarray:
    """Steps 4–5: foreground mask and z-score."""
    above = out[out > lo]
    if above.size == 0:
        raise BadScanError("no foreground after resampling")
    mask = out > _mask_threshold(above, lo)
    if mask.sum() < 2:
        raise BadScanError("foreground mask is (nearly) empty")
    values = out[mask].astype(np.float64)
    mean, std = float(values.mean()), float(values.std())
    if not std > 0:
        raise BadScanError("constant foreground (std 0)")
    result = np.full(out.shape, (lo - mean) / std, dtype=np.float32)
    result[mask] = ((values - mean) / std).astype(np.float32)
    return result


def preprocess_image(img, grid: VolumeGrid | int | Sequence[int]
                     ) -> tuple[np.ndarray, np.ndarray, float]:
    """A nibabel image → (the grid's float32 volume, RAS+ affine of the source, output voxel
    mm).

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
    volume, out_vox = preprocess_array(data, voxel_mm, grid, img.affine)
    return volume, np.asarray(img.affine, dtype=np.float64), out_vox


def field_of_view(grid: VolumeGrid) -> str:
    """How the scan's field of view becomes the grid's, in words (recorded with the store)."""
    if grid.fixed:
        box = grid.attrs()["world_box_mm"]
        return (f"sampled at the world coordinates of the {grid.name} box (MNI152 mm: x {box[0]}, "
                f"y {box[1]}, z {box[2]}, {grid.voxel_mm:g} mm voxels); outside the scan's "
                f"field of view = image minimum; rejected when < {MIN_FOREGROUND_IN_BOX:g} of "
                f"its foreground lies inside the box")
    if grid.is_cube:
        return PREPROCESSING["field_of_view"]
    return ("padded, centred, to a box of aspect D:H:W in mm (isotropic voxels; the axis with "
            "the largest extent per voxel fills its side); padding = image minimum")


def preprocessing_attrs(register: bool = False, grid: VolumeGrid | int | None = None) -> dict:
    """What a store records in ``attrs["hpcbrain"]["preprocessing"]`` (and a model trained on
    it carries): `PREPROCESSING`, the registration when there is one (else null) and, for any
    grid but a field-of-view cube (what every store was before boxes, so theirs read the
    same), the grid (`VolumeGrid.attrs`)."""
    from hpcbrain.data.register import registration_attrs

    attrs = {**PREPROCESSING, "registration": registration_attrs() if register else None}
    if grid is not None:
        grid = _as_grid(grid)
        attrs["field_of_view"] = field_of_view(grid)
        if grid.fixed or not grid.is_cube:
            attrs["grid"] = grid.attrs()
    return attrs


def load_scan(path: str | Path, grid: VolumeGrid | int | Sequence[int], register: bool = False
              ) -> tuple[np.ndarray, np.ndarray, float]:
    """Load a NIfTI file and preprocess it; raises `BadScanError` saying why it is unusable.
    With `register`, the scan is first bias-corrected and affinely registered to MNI152
    (`hpcbrain.data.register`); the affine returned is then the template's."""
    import nibabel as nib

    if register:
        from hpcbrain.data.register import register_to_template

        return preprocess_image(register_to_template(path), grid)
    try:
        img = nib.load(str(path))
    except Exception as exc:
        raise BadScanError(f"cannot read image: {type(exc).__name__}: {exc}") from exc
    if not hasattr(img, "affine"):
        raise BadScanError(f"not a spatial image ({type(img).__name__})")
    return preprocess_image(img, grid)
