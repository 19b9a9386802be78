"""torch.distributed for hpcbrain's methods and engines: rank queries and every collective.

Every helper is an identity or a no-op when no group is up, so method and engine code is
written once for one process and for many. Starting and ending the group (and rank-aware
logging) is `hpcbrain.process_group`.
"""
from __future__ import annotations

import contextlib
import os
from datetime import timedelta
from typing import Any, Callable, Iterator, Optional

import torch
import torch.distributed as torch_dist


class CollectiveFailed(RuntimeError):
    """A collective did not complete: another rank stopped (its connection closed), hung or
    is far behind (the wait timed out)."""


_timeout_minutes: Optional[float] = None    # what `set_timeout` last set (None: the group's own)
_phase: Optional[str] = None                # what the ranks are doing (`timeout(..., phase)`)


def set_timeout(minutes: float) -> None:
    """How long every later collective of the default group waits for the other ranks."""
    global _timeout_minutes
    if is_initialized():
        from torch.distributed.distributed_c10d import _set_pg_timeout

        _set_pg_timeout(timedelta(minutes=float(minutes)), None)
    _timeout_minutes = float(minutes)


def set_phase(phase: Optional[str]) -> None:
    """What the ranks are doing, for the message of a collective that fails (e.g. "training
    steps")."""
    global _phase
    _phase = phase


@contextlib.contextmanager
def timeout(minutes: float, phase: Optional[str] = None) -> Iterator[None]:
    """`set_timeout(minutes)` (and `set_phase(phase)` when given) for the block, the previous
    ones afterwards."""
    previous, previous_phase = _timeout_minutes, _phase
    set_timeout(minutes)
    if phase is not None:
        set_phase(phase)
    try:
        yield
    finally:
        if previous is not None:
            set_timeout(previous)
        set_phase(previous_phase)


_PEER_FAILURE = ("timed out", "timeout", "connection closed", "connection reset", "broken pipe")


def is_peer_failure(exc: BaseException) -> bool:
    """A backend error that means another rank is gone or stuck (gloo and NCCL wording)."""
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(words in text for words in _PEER_FAILURE)


@contextlib.contextmanager
def named_collective(what: str) -> Iterator[None]:
    """Re-raise a peer failure inside the block as CollectiveFailed naming `what` and the wait."""
    try:
        yield
    except RuntimeError as exc:
        if not is_peer_failure(exc) or isinstance(exc, CollectiveFailed):
            raise
        waited = f"{_timeout_minutes:g} min" if _timeout_minutes is not None else "its timeout"
        during = f" during {_phase}" if _phase else ""
        raise CollectiveFailed(
            f"rank {rank()} of {world_size()}: {what}{during} did not complete within {waited}: another "
            f"rank stopped, hung or is far behind (see its log); engine.step_timeout_minutes / "
            f"engine.timeout_minutes set the waits ({str(exc).splitlines()[0]})") from exc


def is_initialized() -> bool:
    return torch_dist.is_available() and torch_dist.is_initialized()


def rank() -> int:
    return torch_dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return torch_dist.get_world_size() if is_initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0)) if is_initialized() else 0


def is_global_rank0() -> bool:
    return rank() == 0


# ---------------------------------------------------------------------------------------------
# Collectives (identity / no-op without a group)
# ---------------------------------------------------------------------------------------------
def barrier() -> None:
    if is_initialized():
        with named_collective("barrier"):
            torch_dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (a copy; the input is left alone)."""
    if not is_initialized():
        return tensor
    total = tensor.clone()
    with named_collective("all_reduce_sum (a sum over ranks)"):
        torch_dist.all_reduce(total, op=torch_dist.ReduceOp.SUM)
    return total


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """Elementwise max over ranks (a copy)."""
    if not is_initialized():
        return tensor
    out = tensor.clone()
    with named_collective("all_reduce_max (a max over ranks)"):
        torch_dist.all_reduce(out, op=torch_dist.ReduceOp.MAX)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """`obj` of rank `src` on every rank (pickled; for small things like a run id)."""
    if not is_initialized():
        return obj
    box = [obj]
    with named_collective(f"broadcast_object from rank {src}"):
        torch_dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """[obj of rank 0, obj of rank 1, ...] on every rank (pickled; small objects only)."""
    if not is_initialized():
        return [obj]
    out: list[Any] = [None] * world_size()
    with named_collective("all_gather_object (an object from every rank)"):
        torch_dist.all_gather_object(out, obj)
    return out


def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Every buffer of `module` takes rank `src`'s value (one broadcast per dtype): what DDP's
    `broadcast_buffers` does before each forward, for engines that do not (DeepSpeed)."""
    if not is_initialized() or world_size() == 1:
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for buf in module.buffers():
        by_dtype.setdefault(buf.dtype, []).append(buf)
    for bufs in by_dtype.values():
        flat = torch.cat([b.detach().reshape(-1) for b in bufs])
        with named_collective(f"broadcast of the buffers from rank {src}"):
            torch_dist.broadcast(flat, src=src)
        offset = 0
        with torch.no_grad():
            for buf in bufs:
                buf.copy_(flat[offset:offset + buf.numel()].view_as(buf))
                offset += buf.numel()


