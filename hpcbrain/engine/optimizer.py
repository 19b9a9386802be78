"""The optimizer every engine steps: a torch Adam with train.lr and train.weight_decay, so a
given config optimises the same way in every engine."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["build_optimizer"]


def build_optimizer(train: Any, method: nn.Module) -> torch.optim.Optimizer:
    """Adam over the method's parameter groups, each at the `train` section's lr × its
    ``lr_scale``, with its weight decay."""
    groups = [{**group, "lr": float(train.lr) * float(group.get("lr_scale", 1.0))}
              for group in method.parameter_groups()]
    return torch.optim.Adam(groups, lr=train.lr, weight_decay=train.weight_decay)
