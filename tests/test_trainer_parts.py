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


def test_lr_step_schedule():
    # the paper: lr 1e-4 × 0.9 every 10 epochs (epochs from 0)
    assert lr_at_epoch(1e-4, 0, 10, 0.9) == pytest.approx(1e-4)
    assert lr_at_epoch(1e-4, 9, 10, 0.9) == pytest.approx(1e-4)
    assert lr_at_epoch(1e-4, 10, 10, 0.9) == pytest.approx(0.9e-4)
    assert lr_at_epoch(1e-4, 25, 10, 0.9) == pytest.approx(0.81e-4)
    assert lr_at_epoch(1e-4, 49, 10, 0.9) == pytest.approx(1e-4 * 0.9 ** 4)
    assert lr_at_epoch(1e-4, 30, None, 0.9) == 1e-4     # no schedule
    assert lr_at_epoch(1e-4, 30, 0, 0.9) == 1e-4
