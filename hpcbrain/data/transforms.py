"""Augmentations for 3D volumes shaped [C, D, H, W].

Every transform works in two steps: `sample(shape, generator)` draws its random parameters from
an explicit `torch.Generator`, then `apply(x, params)` applies them. Splitting the two is what
lets a pair of scans of one subject receive *identical* augmentations (`apply_pair`, or
`apply_many` for any number of volumes), so that the difference between their latents reflects
aging, not augmentation.

    t(x, generator)                     -> x'          one volume
    t.apply_pair(x_u, x_v, generator)   -> (x_u', x_v')  same parameters for both
    t.apply_many([x1, x2, ...], generator)

Conventions:
- Axes: the cohort store is RAS+, so in [C, D, H, W] axis 1 (the first spatial axis, D) is x,
  running left → right; axis 2 is y (posterior → anterior), axis 3 is z (inferior → superior).
  The hemisphere flip therefore mirrors axis 1.
- Each transform is applied with probability `p`. Its parameters are drawn whether or not it
  fires, so every transform consumes a fixed amount of randomness: changing one transform's `p`
  does not change what the others draw for the same generator seed.
- Parameters never depend on the data, only on the volume shape, so they are shared exactly
  between the volumes passed to `apply_many` (which must have the same shape).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

__all__ = [
    "Transform",
    "Compose",
    "HemisphereFlip",
    "RandomAffine",
    "Cutout",
    "GaussianNoise",
    "affine_transform",
    "build_augmentation",
]

LEFT_RIGHT_AXIS = 1  # of [C, D, H, W]; the store is RAS+, so the first spatial axis is x (L→R)


def _uniform(generator: torch.Generator, n: int, bound: float) -> list[float]:
    """n values uniform in [-bound, bound]."""
    return ((torch.rand(n, generator=generator, dtype=torch.float64) * 2 - 1) * bound).tolist()


class Transform:
    """Base class: subclasses implement `_sample(shape, generator)` and `apply(x, params)`."""

    p: float = 1.0

    def _sample(self, shape: torch.Size, generator: torch.Generator) -> Any:
        raise NotImplementedError

    def apply(self, x: torch.Tensor, params: Any) -> torch.Tensor:
        raise NotImplementedError

    def sample(self, shape: Sequence[int], generator: torch.Generator) -> Any | None:
        """Draw the parameters for volumes of `shape` ([C, D, H, W]); None means "skip"."""
        fires = float(torch.rand((), generator=generator, dtype=torch.float64)) < self.p
        params = self._sample(torch.Size(shape), generator)  # drawn even when skipped
        return params if fires else None

    def apply_many(self, xs: Sequence[torch.Tensor],
                   generator: torch.Generator) -> list[torch.Tensor]:
        """Apply one draw of parameters to every volume in `xs` (all of the same shape)."""
        if not xs:
            return []
        shape = xs[0].shape
        for x in xs:
            if x.ndim != 4:
                raise ValueError(f"{type(self).__name__}: expected a [C, D, H, W] volume, got "
                                 f"shape {tuple(x.shape)}")
            if x.shape != shape:
                raise ValueError(f"{type(self).__name__}: volumes augmented together must "
                                 f"share a shape, got {tuple(shape)} and {tuple(x.shape)}")
        params = self.sample(shape, generator)
        if params is None:
            return list(xs)
        return [self.apply(x, params) for x in xs]

    def apply_pair(self, x_u: torch.Tensor, x_v: torch.Tensor,
                   generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        x_u, x_v = self.apply_many([x_u, x_v], generator)
        return x_u, x_v

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return self.apply_many([x], generator)[0]

    def apply_batch(self, x: torch.Tensor, params: Sequence[Any | None]) -> torch.Tensor:
        """A whole batch [B, C, D, H, W] on its device, item b with its own draw ``params[b]``
        (from `sample`; None: left as it is). Equal to applying each item's draw to it alone;
        subclasses do it in one call over the batch where they can."""
        _check_batch(x, params, self)
        return torch.stack([xi if p is None else self.apply(xi, p) for xi, p in zip(x, params)])


def _check_batch(x: torch.Tensor, params: Sequence[Any], transform: Transform) -> None:
    if x.ndim != 5 or len(params) != x.shape[0]:
        raise ValueError(f"{type(transform).__name__}.apply_batch: expected a [B, C, D, H, W] "
                         f"batch and B parameter draws, got shape {tuple(x.shape)} and "
                         f"{len(params)} draws")


def _check_probability(p: float, where: str) -> float:
    p = float(p)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"{where}: probability p must lie in [0, 1], got {p}")
    return p


class Compose(Transform):
    """Transforms applied in order; `sample` returns one parameter draw per transform."""

    def __init__(self, transforms: Sequence[Transform]):
        self.transforms = list(transforms)

    def sample(self, shape: Sequence[int], generator: torch.Generator) -> list[Any]:
        return [t.sample(shape, generator) for t in self.transforms]

    def apply(self, x: torch.Tensor, params: list[Any]) -> torch.Tensor:
        for t, t_params in zip(self.transforms, params):
            if t_params is not None:
                x = t.apply(x, t_params)
        return x

    def apply_batch(self, x: torch.Tensor, params: Sequence[list[Any]]) -> torch.Tensor:
        """``params[b]``: item b's draw from `sample` (one entry per transform)."""
        _check_batch(x, params, self)
        for j, t in enumerate(self.transforms):
            column = [p[j] for p in params]
            if any(p is not None for p in column):
                x = t.apply_batch(x, column)
        return x

    def __len__(self) -> int:
        return len(self.transforms)

    def __repr__(self) -> str:
        inner = ", ".join(repr(t) for t in self.transforms)
        return f"Compose([{inner}])"


