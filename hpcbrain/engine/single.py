"""The engine interface and its one-process implementation.

An engine runs optimisation steps of a method and owns what is engine-specific: the wrapper
around the method (none, DDP, DeepSpeed), the optimizer, precision, gradient accumulation and
clipping, and the checkpoint format. Every engine offers:

* ``train_step(batch, where) -> losses``: one micro-batch forward + backward; the optimizer
  steps every ``grad_accum_steps`` micro-batches. Raises `NonFiniteLossError` (on every rank
  alike) before a NaN/Inf loss touches the parameters;
* ``validation_step(batch) -> losses`` (no state change);
* ``save_checkpoint(run_dir, global_step, client_state) -> path`` (call on EVERY rank) and
  ``load_checkpoint(run_dir) -> client_state | None`` (the run folder's latest, if any);
* ``write_parameter(param, value)``: give a parameter a new value outside the optimizer
  (LSOR's k-means SOM initialisation), in the model AND in any copy the optimizer keeps, with
  the parameter's optimizer moments reset. Engines install it on the method as
  ``method.set_parameter_writer``;
* ``export_method(build) -> method`` (call on every rank): the trained method, whole and in
  fp32, for evaluation and export on rank 0 (DeepSpeed: a fresh `build()` loaded with the fp32
  master weights, gathered from the ZeRO partitions);
* ``latest_checkpoint(run_dir)``, ``lr``, ``full_parameters()`` (a context in which the
  method holds all its parameters: only ZeRO-3 partitions them), and the attributes
  ``method``, ``model`` (what forward runs through), ``optimizer``, ``device``, ``bf16``,
  ``grad_accum_steps``, ``name``.

`SingleEngine` runs in one process (CPU or one GPU); `DDPEngine` (engine/ddp.py) differs only in
its wrapper; `DeepSpeedEngine` (engine/deepspeed.py) delegates the step to DeepSpeed.
"""
from __future__ import annotations

import contextlib
import resource
import weakref
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from hpcbrain import dist
from hpcbrain.engine import checkpoint
from hpcbrain.engine.optimizer import build_optimizer
from hpcbrain.engine.registry import engines_of_kind, other_checkpoints, register_engine


class NonFiniteLossError(FloatingPointError):
    """A loss became NaN or Inf: stop before the optimizer corrupts the parameters."""


class CheckpointMismatchError(RuntimeError):
    """The run folder holds checkpoints another engine wrote."""


def refuse_other_checkpoints(run_dir: Path, engine: type, name: str) -> None:
    """Before a fresh start: refuse a run folder holding another kind of engine's checkpoints
    (resuming would silently restart from step 0)."""
    other = other_checkpoints(run_dir, engine)
    if other is not None:
        kind, path = other
        raise CheckpointMismatchError(
            f"{run_dir} holds {kind} checkpoints ({path}) but engine.name={name}: resume with "
            f"engine.name={' or '.join(engines_of_kind(kind))}, or start a new run with another "
            f"run.name")


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v
            for k, v in batch.items()}


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process: allocated CUDA memory on a GPU, max RSS on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def check_finite(losses: dict[str, torch.Tensor], where: str) -> None:
    """Raise NonFiniteLossError on EVERY rank when the loss is not finite on ANY rank.

    With a process group the flags are all-reduced (one scalar), so no rank raises alone and
    leaves the others waiting in the gradient all-reduce until the timeout."""
    bad = 0.0 if torch.isfinite(losses["loss"].detach()).all() else 1.0
    flags = torch.zeros(max(dist.world_size(), 1), dtype=torch.float32)
    flags[dist.rank()] = bad
    if dist.world_size() > 1:
        flags = dist.all_reduce_sum(flags.to(losses["loss"].device)).cpu()
    if flags.sum() == 0:
        return
    detail = ", ".join(f"{k}={float(v.detach().float().mean()):.4g}" for k, v in losses.items())
    ranks = [r for r in range(len(flags)) if flags[r] > 0]
    on = f" on rank(s) {ranks}" if dist.world_size() > 1 else ""
    local = f" ({detail})" if bad else ""
    raise NonFiniteLossError(f"non-finite loss at {where}{on}{local}")


