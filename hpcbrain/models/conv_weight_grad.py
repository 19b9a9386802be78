"""A faster weight gradient for 3D convolutions on CPUs whose oneDNN has no direct kernel for
it (``train.conv_weight_grad``).

On a CPU without AVX-512 (AVX2 only: AMD EPYC before Zen 4, older Xeons — what CI and many
login nodes run), oneDNN computes a Conv3d's weight gradient with ``x64:gemm:jit``: im2col,
then a matrix product. im2col of a 64³ batch is gigabytes of memory traffic, and for LSOR's
layers with few output channels the product is nearly a matrix-vector one: measured on a
Sapphire Rapids Xeon limited to AVX2 (``ONEDNN_MAX_CPU_ISA=AVX2``), 2 threads, the decoder's
last convolution (16 → 1 channels, 64³, 16 volumes) takes 7.9 s for its weight gradient and
0.21 s for its input gradient (`bench/README.md`).

The same gradient is a forward convolution with the roles of batch and channels swapped:

    dL/dW[o, i, k] = Σ_n Σ_v x[n, i, v + k] · g[n, o, v]
                   = conv3d(input = xᵀ [Cin, N, …], weight = gᵀ [Cout, N, …], padding)[i, o, k]

a "convolution" whose kernel is the whole gradient volume and whose output is the 3 × 3 × 3
kernel — which oneDNN's forward kernels (brgconv) run well on AVX2: 2.6 s for that layer, 0.50
s instead of 3.35 s for the 16 → 32 one at 32³. Same values up to summation order (relative
differences ~1e-5, tested). The input gradient stays oneDNN's own (fast).

`SwappedWeightGradConv3d` is an `nn.Conv3d` (same parameters, same state dict) that takes this
path when switched on, for stride-1, ungrouped, undilated convolutions on the CPU in fp32
(outside autocast); anywhere else it is a plain Conv3d. `auto` measures both ways once per CPU
model and thread count on a layer of LSOR's shape (`weight_grad_speedup`) and switches it on
where it is at least `MIN_SPEEDUP` faster; with AVX-512 oneDNN has direct kernels and `auto`
keeps them.
"""
from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["SwappedWeightGradConv3d", "set_swapped_weight_grad", "weight_grad_speedup",
           "MIN_SPEEDUP"]

MIN_SPEEDUP = 1.2


class _SwappedWeightGrad(torch.autograd.Function):
    """conv3d(x, weight, bias, padding); backward: oneDNN's input gradient, the weight
    gradient as the swapped forward convolution (module doc)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, padding: tuple[int, ...]):
        ctx.save_for_backward(x, weight)
        ctx.padding = padding
        ctx.has_bias = bias is not None
        return F.conv3d(x, weight, bias, padding=padding)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.convolution_backward(
                grad, x, weight, None, [1, 1, 1], list(ctx.padding), [1, 1, 1], False,
                [0, 0, 0], 1, [True, False, False])[0]
        if ctx.needs_input_grad[1]:
            grad_w = F.conv3d(x.transpose(0, 1), grad.transpose(0, 1),
                              padding=ctx.padding).transpose(0, 1)
            grad_w = grad_w.contiguous(memory_format=_format_of(weight))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.sum(dim=(0, 2, 3, 4))
        return grad_x, grad_w, grad_b, None


def _format_of(t: Tensor) -> torch.memory_format:
    return torch.channels_last_3d if (t.dim() == 5 and not t.is_contiguous()
                                      and t.is_contiguous(memory_format=torch.channels_last_3d)) \
        else torch.contiguous_format


class SwappedWeightGradConv3d(nn.Conv3d):
    """An `nn.Conv3d` whose weight gradient may take the swapped path (module doc)."""

    swapped_weight_grad: bool = False

    def _swappable(self, x: Tensor) -> bool:
        return (self.swapped_weight_grad and torch.is_grad_enabled() and x.device.type == "cpu"
                and x.dtype == torch.float32 and self.weight.dtype == torch.float32
                and not torch.is_autocast_enabled("cpu") and self.groups == 1
                and tuple(self.stride) == (1, 1, 1) and tuple(self.dilation) == (1, 1, 1)
                and self.padding_mode == "zeros" and isinstance(self.padding, tuple))

    def forward(self, x: Tensor) -> Tensor:
        if not self._swappable(x):
            return super().forward(x)
        return _SwappedWeightGrad.apply(x, self.weight, self.bias, tuple(self.padding))


def set_swapped_weight_grad(model: nn.Module, enabled: bool = True) -> int:
    """Switch the swapped weight gradient on (or off) in every such convolution of `model`;
    returns how many."""
    convs = [m for m in model.modules() if isinstance(m, SwappedWeightGradConv3d)]
    for conv in convs:
        conv.swapped_weight_grad = bool(enabled)
    return len(convs)


def weight_grad_speedup(repeats: int = 3) -> float:
    """How much faster the swapped weight gradient is than oneDNN's on this CPU (median of
    `repeats` alternating timings, current thread count) for a layer of LSOR's decoder: 16 → 16
    channels, 3³, 8 volumes of 32³, channels-last as training runs it."""
    generator = torch.Generator().manual_seed(0)
    layout = torch.channels_last_3d
    x = torch.randn(8, 16, 32, 32, 32, generator=generator).to(memory_format=layout)
    g = torch.randn(8, 16, 32, 32, 32, generator=generator).to(memory_format=layout)
    w = torch.randn(16, 16, 3, 3, 3, generator=generator).to(memory_format=layout)

    def onednn() -> None:
        torch.ops.aten.convolution_backward(g, x, w, None, [1, 1, 1], [1, 1, 1], [1, 1, 1],
                                            False, [0, 0, 0], 1, [False, True, False])

    def swapped() -> None:
        F.conv3d(x.transpose(0, 1), g.transpose(0, 1), padding=1)

    times: dict[str, list[float]] = {"onednn": [], "swapped": []}
    onednn(), swapped()                               # kernels picked, buffers warm
    for _ in range(repeats):
        for name, run in (("onednn", onednn), ("swapped", swapped)):
            started = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - started)
    return statistics.median(times["onednn"]) / statistics.median(times["swapped"])
