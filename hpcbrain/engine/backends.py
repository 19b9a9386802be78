"""Engines: how one optimisation step is run. The method code is the same for every engine.

    engine = build_engine(cfg, method, device)    # after hpcbrain.process_group.setup_distributed(...)

`engine.name` picks one of

* ``single``    — one process (engine/single.py);
* ``ddp``       — DistributedDataParallel (engine/ddp.py);
* ``deepspeed`` — DeepSpeed ZeRO 0–3 (engine/deepspeed.py);
* ``auto``      — ``ddp`` when the launcher started more than one process, else ``single``.

They share one interface (see engine/single.py). The optimizer is always a torch Adam with
train.lr and train.weight_decay, so a given config optimises the same way in every engine.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from hpcbrain import dist
from hpcbrain.engine.precision import bf16_supported, use_bf16
from hpcbrain.engine.single import (
    CheckpointMismatchError,
    NonFiniteLossError,
    SingleEngine,
    check_finite,
    peak_memory_mb,
    to_device,
)

__all__ = ["ENGINES", "build_engine", "resolve_engine_name", "needs_process_group",
           "SingleEngine", "NonFiniteLossError", "CheckpointMismatchError", "bf16_supported",
           "check_finite", "peak_memory_mb", "to_device", "use_bf16"]

ENGINES = ("single", "ddp", "deepspeed")


def resolve_engine_name(name: str, world_size: int) -> str:
    """The engine `engine.name` means for a world of `world_size` processes."""
    if name == "auto":
        return "ddp" if world_size > 1 else "single"
    if name not in ENGINES:
        raise ValueError(f"engine.name must be auto, {', '.join(ENGINES)}; got {name!r}")
    if name == "single" and world_size > 1:
        raise ValueError(f"engine.name=single but the launcher started {world_size} processes: "
                         f"use engine.name=ddp or deepspeed (or auto), or start one process")
    return name


def needs_process_group(name: str) -> bool:
    """DDP and DeepSpeed need a process group even for one process."""
    return name in ("ddp", "deepspeed")


def build_optimizer(cfg: Any, method: nn.Module) -> torch.optim.Optimizer:
    """Adam over the method's parameter groups, each at train.lr × its ``lr_scale``."""
    groups = [{**group, "lr": float(cfg.train.lr) * float(group.get("lr_scale", 1.0))}
              for group in method.parameter_groups()]
    return torch.optim.Adam(groups, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)


def build_engine(cfg: Any, method: nn.Module, device: torch.device):
    """The engine `cfg.engine` asks for, around `method` (already on `device`)."""
    name = resolve_engine_name(cfg.engine.name, dist.world_size())
    # rank 0's verdict for every rank: ranks on differing hardware must not train in two
    # precisions
    bf16 = bool(dist.broadcast_object(use_bf16(cfg.train.precision, device, name)
                                      if dist.is_global_rank0() else None))
    optimizer = build_optimizer(cfg, method)
    grad_clip = float(cfg.engine.grad_clip) if cfg.engine.grad_clip else None
    accum = int(cfg.engine.grad_accum_steps)
    if name == "single":
        return SingleEngine(method, optimizer, device, bf16, grad_clip, accum)
    if name == "ddp":
        from hpcbrain.engine.ddp import DDPEngine

        return DDPEngine(method, optimizer, device, bf16, grad_clip, accum)
    from hpcbrain.engine.deepspeed import DeepSpeedEngine, deepspeed_config

    keep = method.fp32_buffers
    return DeepSpeedEngine(method, optimizer, device,
                           deepspeed_config(cfg, dist.world_size(), bf16, keep))
