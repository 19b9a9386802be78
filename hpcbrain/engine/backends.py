"""Engines: how one optimisation step is run. The method code is the same for every engine.

    engine = build_engine(engine_section, train_section, method, device)   # after setup_distributed

`engine.name` picks a registered engine (`hpcbrain.engine.registry`):

* ``single``    — one process (engine/single.py);
* ``ddp``       — DistributedDataParallel (engine/ddp.py);
* ``deepspeed`` — DeepSpeed ZeRO 0–3 (engine/deepspeed.py);
* ``auto``      — ``ddp`` when the launcher started more than one process, else ``single``.

They share one interface (engine/base.py). The optimizer is always a torch Adam with
train.lr and train.weight_decay (engine/optimizer.py), so a given config optimises the same way
in every engine.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from hpcbrain import dist
from hpcbrain.engine.optimizer import build_optimizer
from hpcbrain.engine.precision import bf16_supported, use_bf16
from hpcbrain.engine.registry import (
    engine_class_for,
    engine_names,
    get_engine_class,
    resolve_engine_name,
)
from hpcbrain.engine.single import (
    CheckpointMismatchError,
    NonFiniteLossError,
    SingleEngine,
    check_finite,
    peak_memory_mb,
    to_device,
)

__all__ = ["engine_names", "build_engine", "resolve_engine_name", "needs_process_group",
           "SingleEngine", "NonFiniteLossError", "CheckpointMismatchError", "bf16_supported",
           "check_finite", "peak_memory_mb", "to_device", "use_bf16", "build_optimizer",
           "engine_class_for"]


def needs_process_group(name: str) -> bool:
    """Whether `engine.name` needs a process group even for one process (auto: only when the
    launcher started several, which makes one anyway)."""
    cls = engine_class_for(name)
    return bool(cls is not None and cls.needs_process_group)


def build_engine(engine: Any, train: Any, method: nn.Module, device: torch.device):
    """The engine the `engine` config section asks for, around `method` (already on `device`),
    its precision and optimizer from the `train` section."""
    cls = get_engine_class(resolve_engine_name(engine.name, dist.world_size()))
    # rank 0's verdict for every rank: ranks on differing hardware must not train in two
    # precisions
    bf16 = bool(dist.broadcast_object(
        use_bf16(train.precision, device, autocast=cls.bf16_is_autocast)
        if dist.is_global_rank0() else None))
    return cls.build(engine, train, method, device, bf16)
