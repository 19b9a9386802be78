"""DistributedDataParallel: the one-process engine with the method wrapped in DDP.

* Gradients are averaged over ranks in backward (bucketed all-reduce overlapping the backward).
  Each rank holds `train.batch_size / (world · grad_accum_steps)` items per micro-batch, so one
  optimizer step sees the global batch `train.batch_size`.
* `find_unused_parameters` comes from the method class: LSOR's grid G gets no gradient during
  its reconstruction-only warm-up, so LSOR sets it.
* BatchNorm stays local: batch statistics are computed over each rank's micro-batch (SyncBatchNorm
  refuses CPU tensors, and its extra all-reduce per BN layer would cost more than it gives for
  these batch sizes). Running statistics are broadcast from rank 0 at every forward
  (DDP's `broadcast_buffers`), so every rank holds the same model for evaluation; the method's
  own buffers (LSOR's ΔG and `initialised`) are identical on all ranks anyway.
* Checkpoints: the same single torch file as `SingleEngine` (rank 0 writes atomically), holding
  the unwrapped method's state, so single and DDP runs resume each other.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from hpcbrain import dist
from hpcbrain.engine.registry import register_engine
from hpcbrain.engine.single import SingleEngine


@register_engine("ddp")
class DDPEngine(SingleEngine):
    needs_process_group = True
    multi_process = True

    def __init__(self, method: nn.Module, optimizer: torch.optim.Optimizer,
                 device: torch.device, bf16: bool, grad_clip: float | None = None,
                 grad_accum_steps: int = 1):
        if not dist.is_initialized():
            raise RuntimeError("engine.name=ddp needs a process group: call "
                               "hpcbrain.process_group.setup_distributed(require_group=True) first")
        super().__init__(method, optimizer, device, bf16, grad_clip, grad_accum_steps)
        self.model = DistributedDataParallel(
            method,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=bool(method.find_unused_parameters),
        )

    def _sync_gradients(self, boundary: bool):
        return contextlib.nullcontext() if boundary else self.model.no_sync()