class HemisphereFlip(Transform):
    """Mirror the left-right axis (axis 1 of [C, D, H, W]; x in the RAS+ store)."""

    def __init__(self, p: float = 0.5):
        self.p = _check_probability(p, "HemisphereFlip")

    def _sample(self, shape, generator):
        return True

    def apply(self, x, params):
        return torch.flip(x, dims=(LEFT_RIGHT_AXIS,))

    def apply_batch(self, x, params):
        _check_batch(x, params, self)
        fires = torch.tensor([p is not None for p in params], device=x.device)
        return torch.where(fires.view(-1, 1, 1, 1, 1), torch.flip(x, dims=(LEFT_RIGHT_AXIS + 1,)), x)

    def __repr__(self) -> str:
        return f"HemisphereFlip(p={self.p})"


def _rotation_matrix(angles_deg: Sequence[float]) -> torch.Tensor:
    """3×3 rotation in (D, H, W) voxel axes; angle k turns the plane of the two other axes.

    angles[0] turns H towards W, angles[1] turns W towards D, angles[2] turns D towards H
    (so +90° about axis 0 equals torch.rot90(x, 1, dims=(2, 3))).
    """
    matrix = torch.eye(3, dtype=torch.float64)
    for axis, angle in enumerate(angles_deg):
        if angle == 0:
            continue
        a, b = (axis + 1) % 3, (axis + 2) % 3
        c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
        r = torch.eye(3, dtype=torch.float64)
        r[a, a], r[a, b], r[b, a], r[b, b] = c, -s, s, c
        matrix = r @ matrix
    return matrix


def affine_transform(x: torch.Tensor, rotation_deg: Sequence[float] = (0.0, 0.0, 0.0),
                     translation_vox: Sequence[float] = (0.0, 0.0, 0.0)) -> torch.Tensor:
    """Rotate [C, D, H, W] `x` about its centre, then shift its content by `translation_vox`.

    Trilinear interpolation, zeros outside the volume. Rotation and translation are given in
    voxel axes (D, H, W); a translation of +k along an axis moves the content k voxels towards
    higher indices, exactly when k is an integer. Rotations are in voxel space, so a volume
    with anisotropic voxels is rotated in index space, not in millimetres.
    """
    if x.ndim != 4:
        raise ValueError(f"affine_transform expects [C, D, H, W], got {tuple(x.shape)}")
    return _resample(x[None], _affine_theta(x.shape[1:], rotation_deg, translation_vox)[None])[0]