def gather_rows_to_rank0(local: torch.Tensor) -> Optional[torch.Tensor]:
    """[n_r, C] on each rank → [Σ n_r, C] on rank 0 in rank order (None on the others; the
    input itself without a group). Per-rank row counts may differ: sizes are all-gathered
    first and rows padded to the largest."""
    if not is_initialized() or world_size() == 1:
        return local
    n = torch.tensor([local.shape[0]], dtype=torch.long, device=local.device)
    sizes_t = [torch.zeros_like(n) for _ in range(world_size())]
    with named_collective("all_gather of row counts"):
        torch_dist.all_gather(sizes_t, n)
    sizes = [int(s.item()) for s in sizes_t]
    padded = local.new_zeros((max(max(sizes), 1), local.shape[1]))
    padded[: local.shape[0]] = local
    with named_collective("gather of rows to rank 0"):
        if rank() == 0:
            bufs = [torch.empty_like(padded) for _ in range(world_size())]
            torch_dist.gather(padded, bufs, dst=0)
            return torch.cat([b[:s] for b, s in zip(bufs, sizes)], dim=0)
        torch_dist.gather(padded, None, dst=0)
    return None


def compute_on_rank0(compute: Callable[[], torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """`compute()` runs on rank 0 only and its result (shaped and typed as `like`) reaches
    every rank. Should it raise, every rank raises too (rank 0 its exception, the others a
    RuntimeError) instead of waiting for a broadcast that never comes."""
    if not is_initialized() or world_size() == 1:
        return compute().to(device=like.device, dtype=like.dtype)
    out = torch.zeros_like(like)
    status = torch.zeros(1, dtype=torch.float32, device=like.device)
    error: Optional[BaseException] = None
    if rank() == 0:
        try:
            out.copy_(compute().to(device=like.device, dtype=like.dtype))
            status.fill_(1.0)
        except Exception as exc:  # every rank must learn about it, or they hang
            error = exc
    with named_collective("broadcast of a result computed on rank 0"):
        torch_dist.broadcast(status, src=0)
    if status.item() != 1.0:
        if error is not None:
            raise error
        raise RuntimeError("a computation on rank 0 failed (see rank 0's log)")
    with named_collective("broadcast of a result computed on rank 0"):
        torch_dist.broadcast(out, src=0)
    return out


_MAX_DIMS = 16


class _AllGatherWithGrad(torch.autograd.Function):
    """Forward: rank-ordered concatenation of every rank's x. Backward: every rank's loss may
    use every slice, so the gradient of slice r is the SUM over ranks of their gradients for
    that slice: all_reduce(SUM) the full incoming gradient, then keep our own slice.

    (The common GatherLayer variants return `grad[own slice]` without the all_reduce, i.e. only
    this rank's loss's contribution — wrong as soon as ranks hold different data; see
    lightly-ai/lightly#1528.)"""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        world, me = world_size(), rank()
        if x.dim() == 0 or x.dim() > _MAX_DIMS:
            raise ValueError(f"all_gather_with_grad: need a tensor with 1..{_MAX_DIMS} dims, "
                             f"got shape {tuple(x.shape)}")
        shape = torch.zeros(_MAX_DIMS + 1, dtype=torch.long, device=x.device)
        shape[0] = x.dim()
        shape[1:x.dim() + 1] = torch.tensor(x.shape, dtype=torch.long)
        shapes_t = [torch.empty_like(shape) for _ in range(world)]
        with named_collective("all_gather_with_grad (shapes)"):
            torch_dist.all_gather(shapes_t, shape)
        shapes = [tuple(s[1:int(s[0]) + 1].tolist()) for s in shapes_t]
        if any(s[1:] != shapes[me][1:] for s in shapes):
            raise ValueError("all_gather_with_grad: every rank must pass the same shape apart "
                             f"from the first dimension; got {shapes} (rank order)")
        counts = [s[0] for s in shapes]
        longest = max(counts)
        x = x.contiguous()
        if longest != x.shape[0]:
            padded = x.new_zeros((longest, *x.shape[1:]))
            padded[: x.shape[0]] = x
        else:
            padded = x
        parts = [torch.empty_like(padded) for _ in range(world)]
        with named_collective("all_gather_with_grad (embeddings)"):
            torch_dist.all_gather(parts, padded)
        ctx.start = sum(counts[:me])
        ctx.stop = ctx.start + counts[me]
        return torch.cat([p[:n] for p, n in zip(parts, counts)], dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()   # all_reduce works in place; autograd owns `grad`
        with named_collective("all_gather_with_grad (the gradient's sum over ranks)"):
            torch_dist.all_reduce(grad, op=torch_dist.ReduceOp.SUM)
        return grad[ctx.start:ctx.stop]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """[n, ...] on each rank → [Σ n_r, ...] on every rank, in rank order, differentiable.

    The backward returns to each rank the gradient of its own slice summed over the losses of
    all ranks, so Σ_r loss_r differentiates exactly like one process on the concatenated batch
    (DDP then averages parameter gradients over ranks: the objective is the mean of the
    per-rank losses). First dimensions may differ between ranks (one extra tiny all_gather of
    the shapes per call); the other dimensions must agree. Every rank must call it, in the same
    order, and run backward. The identity without a process group (or with one process).
    """
    if not is_initialized() or world_size() == 1:
        return x
    return _AllGatherWithGrad.apply(x)

