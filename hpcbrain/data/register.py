"""Affine registration to MNI152 for `hpcbrain convert --register` (and for new scans given to a
model that was trained on registered data).

What clinica's t1-linear pipeline does with ANTs, here with ANTsPy (``pip install antspyx``):
1. N4 bias-field correction of the raw scan (``ants.n4_bias_field_correction``, defaults:
   shrink factor 4, 4 × 50 iterations);
2. affine registration (``ants.registration``, ``type_of_transform="Affine"``: Mattes mutual
   information, 4 levels) to nilearn's MNI152 template at 2 mm (``load_mni152_template(2)``, the
   template nilearn ships, so nothing is downloaded), linear interpolation onto its grid;
3. a quality check: the Pearson correlation of the registered scan with the template over the
   template's brain (template > 0.2 of its maximum, nilearn's brain-mask rule). Below
   `MIN_CORRELATION` the registration is taken to have failed and the scan is a bad scan,
   reported like any other bad input.
The registered image (in the template's RAS+ space, 99 × 117 × 95 at 2 mm) then goes through the
store's usual preprocessing (`preprocess.preprocess_image`). Deterministic: ANTs runs with a
fixed random seed and one thread per process (the converter's workers give the parallelism),
so a resumed conversion reproduces its shards.
"""
from __future__ import annotations

import tempfile
from functools import lru_cache
from pathlib import Path

import numpy as np

MIN_CORRELATION = 0.5
TEMPLATE_RESOLUTION_MM = 2
RANDOM_SEED = 1


class RegistrationUnavailable(RuntimeError):
    """ANTsPy is not installed."""


def registration_attrs() -> dict:
    """What a store (and a model trained on it) records about the registration."""
    return {"tool": f"ANTsPy {require_antspy().__version__}", "bias_field": "N4 (ants defaults)",
            "template": f"MNI152 (nilearn.datasets.load_mni152_template, "
                        f"{TEMPLATE_RESOLUTION_MM} mm)",
            "transform": "Affine (ants.registration, Mattes MI), linear interpolation",
            "min_correlation": MIN_CORRELATION, "random_seed": RANDOM_SEED}


def require_antspy():
    """The ants module; RegistrationUnavailable, saying what to install, without it."""
    try:
        import ants
    except ImportError:
        raise RegistrationUnavailable(
            "registration needs ANTsPy: pip install antspyx (or convert without --register)"
        ) from None
    return ants


@lru_cache(maxsize=1)
def _template():
    """(ANTs template image, its brain mask as a numpy bool array), once per process."""
    from nilearn.datasets import load_mni152_template

    ants = require_antspy()
    ants.config.set_ants_deterministic(True, RANDOM_SEED)
    template = ants.from_nibabel_nifti(load_mni152_template(resolution=TEMPLATE_RESOLUTION_MM))
    values = template.numpy()
    return template, values > 0.2 * values.max()


def register_to_template(path: str | Path):
    """The scan at `path`, bias-corrected and affinely registered to MNI152, as a nibabel image;
    `preprocess.BadScanError` when ANTs fails or the result does not look like the template."""
    from hpcbrain.data.preprocess import BadScanError

    ants = require_antspy()
    template, brain = _template()
    try:
        moving = ants.image_read(str(path))
        if moving.dimension != 3:
            raise BadScanError(f"{moving.dimension}D image: registration needs a 3D T1w scan")
        corrected = ants.n4_bias_field_correction(moving)
        with tempfile.TemporaryDirectory(prefix="hpcbrain-register-") as tmp:
            # ANTs writes its transforms under outprefix; the folder goes with them
            result = ants.registration(fixed=template, moving=corrected,
                                       type_of_transform="Affine",
                                       outprefix=str(Path(tmp) / "reg_"))
            warped = result["warpedmovout"]
    except BadScanError:
        raise
    except Exception as exc:
        raise BadScanError(f"registration to MNI152 failed: {type(exc).__name__}: {exc}") from exc
    values = warped.numpy()
    correlation = similarity_to_template(values, template.numpy(), brain)
    if not correlation >= MIN_CORRELATION:
        raise BadScanError(f"registration to MNI152 looks wrong: correlation with the template "
                           f"{correlation:.2f} over its brain (< {MIN_CORRELATION}); check the "
                           f"scan's orientation and field of view")
    return ants.to_nibabel_nifti(warped)


def similarity_to_template(values: np.ndarray, template: np.ndarray, brain: np.ndarray) -> float:
    """Pearson correlation of a registered scan with the template over the template's brain."""
    a, b = values[brain].astype(np.float64), template[brain].astype(np.float64)
    if a.std() == 0 or b.std() == 0:
        return 0.0
    return float(np.corrcoef(a, b)[0, 1])
