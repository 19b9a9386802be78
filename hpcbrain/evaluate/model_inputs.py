"""How a registered model's inputs were made, carried with the model.

A model trained on a store only makes sense on new scans prepared exactly as that store's were.
At registration the job writes the store's preparation into the model's MLmodel metadata
(``metadata["hpcbrain"]``: shape, spacing, dtype, orientation, preprocessing with its version and
registration); `hpcbrain embed`, `predict-age` and `bids-app` read it back
(`required_preparation`) and apply it (`preprocess.load_scan(..., register=...)`), or stop with
a message saying why they cannot: the model needs registration and ANTsPy is missing, or it was
trained on a preprocessing version this hpcbrain does not implement. Models logged before this
metadata existed are read as unregistered, preprocessing version 1 (what every store was then).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hpcbrain.volume_grid import VolumeGrid, as_shape

METADATA_KEY = "hpcbrain"


class ModelInputError(ValueError):
    """New scans cannot be prepared the way this model's training scans were."""


def model_inputs_metadata(store) -> dict[str, Any]:
    """The MLmodel metadata of a model trained on `store` (a CohortStore)."""
    info = store.info
    return {METADATA_KEY: {"inputs": {
        "shape": list(store.shape), "spacing_mm": info.get("spacing_mm"),
        "dtype_in_store": info.get("dtype"), "orientation": "RAS+",
        "preprocessing": info.get("preprocessing"),
    }}}


@dataclass(frozen=True)
class Preparation:
    """What `load_scan` must do to a new scan for this model."""

    grid: VolumeGrid                 # the voxel grid new scans are sampled on
    register: bool
    preprocessing_version: int


def _metadata(model_dir: Path) -> dict[str, Any]:
    from mlflow.models import Model

    meta = Model.load(str(Path(model_dir) / "MLmodel")).metadata or {}
    return dict(meta.get(METADATA_KEY, {}).get("inputs", {}))


def required_preparation(model_dir: Path, shape: int | tuple[int, int, int]) -> Preparation:
    """The preparation a logged model (downloaded to `model_dir`, input `shape` (D, H, W) from
    its signature, or S for S³) needs; ModelInputError when this installation cannot provide
    it. The grid is the one its store recorded (an MNI152 box, a field-of-view box); a model
    from before grids were recorded takes a field-of-view grid of its signature's shape."""
    from hpcbrain.data.preprocess import PREPROCESSING_VERSION

    inputs = _metadata(model_dir)
    preprocessing = inputs.get("preprocessing") or {}
    version = int(preprocessing.get("version", PREPROCESSING_VERSION))
    if version != PREPROCESSING_VERSION:
        raise ModelInputError(
            f"this model was trained on scans prepared with hpcbrain preprocessing version "
            f"{version}; this hpcbrain implements version {PREPROCESSING_VERSION}: use the "
            f"hpcbrain release that trained it")
    register = bool(preprocessing.get("registration"))
    if register:
        from hpcbrain.data.register import RegistrationUnavailable, require_antspy

        try:
            require_antspy()
        except RegistrationUnavailable:
            raise ModelInputError(
                "this model was trained on scans affinely registered to MNI152 "
                "(hpcbrain convert --register), and registering new scans needs ANTsPy: "
                "pip install antspyx") from None
    signature = as_shape(shape)
    recorded = inputs.get("shape")
    if recorded and as_shape(recorded) != signature:
        raise ModelInputError(f"the model's metadata says {recorded} inputs but its signature "
                              f"takes {list(signature)}: the model files are inconsistent")
    grid = VolumeGrid.from_attrs(preprocessing.get("grid"), signature)
    if grid.shape != signature:
        raise ModelInputError(f"the model's preprocessing grid is {list(grid.shape)} but its "
                              f"signature takes {list(signature)}: the model files are "
                              f"inconsistent")
    return Preparation(grid=grid, register=register, preprocessing_version=version)