def set_group_lrs(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every parameter group of `optimizer` at `lr` × its ``lr_scale``."""
    for group in optimizer.param_groups:
        group["lr"] = float(lr) * float(group.get("lr_scale", 1.0))


class ParameterWriter:
    """What an engine installs with `method.set_parameter_writer`: calls the engine's
    `write_parameter`. It holds the engine weakly and copies/pickles as None, so a deep copy or
    pickle of the method never drags the engine (optimizer, process groups) along."""

    def __init__(self, engine: Any):
        self._engine = weakref.ref(engine)

    def __call__(self, param: nn.Parameter, value: torch.Tensor) -> None:
        engine = self._engine()
        if engine is None:
            with torch.no_grad():
                param.data.copy_(value.to(device=param.device, dtype=param.dtype))
        else:
            engine.write_parameter(param, value)

    def __deepcopy__(self, memo: dict) -> None:
        return None

    def __reduce__(self):
        return (type(None), ())


@register_engine("single")
class SingleEngine:
    """One process: forward, finite check, backward, (clip), optimizer step."""

    # `name` is set by register_engine; what the registry asks of an engine (hpcbrain/engine/registry.py)
    needs_process_group = False
    multi_process = False
    bf16_is_autocast = True
    channels_last = True
    checkpoint_kind = "single/DDP"

    @classmethod
    def build(cls, engine: Any, train: Any, method: nn.Module, device: torch.device,
              bf16: bool):
        """From the `engine` and `train` config sections (clipping, accumulation; the
        optimizer's lr and weight decay)."""
        grad_clip = float(engine.grad_clip) if engine.grad_clip else None
        return cls(method, build_optimizer(train, method), device, bf16, grad_clip,
                   int(engine.grad_accum_steps))

    @staticmethod
    def process_group_initializer():
        return None                      # torch's own init_process_group

    @staticmethod
    def find_checkpoint(run_dir: Path) -> Path | None:
        return checkpoint.latest_checkpoint(run_dir)

    def __init__(self, method: nn.Module, optimizer: torch.optim.Optimizer,
                 device: torch.device, bf16: bool, grad_clip: float | None = None,
                 grad_accum_steps: int = 1):
        if grad_accum_steps < 1:
            raise ValueError(f"engine.grad_accum_steps must be >= 1, got {grad_accum_steps}")
        self.method = method
        self.model: nn.Module = method   # distributed engines put their wrapper here
        self.optimizer = optimizer
        self.device = device
        self.bf16 = bf16
        self.grad_clip = grad_clip
        self.grad_accum_steps = int(grad_accum_steps)
        self._micro_step = 0             # micro-batches since the last optimizer step
        method.set_parameter_writer(ParameterWriter(self))

    @torch.no_grad()
    def write_parameter(self, param: nn.Parameter, value: torch.Tensor) -> None:
        """New value for `param`; its optimizer state starts afresh (as for a new parameter)."""
        param.data.copy_(value.to(device=param.device, dtype=param.dtype))
        self.optimizer.state.pop(param, None)

    def disable_bf16(self) -> None:
        self.bf16 = False

    def autocast(self):
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def _sync_gradients(self, boundary: bool):
        """DDP skips its gradient all-reduce between accumulation boundaries."""
        return contextlib.nullcontext()

    def train_step(self, batch: dict[str, Any], where: str) -> dict[str, torch.Tensor]:
        self.model.train()
        if self._micro_step == 0:
            self.optimizer.zero_grad(set_to_none=True)
        batch = self.method.prepare_batch(to_device(batch, self.device))
        with self.autocast():
            losses = self.model(batch)
        check_finite(losses, where)
        boundary = self._micro_step + 1 == self.grad_accum_steps
        with self._sync_gradients(boundary):
            # Averaging micro-batch losses makes accumulated gradients those of the whole batch.
            (losses["loss"] / self.grad_accum_steps).backward()
        if boundary:
            if self.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.method.parameters(), self.grad_clip)
            self.optimizer.step()
            self._micro_step = 0
        else:
            self._micro_step += 1
        return {k: v.detach() for k, v in losses.items()}

    @torch.no_grad()
    def validation_step(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        self.method.eval()
        with self.autocast():
            return self.method.validation_step(to_device(batch, self.device))

    def full_parameters(self):
        return contextlib.nullcontext()

    def export_method(self, build: Callable[[], nn.Module]) -> nn.Module:
        return self.method

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def set_lr(self, lr: float) -> None:
        set_group_lrs(self.optimizer, lr)

    def state_dict(self) -> dict[str, Any]:
        return {"method": self.method.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.method.load_state_dict(state["method"])
        self.optimizer.load_state_dict(state["optimizer"])

    # --- checkpoints: one torch file, written atomically by global rank 0 --------------------
    def latest_checkpoint(self, run_dir: Path) -> Path | None:
        return checkpoint.latest_checkpoint(run_dir)

    def save_checkpoint(self, run_dir: Path, global_step: int,
                        client_state: dict[str, Any]) -> Path:
        """Call on every rank: rank 0 writes, the others wait so nobody races ahead of the file."""
        path = checkpoint.checkpoint_path(run_dir, global_step)
        checkpoint.check_finite_everywhere(
            self.method.state_dict(), f"checkpoint at global step {global_step} not written",
            self.device)
        if dist.is_global_rank0():
            checkpoint.save_atomic({"engine": self.state_dict(), **client_state}, path)
        dist.barrier()
        return path

    def load_checkpoint(self, run_dir: Path) -> dict[str, Any] | None:
        # CPU first: RNG states must stay CPU tensors; load_state_dict moves the rest.
        found = checkpoint.load_newest_good(run_dir, map_location="cpu")
        if found is None:
            refuse_other_checkpoints(run_dir, type(self), self.name)
            return None
        path, state = found
        self.load_state_dict(state["engine"])
        self._micro_step = 0
        state["path"] = path
        return state
