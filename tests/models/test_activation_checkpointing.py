"""`train.activation_checkpointing`: every method's loss, gradients and BatchNorm statistics
equal a run without it (one training step, same initial weights), and the networks that
checkpoint are the ones with something to save."""
from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_config

from hpcbrain.methods import build_method
from hpcbrain.methods.base import available_methods
from hpcbrain.models.checkpointing import set_activation_checkpointing

SIZE = 16


def batch_for(method, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    volume = lambda: torch.randn(4, 1, SIZE, SIZE, SIZE, generator=g)  # noqa: E731
    if method.batch_kind == "pairs":
        return {"x_u": volume(), "x_v": volume(), "dt": 0.5 + torch.rand(4, generator=g),
                "index_u": torch.arange(4) * 2, "index_v": torch.arange(4) * 2 + 1}
    return {"x": volume(), "age": 60 + 20 * torch.rand(4, generator=g),
            "index": torch.arange(4)}


def build(name: str, backbone: str | None):
    overrides = {"data.input_size": SIZE, "model.widths": "[4,8]", "lsor.grid_rows": 2,
                 "lsor.grid_cols": 2, "lsor.kmeans_n_init": 1, "lsor.warmup_epochs": 0,
                 "model.resnet_width": 4, "train.channels_last": "false"}
    if backbone:
        overrides["model.backbone"] = backbone
    torch.manual_seed(0)
    method = build_method(tiny_config(f"{name}.yaml", **overrides)).train()
    if name == "lsor":         # the SOM phase: every loss through encoder and decoder
        method.initialise_som(lambda: iter([batch_for(method, 7)]))
    method.set_progress(1, 0, 10)
    return method


def one_step(method, batch):
    torch.manual_seed(123)           # the same draws (VAE noise, views) in both runs
    method.zero_grad(set_to_none=True)
    losses = method(batch)
    losses["loss"].backward()
    grads = {n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None}
    buffers = {n: b.clone() for n, b in method.named_buffers()}
    return losses["loss"].detach(), grads, buffers


#: the fast tier covers every network (LSOR's encoder and decoder, the VAE's second head, the
#: ResNet) and every batch kind; the other methods run the same networks (full tier)
FAST = {("lsor", None), ("vae", None), ("lne", None), ("adapn", "resnet18"), ("adapn", "lsor"),
        ("supervised", "resnet18")}
CASES = [(m, None) for m in available_methods() if m not in ("adapn", "supervised")] + [
    ("adapn", "resnet18"), ("adapn", "lsor"), ("supervised", "resnet18")]


@pytest.mark.parametrize("name,backbone", [
    pytest.param(m, b, id=f"{m}-{b or 'default'}",
                 marks=() if (m, b) in FAST else pytest.mark.minutes) for m, b in CASES])
def test_checkpointing_gives_the_same_loss_gradients_and_statistics(name, backbone):
    plain = build(name, backbone)
    checkpointed = copy.deepcopy(plain)
    assert set_activation_checkpointing(checkpointed) >= 1
    batch = batch_for(plain)
    loss, grads, buffers = one_step(plain, batch)
    loss_c, grads_c, buffers_c = one_step(checkpointed, batch)
    torch.testing.assert_close(loss_c, loss, rtol=0, atol=0)
    assert grads_c.keys() == grads.keys() and grads
    for key in grads:
        torch.testing.assert_close(grads_c[key], grads[key], rtol=1e-6, atol=1e-7,
                                   msg=lambda m, k=key: f"{name} gradient {k}: {m}")
    for key in buffers:                      # BatchNorm updated once, not twice
        torch.testing.assert_close(buffers_c[key], buffers[key], rtol=0, atol=0,
                                   msg=lambda m, k=key: f"{name} buffer {k}: {m}")


def test_checkpointing_only_acts_while_autograd_records():
    method = build("ae", None)
    set_activation_checkpointing(method)
    with torch.no_grad():
        method.validation_step(batch_for(method))      # eval: the plain forward, no error
    assert set_activation_checkpointing(method, False) >= 1
    assert not any(getattr(m, "activation_checkpointing", False) for m in method.modules())
