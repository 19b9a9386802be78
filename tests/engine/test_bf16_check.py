"""The bf16 kernel probe (engine/bf16_check.py) and what `train.precision=auto` does with it: a
layer whose bf16 arithmetic is wrong on this host sends the run to fp32, and a run whose layers
are right trains exactly as if bf16 had been asked for."""
from __future__ import annotations

import logging

import pytest
import torch
from conftest import TINY_LSOR, lsor_run_config, tiny_config
from torch import nn

from hpcbrain.engine import bf16_check
from hpcbrain.engine.bf16_check import MAX_RELATIVE_ERROR, KernelProbe, probe_layer


class _GradientTimes(torch.autograd.Function):
    """Identity forward; the gradient times `factor` (a kernel that gets the gradient wrong)."""

    @staticmethod
    def forward(ctx, weight, factor):
        ctx.factor = factor
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


class WrongInBf16(nn.Conv3d):
    """A Conv3d whose weight gradient is `factor` times off under CPU autocast only: what
    torch 2.13's oneDNN does for 2-voxel-wide inputs on an AVX512-BF16 EPYC, on any CPU."""

    factor = 1e30

    def forward(self, x):
        weight = self.weight
        if torch.is_autocast_enabled("cpu"):
            weight = _GradientTimes.apply(weight, self.factor)
        return self._conv_forward(x, weight, self.bias)


@pytest.mark.parametrize("layer, shape, dtype", [
    (nn.Conv3d(4, 8, 3, padding=1), (2, 4, 6, 6, 6), torch.float32),
    (nn.Linear(16, 8), (4, 16), torch.float32),
    (nn.BatchNorm3d(8), (4, 8, 4, 4, 4), torch.bfloat16),
], ids=["conv3d", "linear", "batchnorm-after-bf16"])
def test_right_layers_agree_with_fp32_to_bf16_rounding(layer, shape, dtype):
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    error = probe_layer(layer, shape, dtype)
    assert 0 < error < 0.02              # bf16 did run (not 0) and rounded as bf16 rounds
    assert all(torch.equal(before[k], v) for k, v in layer.state_dict().items())


@pytest.mark.parametrize("factor", [1e30, -1.0, 2.0, float("nan")])
def test_a_layer_whose_bf16_gradient_is_wrong_fails_the_probe(factor):
    layer = WrongInBf16(4, 8, 3, padding=1)
    layer.factor = factor
    error = probe_layer(layer, (2, 4, 6, 6, 6))
    assert not error < MAX_RELATIVE_ERROR     # NaN or inf compare False as well
    layer.factor = 1.0
    assert probe_layer(layer, (2, 4, 6, 6, 6)) < MAX_RELATIVE_ERROR


def test_the_probe_covers_what_runs_in_bf16_and_leaves_the_method_as_it_was():
    from hpcbrain.methods import build_method

    torch.manual_seed(0)
    method = build_method(tiny_config("lsor.yaml", **TINY_LSOR)).train()
    batch = {"x_u": torch.rand(4, 1, 16, 16, 16), "x_v": torch.rand(4, 1, 16, 16, 16),
             "dt": torch.ones(4), "index_u": torch.arange(4), "index_v": torch.arange(4) + 4}
    state = {k: v.clone() for k, v in method.state_dict().items()}
    rng = torch.get_rng_state()
    found = bf16_check.probe_bf16_kernels(method, method.prepare_batch(batch))
    assert found.bf16_is_right and found.worst_relative_error > 0
    # every convolution and BatchNorm but the layers on either side of the latent, which run
    # at full precision (models/autoencoder.py)
    assert set(found.errors) == {
        "net.encoder.blocks.0.0", "net.encoder.blocks.0.1", "net.encoder.blocks.1.0",
        "net.encoder.blocks.1.1", "net.decoder.blocks.1.0", "net.decoder.blocks.1.1",
        "net.decoder.out"}
    assert all(torch.equal(state[k], v) for k, v in method.state_dict().items())
    assert torch.equal(torch.get_rng_state(), rng)


