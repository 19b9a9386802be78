"""Projection heads for contrastive learning, and the feature extractor used for evaluation.

AdapN (after SimCLR / SupCon): encoder features h (512-d for ResNet-18) → Linear(512, 512) →
ReLU → Linear(512, 128) → L2 normalisation: z = π(h) / ‖π(h)‖. The contrastive losses see z.
For the downstream regression the paper compares features taken after the projection (z, its
default and better) with features before it (h): `FeatureExtractor` gives either.
"""
from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ProjectionHead", "FeatureExtractor", "FEATURE_MODES"]

FEATURE_MODES = ("projection", "backbone")


class ProjectionHead(nn.Module):
    """[B, in_dim] → [B, out_dim]: Linear(in, hidden) → ReLU → Linear(hidden, out) → L2-norm.

    hidden_dim None = in_dim (512→512→128 for ResNet-18 features). normalize=False returns the
    raw projection.
    """

    def __init__(self, in_dim: int, hidden_dim: Optional[int] = None, out_dim: int = 128,
                 normalize: bool = True) -> None:
        super().__init__()
        hidden = int(hidden_dim) if hidden_dim else int(in_dim)
        if min(int(in_dim), hidden, int(out_dim)) < 1:
            raise ValueError(f"ProjectionHead: dimensions must be >= 1, got in={in_dim}, "
                             f"hidden={hidden}, out={out_dim}")
        self.in_dim, self.hidden_dim, self.out_dim = int(in_dim), hidden, int(out_dim)
        self.normalize = bool(normalize)
        self.net = nn.Sequential(nn.Linear(self.in_dim, hidden), nn.ReLU(inplace=True),
                                 nn.Linear(hidden, self.out_dim))

    def forward(self, h: Tensor) -> Tensor:
        z = self.net(h)
        return F.normalize(z, dim=1) if self.normalize else z


class FeatureExtractor(nn.Module):
    """Volumes → evaluation features: ``head(backbone(x))`` ("projection", L2-normalised) or
    ``backbone(x)`` ("backbone"). Holds references to the method's modules (no copies)."""

    def __init__(self, backbone: nn.Module, head: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        # A new wrapper would report training=True whatever its modules are in, and code that
        # restores "the mode it found" (eval helpers) would then put an eval-mode method's
        # BatchNorm back into training mode.
        self.training = backbone.training

    @property
    def mode(self) -> str:
        return "backbone" if self.head is None else "projection"

    def forward(self, x: Tensor) -> Tensor:
        h = self.backbone(x)
        return h if self.head is None else self.head(h)
