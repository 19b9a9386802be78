"""Activation checkpointing (``train.activation_checkpointing``): trade compute for memory.

A network that inherits `ActivationCheckpointing` runs its segments (an encoder's or decoder's
blocks, a ResNet's stem and stages) through `segment`: with checkpointing on, a segment keeps
only its input for the backward pass and recomputes its inside then (torch's non-reentrant
``torch.utils.checkpoint``), so activation memory falls from every layer's saved tensors to the
segments' inputs, for about one more forward pass of compute.

Same loss, same gradients: the recomputation runs the same operations on the same input (the
RNG state is restored; no network here draws random numbers anyway). BatchNorm would update its
running statistics a second time during the recomputation; `_running_statistics_kept` puts
them back, so the model's buffers also equal a run without checkpointing. Checkpointing acts
only when autograd records (training); evaluation and export run the plain forward.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Iterator

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.checkpoint import checkpoint

__all__ = ["ActivationCheckpointing", "set_activation_checkpointing"]


@contextmanager
def _running_statistics_kept(module: nn.Module) -> Iterator[None]:
    """The recomputation's context: BatchNorm buffers of `module` restored when it ends."""
    buffers = [buffer for m in module.modules() if isinstance(m, _BatchNorm)
               for buffer in (m.running_mean, m.running_var, m.num_batches_tracked)
               if buffer is not None]
    saved = [buffer.clone() for buffer in buffers]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in zip(buffers, saved):
                buffer.copy_(value)


class ActivationCheckpointing:
    """Mixin of the networks that can checkpoint their segments (see the module doc)."""

    activation_checkpointing: bool = False

    def segment(self, module: nn.Module, x: Tensor) -> Tensor:
        """`module(x)`, checkpointed when switched on and autograd is recording."""
        if not (self.activation_checkpointing and torch.is_grad_enabled()):
            return module(x)
        return checkpoint(module, x, use_reentrant=False,
                          context_fn=lambda: (nullcontext(), _running_statistics_kept(module)))


def set_activation_checkpointing(model: nn.Module, enabled: bool = True) -> int:
    """Switch checkpointing on (or off) in every network of `model` that can; returns how many
    networks it switched (0: nothing in `model` checkpoints — its method's networks are small)."""
    networks = [m for m in model.modules() if isinstance(m, ActivationCheckpointing)]
    for network in networks:
        network.activation_checkpointing = bool(enabled)
    return len(networks)