def _final_state(run_dir):
    from hpcbrain.engine import checkpoint

    saved = torch.load(checkpoint.latest_checkpoint(run_dir), map_location="cpu",
                       weights_only=False)
    return saved["engine"]["method"]


@pytest.fixture
def auto_means_bf16(monkeypatch):
    """Whatever this CPU is, `auto` picks bf16 before the first batch (as on a native-bf16 CPU
    with a measured speedup): what happens next is the probe's to decide."""
    from hpcbrain.engine import precision

    monkeypatch.setattr(precision, "bf16_supported", lambda device, autocast=True: True)


@pytest.mark.slow
def test_auto_trains_like_bf16_when_the_probe_passes_and_like_fp32_when_it_fails(
        tmp_path, age_contrast_store, auto_means_bf16, monkeypatch, caplog):
    from hpcbrain.job import run_training

    def run(name, precision):
        # two blocks: no layer 2 voxels wide, which the bf16 of some CPUs gets wrong
        cfg = lsor_run_config(age_contrast_store, tmp_path, name, f"train.precision={precision}",
                              "model.widths=[4,8]", "train.epochs=2",
                              "train.max_steps_per_epoch=3")
        return _final_state(run_training(cfg).run_dir)

    def same(a, b):
        return all(torch.equal(a[k], b[k]) for k in a)

    with caplog.at_level(logging.INFO, logger="hpcbrain.engine.trainer"):
        auto_right = run("auto-right", "auto")
    assert "train.precision=auto: bf16" in caplog.text
    bf16, fp32 = run("bf16", "bf16"), run("fp32", "fp32")
    assert not same(bf16, fp32)                    # the two precisions do differ here
    assert same(auto_right, bf16)                  # the probe changed nothing it touched

    wrong = KernelProbe("net.encoder.blocks.1.0", (8, 16, 2, 2, 2), float("inf"), 12)
    monkeypatch.setattr(bf16_check, "probe_bf16_kernels", lambda method, batch: wrong)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hpcbrain.engine.trainer"):
        auto_wrong = run("auto-wrong", "auto")
    assert "train.precision=auto: fp32" in caplog.text
    assert "net.encoder.blocks.1.0 at input [8, 16, 2, 2, 2]" in caplog.text
    assert same(auto_wrong, fp32)


def test_a_deepspeed_engine_cannot_drop_bf16_after_it_is_built():
    from hpcbrain.engine.deepspeed import DeepSpeedEngine

    assert DeepSpeedEngine.bf16_is_autocast is False
    with pytest.raises(RuntimeError, match="train.precision=fp32"):
        DeepSpeedEngine.disable_bf16(object())


def _two_rank_worker(rank: int, store: str, root: str) -> dict:
    """DDP, `auto` made to mean bf16, and a probe that finds a wrong layer on rank 1 only."""
    from hpcbrain.engine import precision
    from hpcbrain.engine.single import SingleEngine
    from hpcbrain.job import run_training

    precision.bf16_supported = lambda device, autocast=True: True
    right = bf16_check.probe_bf16_kernels
    bf16_check.probe_bf16_kernels = lambda method, batch: (
        KernelProbe("net.encoder.blocks.1.0", (2, 8, 2, 2, 2), float("inf"), 7) if rank == 1
        else right(method, batch))
    dropped = []
    real_disable = SingleEngine.disable_bf16

    def disable(self):
        dropped.append(rank)
        real_disable(self)

    SingleEngine.disable_bf16 = disable
    run_training(lsor_run_config(store, root, "ddp-auto", "train.precision=auto",
                                 "engine.name=ddp", "model.widths=[4,8]", "train.epochs=1",
                                 "train.max_steps_per_epoch=2", "train.num_threads=1"))
    return {"dropped": dropped}


@pytest.mark.slow
@pytest.mark.multiprocess
def test_every_rank_drops_bf16_when_one_rank_finds_a_wrong_layer(tmp_path, age_contrast_store):
    from conftest import run_on_ranks

    results = run_on_ranks(_two_rank_worker, tmp_path, str(age_contrast_store),
                           str(tmp_path / "runs"))
    assert [r["dropped"] for r in results] == [[0], [1]]
