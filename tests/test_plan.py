"""`hpcbrain plan`: model states by hand per engine, the plan's arithmetic, the probe's peak
against a measured step, checkpointing measured lower, the command and submit.py's check."""
from __future__ import annotations

import pytest
from conftest import tiny_config

from hpcbrain.gpus import GPUS, peak_tflops_of_device
from hpcbrain.plan import (
    GIB,
    Plan,
    Probe,
    build_for_probe,
    make_plan,
    measure_step_peak,
    model_state_bytes,
    model_states,
    probe_step,
    step_flops,
    submit_check,
    synthetic_batch,
    tensor_bytes,
)

SMALL = {"data.input_size": 16, "model.widths": "[4,8]", "train.channels_last": "false",
         "engine.name": "single", "train.precision": "fp32"}


def test_model_states_per_engine_by_hand():
    p = 1000
    s = model_states(p, "single", bf16=False, zero_stage=0, world=1)
    assert (s.parameters, s.gradients, s.optimizer) == (4000, 4000, 8000)
    s = model_states(p, "ddp", bf16=True, zero_stage=0, world=4)        # + bf16 copies, buckets
    assert (s.parameters, s.gradients, s.optimizer) == (6000, 8000, 8000)
    s = model_states(p, "deepspeed", bf16=True, zero_stage=0, world=4)
    assert (s.parameters, s.gradients, s.optimizer) == (2000, 2000, 12000)
    s = model_states(p, "deepspeed", bf16=True, zero_stage=1, world=4)
    assert (s.parameters, s.gradients, s.optimizer) == (2000, 2000, 3000)
    s = model_states(p, "deepspeed", bf16=True, zero_stage=2, world=4)
    assert (s.parameters, s.gradients, s.optimizer) == (2000, 500, 3000)
    s = model_states(p, "deepspeed", bf16=False, zero_stage=3, world=4)
    assert (s.parameters, s.gradients, s.optimizer) == (1000, 1000, 2000)


def fake_plan(bf16: bool, memory_gib: float | None = 10.0) -> Plan:
    # dynamic peak = 1 GiB + 2 GiB an item (fp32, gradients of 1000 parameters included)
    probe = Probe(bytes_at_zero=GIB, bytes_per_item=2 * GIB, flops_per_item=3e12,
                  parameters=1000, item="pair")
    states = model_states(1000, "single", bf16, 0, 1)
    return Plan("lsor", "single", 0, 1, (16, 16, 16), bf16, False, 3, 3, probe, states,
                memory_gib * GIB if memory_gib else None, 1.5 * GIB if memory_gib else 0.0,
                GPUS["a100-40gb"] if memory_gib else None, 0.5)


def test_the_plans_arithmetic_by_hand():
    plan = fake_plan(bf16=False)
    assert plan.activations == 7 * GIB - 4000                  # 1 + 2·3 GiB, less the gradients
    assert plan.peak == 7 * GIB - 4000 + 16000
    assert plan.fits()                                         # 7 + 1.5 ≤ 10 GiB
    # largest n: 1 + 2n GiB + states ≤ 10 − 1.5 → n = 3
    assert plan.largest_micro_batch() == 3
    assert plan.step_seconds() == pytest.approx(3 * 3e12 / (19.5e12 * 0.5))
    half = fake_plan(bf16=True)                                # activations halved under bf16
    assert half.activations == pytest.approx((7 * GIB - 4000) / 2)
    assert half.largest_micro_batch() == 7                     # (1 + 2n)/2 ≤ 8.5 − states
    assert half.step_seconds() == pytest.approx(3 * 3e12 / (312e12 * 0.5))
    tight = fake_plan(bf16=False, memory_gib=8.0)
    assert not tight.fits() and tight.largest_micro_batch() == 2
    assert any("DOES NOT FIT" in line for line in tight.lines())
    assert fake_plan(False, memory_gib=None).fits() is None


