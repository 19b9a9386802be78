"""Engines: how one optimisation step is run. The method code is the same for every engine.

`SingleEngine` runs in one process (CPU or one GPU). Distributed engines wrap the same method
and keep the same interface: `train_step`, `state_dict`, `load_state_dict`.
"""
from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn


class NonFiniteLossError(FloatingPointError):
    """A loss became NaN or Inf: stop before the optimizer corrupts the parameters."""


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v
            for k, v in batch.items()}


def bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    # On CPU bf16 only pays off with AMX tiles; without them autocast is slower than fp32.
    try:
        with open("/proc/cpuinfo") as handle:
            return "amx_bf16" in handle.read()
    except OSError:
        return False


def use_bf16(precision: str, device: torch.device) -> bool:
    if precision == "fp32":
        return False
    if precision == "bf16":
        return True
    if precision == "auto":
        return bf16_supported(device)
    raise ValueError(f"train.precision must be auto, bf16 or fp32, not {precision!r}")


class SingleEngine:
    """One process: forward, finite check, backward, optimizer step."""

    name = "single"

    def __init__(self, method: nn.Module, optimizer: torch.optim.Optimizer,
                 device: torch.device, bf16: bool, grad_clip: float | None = None):
        self.method = method
        self.model: nn.Module = method   # distributed engines put their wrapper here
        self.optimizer = optimizer
        self.device = device
        self.bf16 = bf16
        self.grad_clip = grad_clip

    def autocast(self):
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def train_step(self, batch: dict[str, Any], where: str) -> dict[str, torch.Tensor]:
        self.model.train()
        with self.autocast():
            losses = self.model(to_device(batch, self.device))
        loss = losses["loss"]
        if not torch.isfinite(loss.detach()):
            detail = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in losses.items())
            raise NonFiniteLossError(f"non-finite loss at {where} ({detail})")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.method.parameters(), self.grad_clip)
        self.optimizer.step()
        return {k: v.detach() for k, v in losses.items()}

    @torch.no_grad()
    def validation_step(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        self.method.eval()
        with self.autocast():
            return self.method.validation_step(to_device(batch, self.device))

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def state_dict(self) -> dict[str, Any]:
        return {"method": self.method.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.method.load_state_dict(state["method"])
        self.optimizer.load_state_dict(state["optimizer"])
