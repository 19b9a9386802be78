"""Does this host compute bf16 right for this method's layers? Asked once, on the first batch,
before `train.precision=auto` trains in bf16 under autocast.

Why a check and not only a rule: torch 2.13's oneDNN 3.12 computes the *weight* gradient of a
bf16 Conv3d wrongly on an AVX512-BF16 CPU (AMD EPYC Zen 4) when the input is 2 voxels wide:
~100 % off on every call, now and then 1e17-1e35, while the forward pass and the input gradient
are right and 1, 3 or 4 voxels wide is right. Which channel counts fail depends on the layout
(16 and more in the standard one; 4 and 8 as well in the channels-last layout training uses),
i.e. on oneDNN's kernel choice (`bench/cpu_bf16.py` prints the probe). A ResNet at 32³ (layer3)
or 64³ (layer4) has such layers, and Adam turns one 1e35 gradient into NaN weights a few steps
later (forced bf16: AdapN, NNCLR 0 of 3 smoke runs survived, the other ResNet methods 1-2);
LSOR's autoencoder at 32³ and 64³ has none (its 2³ layer at 32³ runs at full precision). A flag
in /proc/cpuinfo cannot know this, and a whole-model gradient comparison cannot tell it from
bf16's honest noise (a contrastive loss at initialisation puts some BatchNorm gradients 40-70 %
off in bf16).

So each layer with a numerical kernel (convolutions, linear, normalisation) that runs under
autocast in the method's forward is run alone, at the input shape, dtype and layout it saw
(batch at most `PROBE_BATCH`), on random input: forward and backward in bf16 autocast and in
fp32 on the same bf16-rounded input. Right kernels agree to bf16's rounding (0.2-0.7 %
relative, measured on every method); the broken ones are ~100 % off or worse. A layer fails
when its output, input gradient or any parameter gradient is off by `MAX_RELATIVE_ERROR` (5 %)
or more, or is not finite.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from hpcbrain.engine.backends import to_device
from hpcbrain.engine.base import Engine

__all__ = ["MAX_RELATIVE_ERROR", "PROBE_BATCH", "KernelProbe", "keep_bf16_only_if_right",
           "probe_bf16_kernels", "probe_layer"]

MAX_RELATIVE_ERROR = 0.05
PROBE_BATCH = 4
#: Layers whose arithmetic runs in a library kernel that bf16 changes. Element-wise layers
#: (activations, pooling, dropout) round like their inputs and are not probed.
PROBED_LAYERS = (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._BatchNorm,
                 nn.GroupNorm, nn.LayerNorm)


@dataclass(frozen=True)
class KernelProbe:
    """The worst layer: where bf16 is furthest from fp32 on this host."""
    worst_layer: str = ""
    worst_shape: tuple[int, ...] = ()
    worst_relative_error: float = 0.0        # inf where bf16 gave a non-finite value
    layers_probed: int = 0
    errors: dict[str, float] = field(default_factory=dict)   # layer name → its worst error

    @property
    def bf16_is_right(self) -> bool:
        return self.worst_relative_error < MAX_RELATIVE_ERROR


def _relative_error(got: torch.Tensor | None, want: torch.Tensor | None) -> float:
    if got is None or want is None:
        return 0.0
    got, want = got.double(), want.double()
    if not torch.isfinite(got).all():
        return float("inf")
    scale = want.norm()
    return float((got - want).norm() / scale) if scale > 0 else float(got.norm() > 0)


def probe_layer(layer: nn.Module, input_shape: tuple[int, ...],
                input_dtype: torch.dtype = torch.float32, channels_last: bool = False,
                seed: int = 0) -> float:
    """The worst relative error of `layer`'s output, input gradient and parameter gradients in
    bf16 autocast, fed `input_dtype` (what it gets in the method: a BatchNorm after a bf16
    convolution gets bf16), against fp32, on random input of `input_shape` (the batch cut to
    PROBE_BATCH; in the channels-last layout if `channels_last`). `layer` itself is not
    changed (a copy runs, in its weights' layout, BatchNorm statistics included)."""
    generator = torch.Generator().manual_seed(seed)
    shape = (min(input_shape[0], PROBE_BATCH), *input_shape[1:])
    device = next(layer.parameters()).device
    x = torch.randn(shape, generator=generator).to(device).bfloat16().float()
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    results = []
    for bf16 in (True, False):
        probe = copy.deepcopy(layer).float().train()
        params = [p for p in probe.parameters() if p.requires_grad]
        x_in = (x.to(input_dtype) if bf16 else x.clone()).requires_grad_()
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
            out = probe(x_in)
        upstream = torch.randn(out.shape, generator=generator.manual_seed(seed + 1)).to(device)
        grads = torch.autograd.grad(out.float(), [x_in, *params], upstream, allow_unused=True)
        results.append([out.detach(), *grads])
    return max(_relative_error(got, want) for got, want in zip(*results))


def _channels_last(x: torch.Tensor) -> bool:
    return x.dim() == 5 and not x.is_contiguous() and \
        x.is_contiguous(memory_format=torch.channels_last_3d)


def _weights_channels_last(layer: nn.Module) -> bool:
    weight = getattr(layer, "weight", None)
    return isinstance(weight, torch.Tensor) and _channels_last(weight)


def _layers_under_autocast(method: nn.Module, batch: dict[str, Any]
                           ) -> list[tuple[str, nn.Module, tuple[int, ...], torch.dtype, bool]]:
    """(name, layer, input shape, dtype, channels-last) of each probed layer that the method's
    forward runs under bf16 autocast (not those it runs at full precision), first call each.
    The forward's effect on the method's state (BatchNorm statistics, queues) and on the RNG is
    undone."""
    device = next(method.parameters()).device
    device_type = device.type
    seen: dict[str, tuple[nn.Module, tuple[int, ...], torch.dtype, bool]] = {}
    handles = []
    for name, module in method.named_modules():
        if isinstance(module, PROBED_LAYERS) and next(module.parameters(), None) is not None:
            def note(module, inputs, output, name=name):
                if name not in seen and torch.is_autocast_enabled(device_type) and inputs \
                        and isinstance(inputs[0], torch.Tensor):
                    x = inputs[0]
                    seen[name] = (module, tuple(x.shape), x.dtype, _channels_last(x))
            handles.append(module.register_forward_hook(note))
    state = copy.deepcopy(method.state_dict())
    # the RNG streams the forward may draw from (a VAE's noise): the CPU's and this GPU's
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        try:
            with torch.no_grad(), torch.autocast(device_type=device_type, dtype=torch.bfloat16):
                method(batch)
        finally:
            for handle in handles:
                handle.remove()
            method.load_state_dict(state)
    return [(name, *found) for name, found in seen.items()]


def probe_bf16_kernels(method: nn.Module, batch: dict[str, Any]) -> KernelProbe:
    """Every layer the method runs in bf16 on `batch` (prepared, on the method's device),
    probed alone; the same layer configuration at the same shape once. Runs the method's
    forward once (a loss gathered over ranks included): call it on every rank."""
    was_training = method.training
    method.train()
    try:
        layers = _layers_under_autocast(method, batch)
    finally:
        method.train(was_training)
    errors: dict[str, float] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    done: dict[tuple, float] = {}
    for name, layer, shape, dtype, channels_last in layers:
        key = (repr(layer), shape, dtype, channels_last, _weights_channels_last(layer))
        if key not in done:
            done[key] = probe_layer(layer, shape, dtype, channels_last)
        errors[name], shapes[name] = done[key], shape
    if not errors:
        return KernelProbe()
    worst = max(errors, key=errors.__getitem__)
    return KernelProbe(worst, shapes[worst], errors[worst], len(errors), errors)


def keep_bf16_only_if_right(engine: Engine, batch: dict[str, Any],
                            worst_over_ranks: Callable[[float], float] = float
                            ) -> tuple[KernelProbe, float] | None:
    """For an engine about to train in bf16 autocast: probe its method on `batch` (as the loader
    gives it; prepared here as `train_step` prepares it) and turn bf16 off when the worst error,
    taken over ranks by `worst_over_ranks` (a collective: call on every rank), is
    `MAX_RELATIVE_ERROR` or more. Returns this rank's probe and the worst over ranks, or None
    where there is nothing to decide (fp32 already, or DeepSpeed's bf16 weights)."""
    if not (engine.bf16 and engine.bf16_is_autocast):
        return None
    method = engine.method
    found = probe_bf16_kernels(method, method.prepare_batch(to_device(batch, engine.device)))
    worst = worst_over_ranks(found.worst_relative_error)
    if not worst < MAX_RELATIVE_ERROR:
        engine.disable_bf16()
    return found, worst
