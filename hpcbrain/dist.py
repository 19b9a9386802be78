"""Process-group helpers that also work without a process group (a single process).

Every helper here is a no-op or an identity when torch.distributed is not initialised, so the
method and engine code is written once for one process and for many.
"""
from __future__ import annotations

import torch
import torch.distributed as torch_dist


def is_initialized() -> bool:
    return torch_dist.is_available() and torch_dist.is_initialized()


def rank() -> int:
    return torch_dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return torch_dist.get_world_size() if is_initialized() else 1


def is_global_rank0() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_initialized():
        torch_dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (a copy; the input is left alone)."""
    if not is_initialized():
        return tensor
    total = tensor.clone()
    torch_dist.all_reduce(total, op=torch_dist.ReduceOp.SUM)
    return total