def test_gpu_names_and_device_names():
    assert peak_tflops_of_device("NVIDIA A100-SXM4-40GB") == (312.0, 19.5)
    assert peak_tflops_of_device("NVIDIA A10") == (125.0, 31.2)      # not the A100's
    assert peak_tflops_of_device("Some other card") is None


@pytest.mark.minutes          # ~15 s together; bench/plan_memory.py measures the full table
@pytest.mark.parametrize("method", ["lsor", "adapn"])
def test_the_probe_predicts_a_measured_step(method):
    overrides = {**SMALL, "model.resnet_width": 4, "lsor.grid_rows": 2, "lsor.grid_cols": 2,
                 "train.batch_size": 6}
    cfg = tiny_config(f"{method}.yaml", **overrides)
    plan = make_plan(cfg, world=1, bf16=False, probe=probe_step(cfg))
    model, optimizer, shape = build_for_probe(cfg)
    measure_step_peak(model, optimizer, lambda: synthetic_batch(model, 1, shape, 1))
    static = model_state_bytes(model, optimizer)
    dynamic = measure_step_peak(model, optimizer, lambda: synthetic_batch(model, 6, shape))
    # the plan counts no buffers (BatchNorm statistics: bytes, not a GPU's worry); the step does
    predicted = plan.peak + tensor_bytes(model.buffers())
    assert predicted == pytest.approx(static + dynamic, rel=0.05)
    flops = step_flops(model, synthetic_batch(model, 6, shape))
    assert plan.probe.flops_per_item * 6 == pytest.approx(flops, rel=0.05)


@pytest.mark.minutes          # ~10 s together; bench/plan_memory.py measures the full table
@pytest.mark.parametrize("method", ["lsor", "adapn"])
def test_activation_checkpointing_measures_lower(method):
    peaks = {}
    for on in (False, True):
        cfg = tiny_config(f"{method}.yaml", **{
            **SMALL, "data.input_size": 32, "model.widths": "[8,8,8,8]", "model.resnet_width": 4,
            "lsor.grid_rows": 2, "lsor.grid_cols": 2,
            "train.activation_checkpointing": str(on).lower()})
        model, optimizer, shape = build_for_probe(cfg)
        # enough items that activations, not Adam's step over the weights, make the peak
        peak = measure_step_peak(model, optimizer,
                                 lambda m=model, s=shape: synthetic_batch(m, 8, s))
        peaks[on] = peak - tensor_bytes(model.parameters())      # less the gradients
    if method == "lsor":
        assert peaks[True] < 0.8 * peaks[False]
    else:   # a small ResNet peaks in its stem's backward, which checkpointing leaves alone
        assert peaks[True] <= peaks[False]


def test_plan_command_and_the_submit_check(capsys):
    from hpcbrain.cli import main

    args = ["plan", "--cfg", "lsor.yaml", *(f"{k}={v}" for k, v in SMALL.items()),
            "lsor.grid_rows=2", "lsor.grid_cols=2", "train.batch_size=4"]
    assert main([*args, "--gpu", "a100-40gb"]) == 0
    said = capsys.readouterr().out
    assert "on a100-40gb (39.4 GiB): fits" in said and "per pair" in said and "ms" in said
    assert main([*args, "--memory-gib", "0.001"]) == 1
    assert "DOES NOT FIT" in capsys.readouterr().out

    cfg = tiny_config("lsor.yaml", **{**SMALL, "lsor.grid_rows": 2, "lsor.grid_cols": 2,
                                      "slurm.gpus_per_node": 4, "train.batch_size": 4,
                                      "engine.name": "auto"})
    assert submit_check(cfg, 4) is None                       # slurm.gpu not set: no probe
    cfg.slurm.gpu = "v100-16gb"
    text, fits = submit_check(cfg, 4)
    assert fits and text.startswith("plan:")
    from hpcbrain.config import ConfigError

    with pytest.raises(ConfigError, match="'slurm.gpu': 'a100'; choose one of null, h200"):
        tiny_config("lsor.yaml", **{"slurm.gpu": "a100"})
