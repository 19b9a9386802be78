"""The step loop's bookkeeping, apart from the loop (after torchtitan's MetricsProcessor).

Losses are summed on the device between log steps, so a step does not wait for the host;
throughput, step time and the data-wait share are measured per log window (since the last log
step), not from the start of the epoch, so a slow first batch or a mid-epoch resume does not
colour every later figure. The host reads the device only at log steps and when the epoch's
sums are needed (a checkpoint, the epoch's end).
"""
from __future__ import annotations

import time

import torch

__all__ = ["StepMetrics"]


class StepMetrics:
    def __init__(self, world: int, batch_per_rank: int, epoch_sums: dict[str, float] | None = None):
        self.world = int(world)
        self.batch_per_rank = int(batch_per_rank)
        self._host_sums = dict(epoch_sums or {})       # what a mid-epoch resume brought along
        self._device_sums: dict[str, torch.Tensor] = {}
        self._last: dict[str, torch.Tensor] = {}
        self._start_window()

    def _start_window(self) -> None:
        self._window_start = time.perf_counter()
        self._window_steps = 0
        self._window_wait = 0.0

    def add_step(self, losses: dict[str, torch.Tensor], data_wait_s: float) -> None:
        """One training step's detached losses and the time it waited for its batch."""
        for key, value in losses.items():
            value = value.detach().to(torch.float64)
            self._device_sums[key] = self._device_sums.get(key, 0.0) + value
        self._last = losses
        self._window_steps += 1
        self._window_wait += float(data_wait_s)

    def last_losses(self) -> dict[str, float]:
        """The latest step's losses on the host (a device sync)."""
        return {key: float(value) for key, value in self._last.items()}

    def epoch_sums(self) -> dict[str, float]:
        """Loss sums over the epoch's steps so far, resumed steps included (a device sync)."""
        for key, value in self._device_sums.items():
            self._host_sums[key] = self._host_sums.get(key, 0.0) + float(value)
        self._device_sums = {}
        return dict(self._host_sums)

    def close_window(self, flops_per_step: float | None = None,
                     peak_tflops: float | None = None) -> dict[str, float]:
        """Throughput over the steps since the last call (all ranks' samples), then a new
        window: samples_per_s, samples_per_s_per_rank, step_time_s, data_wait_share; with a
        step's counted FLOPs (this rank's micro-batch) also tflops (achieved per rank) and,
        with the device's peak, mfu (tflops / peak)."""
        elapsed = max(time.perf_counter() - self._window_start, 1e-9)
        steps = max(self._window_steps, 1)
        samples_per_s = self._window_steps * self.batch_per_rank * self.world / elapsed
        window = {"samples_per_s": samples_per_s, "samples_per_s_per_rank": samples_per_s / self.world,
                  "step_time_s": elapsed / steps, "data_wait_share": self._window_wait / elapsed}
        if flops_per_step:
            window["tflops"] = flops_per_step * self._window_steps / elapsed / 1e12
            if peak_tflops:
                window["mfu"] = window["tflops"] / peak_tflops
        self._start_window()
        return window
