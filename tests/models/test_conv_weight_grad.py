"""The swapped weight gradient (`train.conv_weight_grad`): the gradients of a plain Conv3d, for
every layout and layer shape the networks use, and the plain path wherever it does not apply."""
from __future__ import annotations

import copy

import pytest
import torch

from hpcbrain.models.conv_weight_grad import SwappedWeightGradConv3d, set_swapped_weight_grad

LAYOUTS = {"contiguous": torch.contiguous_format, "channels-last": torch.channels_last_3d}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("cin,cout,bias", [(1, 4, True), (4, 1, True), (4, 8, False)])
def test_the_swapped_weight_gradient_equals_the_plain_one(layout, cin, cout, bias):
    torch.manual_seed(0)
    plain = SwappedWeightGradConv3d(cin, cout, 3, padding=1, bias=bias)
    swapped = copy.deepcopy(plain)
    assert set_swapped_weight_grad(swapped) == 1
    x = torch.randn(3, cin, 10, 12, 8).to(memory_format=LAYOUTS[layout])
    grad = torch.randn(3, cout, 10, 12, 8)
    outputs, inputs = [], []
    for conv in (plain, swapped):
        conv.to(memory_format=LAYOUTS[layout])
        xi = x.clone().requires_grad_()
        out = conv(xi)
        out.backward(grad)
        outputs.append(out.detach())
        inputs.append(xi.grad)
    torch.testing.assert_close(outputs[1], outputs[0], rtol=0, atol=0)
    torch.testing.assert_close(inputs[1], inputs[0], rtol=0, atol=0)      # oneDNN's own
    # sums of ~3,000 products in another order: fp32 rounding, relative to the gradient's size
    scale = plain.weight.grad.abs().max().item()
    torch.testing.assert_close(swapped.weight.grad, plain.weight.grad, rtol=1e-4,
                               atol=1e-6 * scale)
    assert swapped.weight.grad.shape == plain.weight.grad.shape
    if bias:
        torch.testing.assert_close(swapped.bias.grad, plain.bias.grad, rtol=1e-5, atol=1e-6)


def test_the_plain_path_where_the_swap_does_not_apply():
    strided = SwappedWeightGradConv3d(2, 2, 3, stride=2, padding=1)
    set_swapped_weight_grad(strided)
    x = torch.randn(1, 2, 8, 8, 8)
    assert not strided._swappable(x)                       # stride 2
    conv = SwappedWeightGradConv3d(2, 2, 3, padding=1)
    set_swapped_weight_grad(conv)
    assert conv._swappable(x)
    with torch.no_grad():
        assert not conv._swappable(x)                      # nothing to differentiate
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not conv._swappable(x)                      # bf16: the plain path
    assert not conv._swappable(x.double())
