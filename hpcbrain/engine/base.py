"""The contract between the trainer and an engine (single process, DDP, DeepSpeed ZeRO 0–3).

The trainer drives any object with these members and nothing else; each engine owns its
wrapper, optimizer, precision and checkpoint format. Methods never see the engine: the one way
back is the parameter writer an engine installs (`Method.set_parameter_writer`).
"""
from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Callable, Protocol, runtime_checkable

import torch
from torch import nn

__all__ = ["Engine"]


@runtime_checkable
class Engine(Protocol):
    name: str                      # single | ddp | deepspeed
    method: nn.Module              # the unwrapped `Method` (what checkpoints and exports hold);
                                   # engine/ imports no method module
    device: torch.device
    bf16: bool                     # steps run in bf16 (autocast, or DeepSpeed's bf16 weights)
    bf16_is_autocast: bool         # bf16 is autocast over fp32 weights: it can be turned off
    grad_accum_steps: int          # micro-batches per optimizer step

    def train_step(self, batch: dict[str, Any], where: str) -> dict[str, torch.Tensor]:
        """One micro-batch: forward, finite check (naming `where`), backward, and at every
        `grad_accum_steps`-th call the optimizer step. Returns the detached losses."""

    def disable_bf16(self) -> None:
        """Train in fp32 from the next step (only where `bf16_is_autocast`: the trainer's
        first-batch kernel probe, engine/bf16_check.py)."""

    def validation_step(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The method's validation losses in eval mode, no state changed."""

    @property
    def lr(self) -> float:
        """The base learning rate in force (the first parameter group's)."""

    def set_lr(self, lr: float) -> None:
        """Base learning rate `lr` for every parameter group, times the group's ``lr_scale``,
        wherever this engine's optimizer keeps it."""

    def write_parameter(self, param: torch.nn.Parameter, value: torch.Tensor) -> None:
        """A new value for `param` outside the optimizer; its optimizer state starts afresh."""

    def full_parameters(self) -> AbstractContextManager:
        """Within it, every rank sees the whole parameters (ZeRO-3 gathers them)."""

    def export_method(self, build: Callable[[], nn.Module]) -> nn.Module:
        """The trained method whole and in fp32 (a collective under ZeRO: every rank calls)."""

    def latest_checkpoint(self, run_dir: Path) -> Path | None: ...

    def save_checkpoint(self, run_dir: Path, global_step: int,
                        client_state: dict[str, Any]) -> Path:
        """Every rank calls it; the engine decides who writes what."""

    def load_checkpoint(self, run_dir: Path) -> dict[str, Any] | None:
        """Restore the newest checkpoint of `run_dir`; its client state, or None if none."""
