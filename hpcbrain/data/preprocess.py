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
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

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
    with warnings.catch_warnings():
        # a 1-D matrix is a diagonal one (what we mean); scipy still warns that it was
        # read differently before 0.18, once per scan and worker
        warnings.filterwarnings("ignore", message="The behavior of affine_transform")
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


def preprocessing_attrs(register: bool = False) -> dict:
    """What a store records in ``attrs["hpcbrain"]["preprocessing"]`` (and a model trained on
    it carries): `PREPROCESSING`, and the registration when there is one (else null)."""
    from hpcbrain.data.register import registration_attrs

    return {**PREPROCESSING, "registration": registration_attrs() if register else None}


def load_scan(path: str | Path, size: int, register: bool = False
              ) -> tuple[np.ndarray, np.ndarray, float]:
    """Load a NIfTI file and preprocess it; raises `BadScanError` saying why it is unusable.
    With `register`, the scan is first bias-corrected and affinely registered to MNI152
    (`hpcbrain.data.register`); the affine returned is then the template's."""
    import nibabel as nib

    if register:
        from hpcbrain.data.register import register_to_template

        return preprocess_image(register_to_template(path), size)
    try:
        img = nib.load(str(path))
    except Exception as exc:
        raise BadScanError(f"cannot read image: {type(exc).__name__}: {exc}") from exc
    if not hasattr(img, "affine"):
        raise BadScanError(f"not a spatial image ({type(img).__name__})")
    return preprocess_image(img, size)
