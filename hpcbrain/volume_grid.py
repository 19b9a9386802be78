"""The voxel grid a store's volumes are sampled on (`VolumeGrid`): a box of D × H × W voxels.

Two kinds, chosen at conversion (`hpcbrain convert --shape S | --shape D H W | --grid NAME`):

* **field of view** (``name: fov``, `--shape`): each scan's own field of view, padded, centred,
  to the box's aspect in mm and resampled to isotropic voxels — the voxel size is what makes
  the largest extent (relative to its voxel count) fit, so it varies between scans of
  different fields of view. A cube (``--shape S``) is what every store was before boxes.
* **a fixed MNI152 box** (``--grid mni2mm`` / ``mni1mm``): the MNI152 voxel grid (2 mm / 1 mm)
  cropped to a brain box of 160 × 192 × 160 mm — the box of Peng et al.'s SFCN (160 × 192 ×
  160 at 1 mm), centred on the MNI152 template's brain mask (x −72…72, y −107…73, z −72…82 mm:
  nilearn's template, brain = voxels above 0.2 of its maximum). Margins: 8 mm left and right,
  6 mm front and back, 3 mm below and above. Every scan is sampled at the same world
  coordinates, so the scans must already be in MNI152 space (``convert --register``, or
  registered inputs such as fMRIPrep's ``space-MNI152…`` T1w). 2 mm: 80 × 96 × 80, 1 mm:
  160 × 192 × 160; both divisible by 16, the LSOR encoder's downsampling (4 max-pools), and the
  2 mm box has 2.3 × the voxels of a 64³ cube instead of spending a quarter on padding.

A grid is hashable (caches key on it) and is recorded in the store's preprocessing attributes
(`attrs`), which a registered model carries, so new scans are sampled on the same grid.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

__all__ = ["VolumeGrid", "MNI_BOXES", "FOV", "as_shape", "grid_for", "BRAIN_BOX_MM"]

FOV = "fov"

#: (lower, upper) world mm of the box's faces, RAS: 160 × 192 × 160 mm around the template's
#: brain (centre x 0, y −17, z 5)
BRAIN_BOX_MM = ((-80.0, 80.0), (-113.0, 79.0), (-75.0, 85.0))


def as_shape(value: Any) -> tuple[int, int, int]:
    """(D, H, W) from S (a cube) or three sides; ValueError naming the value otherwise."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        sides = (int(value),) * 3
    else:
        try:
            sides = tuple(int(v) for v in value)
        except (TypeError, ValueError):
            raise ValueError(f"a volume shape is S or [D, H, W] (positive integers), "
                             f"got {value!r}") from None
        if len(sides) == 1:
            sides = sides * 3
    if len(sides) != 3 or any(s < 2 for s in sides):
        raise ValueError(f"a volume shape is S or [D, H, W] with every side ≥ 2, got {value!r}")
    return sides  # type: ignore[return-value]


@dataclass(frozen=True)
class VolumeGrid:
    """D × H × W voxels; for a fixed box also its voxel size and the world (RAS mm) centre of
    voxel (0, 0, 0). ``name`` is ``fov`` for a field-of-view grid, else the box's name."""

    shape: tuple[int, int, int]
    name: str = FOV
    voxel_mm: float | None = None
    origin_mm: tuple[float, float, float] | None = None

    @property
    def fixed(self) -> bool:
        """Sampled at fixed world coordinates (an MNI152 box), not at the scan's own FOV."""
        return self.name != FOV

    @property
    def is_cube(self) -> bool:
        return len(set(self.shape)) == 1

    def affine(self) -> np.ndarray:
        """Voxel → world mm of a fixed box (RAS, isotropic)."""
        if not self.fixed:
            raise ValueError("a field-of-view grid has no fixed affine: it follows each scan")
        affine = np.eye(4)
        affine[:3, :3] *= float(self.voxel_mm)
        affine[:3, 3] = self.origin_mm
        return affine

    def describe(self) -> str:
        sides = " × ".join(map(str, self.shape))
        if self.fixed:
            return f"{sides} at {self.voxel_mm:g} mm ({self.name}: the MNI152 brain box)"
        return f"{sides} (each scan's field of view)"

    def attrs(self) -> dict[str, Any]:
        """What a store's preprocessing attributes record (JSON)."""
        out: dict[str, Any] = {"name": self.name, "shape": list(self.shape)}
        if self.fixed:
            out.update(voxel_mm=float(self.voxel_mm), affine=self.affine().tolist(),
                       world_box_mm=[list(b) for b in BRAIN_BOX_MM])
        return out

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any] | None, shape: Sequence[int]) -> VolumeGrid:
        """The grid recorded in a store's (or model's) preprocessing attributes; stores and
        models made before grids were recorded are field-of-view grids of their `shape`."""
        if not attrs:
            return cls(as_shape(shape))
        if attrs.get("name", FOV) == FOV:
            return cls(as_shape(attrs.get("shape", shape)))
        affine = np.asarray(attrs["affine"], dtype=np.float64)
        return cls(as_shape(attrs["shape"]), str(attrs["name"]), float(attrs["voxel_mm"]),
                   tuple(float(v) for v in affine[:3, 3]))

    def fingerprint(self) -> Any:
        """What a conversion's inputs fingerprint records: S for a field-of-view cube (as
        before boxes existed, so a conversion staged then still resumes), else `attrs`."""
        return self.shape[0] if (not self.fixed and self.is_cube) else self.attrs()


def _mni_box(name: str, voxel_mm: float) -> VolumeGrid:
    shape = tuple(int(round((hi - lo) / voxel_mm)) for lo, hi in BRAIN_BOX_MM)
    origin = tuple(lo + voxel_mm / 2 for lo, _ in BRAIN_BOX_MM)
    return VolumeGrid(shape, name, float(voxel_mm), origin)  # type: ignore[arg-type]


MNI_BOXES: dict[str, VolumeGrid] = {"mni2mm": _mni_box("mni2mm", 2.0),
                                    "mni1mm": _mni_box("mni1mm", 1.0)}


def grid_for(shape: Any = None, grid: str | None = None) -> VolumeGrid:
    """The grid `convert` samples on, from ``--shape`` (S or D H W) and/or ``--grid NAME``;
    ValueError saying what to pass when they are missing or disagree."""
    if grid is not None:
        if grid not in MNI_BOXES:
            raise ValueError(f"--grid {grid!r}: known grids are {', '.join(MNI_BOXES)}")
        box = MNI_BOXES[grid]
        if shape is not None and as_shape(shape) != box.shape:
            raise ValueError(f"--grid {grid} is {' × '.join(map(str, box.shape))} voxels; "
                             f"--shape {shape} disagrees: leave --shape out")
        return box
    if shape is None:
        raise ValueError("give --shape S (an S³ cube), --shape D H W (a box), or --grid "
                         f"{'|'.join(MNI_BOXES)} (the MNI152 brain box)")
    return VolumeGrid(as_shape(shape))
