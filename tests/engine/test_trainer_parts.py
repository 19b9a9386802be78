"""The trainer's pieces against hand numbers: the step loop's bookkeeping
(`hpcbrain.engine.metrics.StepMetrics`) and the lr step schedule (`lr_at_epoch`)."""
from __future__ import annotations

import pytest
import torch

from hpcbrain.engine import metrics as metrics_module
from hpcbrain.engine.metrics import StepMetrics
from hpcbrain.engine.trainer import lr_at_epoch


def test_epoch_sums_add_device_losses_to_what_a_resume_brought(monkeypatch):
    m = StepMetrics(world=2, batch_per_rank=4, epoch_sums={"loss": 10.0})
    m.add_step({"loss": torch.tensor(1.5), "recon": torch.tensor(0.25)}, 0.0)
    m.add_step({"loss": torch.tensor(2.5), "recon": torch.tensor(0.75)}, 0.0)
    assert m.last_losses() == {"loss": 2.5, "recon": 0.75}
    assert m.epoch_sums() == {"loss": 14.0, "recon": 1.0}
    assert m.epoch_sums() == {"loss": 14.0, "recon": 1.0}      # reading twice adds nothing


def test_throughput_is_measured_per_log_window(monkeypatch):
    clock = iter([100.0, 104.0, 104.0, 105.0, 105.0])   # start, close + start, close + start
    monkeypatch.setattr(metrics_module.time, "perf_counter", lambda: next(clock))
    m = StepMetrics(world=2, batch_per_rank=4)
    for wait in (0.5, 1.5):
        m.add_step({"loss": torch.tensor(1.0)}, wait)
    # 2 steps × 4 items × 2 ranks in 4 s; waited 2 of 4 s
    assert m.close_window() == pytest.approx({"samples_per_s": 4.0, "samples_per_s_per_rank": 2.0,
                                              "step_time_s": 2.0, "data_wait_share": 0.5})
    m.add_step({"loss": torch.tensor(1.0)}, 0.0)               # a fast window after a slow one
    assert m.close_window()["samples_per_s"] == pytest.approx(8.0)


def test_tflops_and_mfu_from_counted_flops_per_window(monkeypatch):
    clock = iter([10.0, 12.0, 12.0])
    monkeypatch.setattr(metrics_module.time, "perf_counter", lambda: next(clock))
    m = StepMetrics(world=1, batch_per_rank=2)
    for _ in range(4):
        m.add_step({"loss": torch.tensor(1.0)}, 0.0)
    # 4 steps × 3e12 FLOPs in 2 s = 6 TFLOP/s; against a 20 TFLOP/s peak: 0.3
    window = m.close_window(flops_per_step=3e12, peak_tflops=20.0)
    assert window["tflops"] == pytest.approx(6.0) and window["mfu"] == pytest.approx(0.3)


def test_flops_of_a_step_counted_by_hand():
    """A bias-free Linear 3 → 5 on a batch of 4: forward 2·4·3·5 = 120 FLOPs; backward to the
    weight only (the input needs no gradient) another 120."""
    from hpcbrain.engine.flops import count_flops

    layer = torch.nn.Linear(3, 5, bias=False)
    x = torch.randn(4, 3)
    out, flops = count_flops(lambda: layer(x).sum().backward())
    assert flops == 240 and out is None
    _, forward_only = count_flops(lambda: layer(x))
    assert forward_only == 120


def test_peaks_come_from_the_table_or_one_cached_measurement(tmp_path):
    from hpcbrain.engine.flops import device_peak_tflops

    calls = []

    def measure(bf16):
        calls.append(bf16)
        return 0.5 if bf16 else 0.25

    cache = tmp_path / "peak.json"
    cpu = torch.device("cpu")
    assert device_peak_tflops(cpu, False, measure, cache) == 0.25
    assert device_peak_tflops(cpu, False, measure, cache) == 0.25      # cached: measured once
    assert device_peak_tflops(cpu, True, measure, cache) == 0.5
    assert calls == [False, True]


def test_lr_step_schedule():
    # the paper: lr 1e-4 × 0.9 every 10 epochs (epochs from 0)
    assert lr_at_epoch(1e-4, 0, 10, 0.9) == pytest.approx(1e-4)
    assert lr_at_epoch(1e-4, 9, 10, 0.9) == pytest.approx(1e-4)
    assert lr_at_epoch(1e-4, 10, 10, 0.9) == pytest.approx(0.9e-4)
    assert lr_at_epoch(1e-4, 25, 10, 0.9) == pytest.approx(0.81e-4)
    assert lr_at_epoch(1e-4, 49, 10, 0.9) == pytest.approx(1e-4 * 0.9 ** 4)
    assert lr_at_epoch(1e-4, 30, None, 0.9) == 1e-4     # no schedule
    assert lr_at_epoch(1e-4, 30, 0, 0.9) == 1e-4