def _affine_theta(sizes: Sequence[int], rotation_deg: Sequence[float],
                  translation_vox: Sequence[float]) -> torch.Tensor:
    """affine_grid's 3×4 matrix (float64) for `affine_transform` on volumes of `sizes` (D, H, W)."""
    sizes = torch.tensor(list(sizes), dtype=torch.float64)
    rotation = _rotation_matrix(rotation_deg)
    shift = torch.tensor([float(t) for t in translation_vox], dtype=torch.float64)
    # Content map in centred voxel coordinates: v_out = R v_in + t, so the sampling grid needs
    # v_in = Rᵀ (v_out − t). With align_corners=False, centred voxel = normalised · size/2.
    half = torch.diag(sizes / 2)
    inv_half = torch.diag(2 / sizes)
    linear = inv_half @ rotation.T @ half
    offset = -(inv_half @ rotation.T @ shift)
    # affine_grid orders coordinates (x=W, y=H, z=D): reverse the axes.
    reverse = torch.flip(torch.eye(3, dtype=torch.float64), dims=(0,))
    return torch.cat([reverse @ linear @ reverse, (reverse @ offset)[:, None]], dim=1)


def _resample(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """x [N, C, D, H, W] resampled through theta [N, 3, 4] (float64): trilinear, zeros outside."""
    dtype = x.dtype if x.is_floating_point() else torch.float32
    grid = F.affine_grid(theta.to(dtype=dtype, device=x.device), list(x.shape),
                         align_corners=False)
    return F.grid_sample(x.to(dtype), grid, mode="bilinear", padding_mode="zeros",
                         align_corners=False)


class RandomAffine(Transform):
    """Small random rotation (±`rotation_deg` about each axis) and shift (±`translation_vox`)."""

    def __init__(self, rotation_deg: float = 0.0, translation_vox: float = 0.0, p: float = 1.0):
        if rotation_deg < 0 or translation_vox < 0:
            raise ValueError(f"RandomAffine: rotation_deg and translation_vox must be >= 0, got "
                             f"{rotation_deg} and {translation_vox}")
        self.rotation_deg = float(rotation_deg)
        self.translation_vox = float(translation_vox)
        self.p = _check_probability(p, "RandomAffine")

    def _sample(self, shape, generator):
        return (_uniform(generator, 3, self.rotation_deg),
                _uniform(generator, 3, self.translation_vox))

    def apply(self, x, params):
        rotation_deg, translation_vox = params
        return affine_transform(x, rotation_deg, translation_vox)

    def apply_batch(self, x, params):
        _check_batch(x, params, self)
        fired = [b for b, p in enumerate(params) if p is not None]
        if not fired:
            return x
        theta = torch.stack([_affine_theta(x.shape[2:], *params[b]) for b in fired])
        moved = _resample(x[fired], theta)            # one grid_sample for the whole batch
        out = x.to(moved.dtype).clone()
        out[fired] = moved
        return out

    def __repr__(self) -> str:
        return (f"RandomAffine(rotation_deg={self.rotation_deg}, "
                f"translation_vox={self.translation_vox}, p={self.p})")


class Cutout(Transform):
    """Zero a cube of `size` voxels a side (clipped to the volume), placed fully inside it."""

    def __init__(self, size: int, p: float = 1.0):
        if int(size) != size or size < 1:
            raise ValueError(f"Cutout: size must be a positive integer, got {size!r}")
        self.size = int(size)
        self.p = _check_probability(p, "Cutout")

    def _sample(self, shape, generator):
        starts = []
        for dim in shape[1:]:
            extent = min(self.size, dim)
            starts.append(int(torch.randint(0, dim - extent + 1, (), generator=generator)))
        return tuple(starts)

    def apply(self, x, params):
        return self.apply_batch(x[None], [params])[0]

    def apply_batch(self, x, params):
        _check_batch(x, params, self)
        x = x.clone()
        for b, starts in enumerate(params):
            if starts is not None:
                x[(b, slice(None), *(slice(s, s + self.size) for s in starts))] = 0
        return x

    def __repr__(self) -> str:
        return f"Cutout(size={self.size}, p={self.p})"


class GaussianNoise(Transform):
    """Add N(0, std²) noise. Volumes augmented together receive the same noise field."""

    def __init__(self, std: float, p: float = 1.0):
        if std < 0:
            raise ValueError(f"GaussianNoise: std must be >= 0, got {std}")
        self.std = float(std)
        self.p = _check_probability(p, "GaussianNoise")

    def _sample(self, shape, generator):
        # A seed, not the field itself: parameters stay small and the field is rebuilt exactly.
        return int(torch.randint(0, 2**62, (), generator=generator))

    def apply(self, x, params):
        noise_generator = torch.Generator(device=x.device).manual_seed(params)
        noise = torch.randn(x.shape, generator=noise_generator, dtype=x.dtype, device=x.device)
        return x + self.std * noise

    def apply_batch(self, x, params):
        # a field per item from its own seed (what makes the result independent of the batch)
        _check_batch(x, params, self)
        noise = torch.zeros_like(x)
        for b, seed in enumerate(params):
            if seed is not None:
                generator = torch.Generator(device=x.device).manual_seed(seed)
                noise[b] = torch.randn(x.shape[1:], generator=generator, dtype=x.dtype,
                                       device=x.device)
        return x + self.std * noise

    def __repr__(self) -> str:
        return f"GaussianNoise(std={self.std}, p={self.p})"


AUGMENT_KEYS = {"flip": False, "rotation_deg": 0.0, "translation_vox": 0.0, "cutout_size": 0,
                "noise_std": 0.0, "p": 0.5}


def _config_items(cfg: Any) -> dict[str, Any]:
    if isinstance(cfg, Mapping) or hasattr(cfg, "keys"):  # dict, OmegaConf DictConfig
        return {str(k): cfg[k] for k in cfg.keys()}
    if hasattr(cfg, "__dataclass_fields__"):
        return {name: getattr(cfg, name) for name in cfg.__dataclass_fields__}
    raise TypeError(f"augment config must be a mapping or a dataclass, got {type(cfg).__name__}")


def build_augmentation(cfg_augment: Any) -> Compose | None:
    """Build the augmentation pipeline from a config section; None when nothing is enabled.

    Keys (missing ones take these defaults): flip (False), rotation_deg (0), translation_vox
    (0), cutout_size (0 = off), noise_std (0), p (0.5, the probability that each enabled
    transform fires). Order: flip, rotation+translation, cutout, noise.
    """
    if cfg_augment is None or cfg_augment is False:
        return None
    values = _config_items(cfg_augment)
    unknown = sorted(set(values) - set(AUGMENT_KEYS))
    if unknown:
        raise ValueError(f"augment config: unknown keys {unknown}; valid keys are "
                         f"{sorted(AUGMENT_KEYS)}")
    cfg = {**AUGMENT_KEYS, **{k: v for k, v in values.items() if v is not None}}
    p = _check_probability(cfg["p"], "augment.p")
    for key in ("rotation_deg", "translation_vox", "cutout_size", "noise_std"):
        if float(cfg[key]) < 0:
            raise ValueError(f"augment.{key} must be >= 0 (0 = off), got {cfg[key]}")
    transforms: list[Transform] = []
    if cfg["flip"]:
        transforms.append(HemisphereFlip(p=p))
    if float(cfg["rotation_deg"]) > 0 or float(cfg["translation_vox"]) > 0:
        transforms.append(RandomAffine(float(cfg["rotation_deg"]),
                                       float(cfg["translation_vox"]), p=p))
    if int(cfg["cutout_size"]) > 0:
        transforms.append(Cutout(int(cfg["cutout_size"]), p=p))
    if float(cfg["noise_std"]) > 0:
        transforms.append(GaussianNoise(float(cfg["noise_std"]), p=p))
    if not transforms or p == 0:
        return None
    return Compose(transforms)
