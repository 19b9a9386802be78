"""The step loop's bookkeeping (`hpcbrain.engine.metrics.StepMetrics`) against hand numbers."""
from __future__ import annotations

import pytest
import torch

from hpcbrain.engine import metrics as metrics_module
from hpcbrain.engine.metrics import StepMetrics


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
