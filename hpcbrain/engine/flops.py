"""How close a run comes to its hardware: counted FLOPs per step against the device's peak.

The FLOPs of one training step are counted once, on the first step a process runs
(`torch.utils.flop_counter.FlopCounterMode`: every matmul and convolution the step executes,
forward and backward, on this rank's micro-batch); every log window then reports the achieved
TFLOP/s per rank (`throughput/tflops`) and its share of the device's peak (`throughput/mfu`).

Peaks: dense tensor-core figures from NVIDIA's data sheets for the GPUs hpcbrain is run on
(`hpcbrain.gpus`, bf16 and fp32/TF32-off); for a CPU, measured once per host, CPU model,
thread count and dtype (a large matmul, cached in ~/.cache/hpcbrain/peak.json or
$HPCBRAIN_CACHE_DIR): the best this host's BLAS reaches, which is what a training step could.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable, TypeVar

import torch

from hpcbrain.engine.host_cache import cache_path, cached_measurement, cpu_model
from hpcbrain.gpus import peak_tflops_of_device

__all__ = ["count_flops", "device_peak_tflops", "measure_cpu_peak_tflops"]

log = logging.getLogger(__name__)
T = TypeVar("T")



def count_flops(run: Callable[[], T]) -> tuple[T, float]:
    """`run()`'s result and the FLOPs of the matmuls and convolutions it executed."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        result = run()
    return result, float(counter.get_total_flops())


def measure_cpu_peak_tflops(bf16: bool, size: int = 1024, repeats: int = 5) -> float:
    """The best TFLOP/s of a size³ matmul on this CPU with torch's current thread count."""
    dtype = torch.bfloat16 if bf16 else torch.float32
    # its own generator: measured inside a run (first step), it must not move the run's stream
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(dtype)
    b = torch.randn(size, size, generator=generator).to(dtype)
    torch.mm(a, b)                                    # kernels picked, buffers warm
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - started)
    return 2.0 * size ** 3 / best / 1e12


def device_peak_tflops(device: torch.device, bf16: bool,
                       measure: Callable[[bool], float] = measure_cpu_peak_tflops,
                       cache: Path | None = None) -> float | None:
    """The peak TFLOP/s MFU is measured against; None for a GPU not in the table."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peaks = peak_tflops_of_device(name)
        if peaks is not None:
            return peaks[0] if bf16 else peaks[1]
        log.info("no peak FLOP/s known for %s: throughput/mfu not logged", name)
        return None
    if device.type != "cpu":
        return None
    key = f"{cpu_model()} | {torch.get_num_threads()} threads | {'bf16' if bf16 else 'fp32'}"
    path = cache or cache_path("peak.json")

    def measure_once() -> float:
        peak = round(float(measure(bf16)), 4)
        log.info("peak of this CPU (%s): %.3f TFLOP/s (measured once, cached in %s)", key,
                 peak, path)
        return peak

    return float(cached_measurement(path, key, measure_once))
