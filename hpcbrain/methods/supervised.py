"""The supervised upper bound of the contrastive benchmark: the same backbone trained to predict
age directly (MSE), registered as ``supervised``.

    l_i = ((f(x_i) − (y_i − age_offset) / age_scale))²,  loss = mean over the GLOBAL batch

The head is one linear layer on the backbone's features; the target is age centred and scaled
by fixed constants (`supervised.age_offset`, `supervised.age_scale`; 70 and 10 years by default)
so that the output starts near the right range. Evaluation is the family's: ridge on the frozen
backbone features (`ridge_evaluation`), so the benchmark compares features, not heads.
Distributed: predictions are gathered with gradients and each rank sums the squared errors of
its own scans (`global_batch_loss`), so DDP's gradient equals one process on the whole batch
even when ranks hold different numbers of scans.
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from hpcbrain.config import MethodSections
from hpcbrain.data.transforms import build_augmentation
from hpcbrain.methods.base import Method, register_method
from hpcbrain.methods.contrastive import build_backbone, global_batch_loss, view_generator
from hpcbrain.models.heads import FeatureExtractor

__all__ = ["Supervised"]


@register_method("supervised")
class Supervised(Method):
    batch_kind = "scans"
    config_section = "supervised"
    ridge_evaluation: ClassVar[bool] = True
    learns_from_age: ClassVar[bool] = True

    def __init__(self, sections: MethodSections) -> None:
        super().__init__()
        self.seed = sections.seed
        self.age_offset = float(sections.own.age_offset)
        self.age_scale = float(sections.own.age_scale)
        if not self.age_scale > 0:
            raise ValueError(f"supervised.age_scale must be > 0, got {self.age_scale}")
        self.backbone, self.feature_dim = build_backbone(sections.model, sections.input_size)
        self.regressor = nn.Linear(self.feature_dim, 1)
        # one view per scan, drawn as the contrastive methods draw theirs
        self.view_transform = build_augmentation(sections.views_augment)

    def encoder(self) -> nn.Module:
        return FeatureExtractor(self.backbone)

    def predict_age(self, x: Tensor) -> Tensor:
        """Ages in years [B] from volumes [B, 1, S, S, S]."""
        return self.regressor(self.backbone(x)).float().reshape(-1) * self.age_scale + self.age_offset

    def forward(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        ref = self.regressor.weight
        x = batch["x"].to(device=ref.device, dtype=ref.dtype, non_blocking=True)
        index = torch.as_tensor(batch.get("index", torch.arange(x.shape[0]))).reshape(-1)
        if self.view_transform is not None:
            x = torch.stack([self.view_transform(item, view_generator(self.seed, self.epoch, int(i)))
                             for item, i in zip(x, index.tolist())])
        age = torch.as_tensor(batch["age"]).to(device=ref.device, dtype=torch.float32).reshape(-1)
        if not bool(torch.isfinite(age).all()):
            raise ValueError(f"supervised: every scan of a batch needs a finite age "
                             f"(got {age.tolist()})")
        target = ((age - self.age_offset) / self.age_scale).reshape(-1, 1)
        prediction = self.regressor(self.backbone(x)).float()

        def squared_error_sum(pred_all: Tensor, target_all: Tensor, anchors: Tensor) -> Tensor:
            return ((pred_all[anchors] - target_all[anchors]) ** 2).sum()

        with torch.autocast(device_type=prediction.device.type, enabled=False):
            loss = global_batch_loss(squared_error_sum, prediction, target)
        return {"loss": loss}
