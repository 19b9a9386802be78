"""Which precision `train.precision` means on a device; `auto` asks here.

* CUDA: bf16 where the GPU has it (Ampere and later).
* CPU: bf16 only with native bf16 instructions (AMX tiles or AVX512-BF16): without them autocast
  emulates bf16 and is always slower. With them it depends on the chip and the kernels (on an
  AMD EPYC Zen 4 with AVX512-BF16 the LSOR step ran 1.37x faster in bf16; on another host with
  the same flag it was slower), so the rule is measured, not assumed: a 3D convolution block of
  the LSOR encoder's shape, forward and backward, fp32 and bf16 autocast interleaved (load hits
  both alike), medians; bf16 is chosen when it is at least `MIN_GAIN` faster. The verdict is
  kept per CPU model, thread count and torch version (host_cache.py), so a host measures once
  (~2 s) and every run on it agrees.
"""
from __future__ import annotations

import logging
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from hpcbrain.engine.host_cache import cache_path, cached_measurement, cpu_model, cpuinfo

__all__ = ["MIN_GAIN", "bf16_supported", "cpu_bf16_flags", "cpu_bf16_pays",
           "measure_cpu_bf16_speedup", "use_bf16"]

log = logging.getLogger(__name__)

#: bf16 must be at least this much faster than fp32 to be chosen on a CPU.
MIN_GAIN = 1.10
_NATIVE_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_bf16_flags(text: str | None = None) -> list[str]:
    """The native bf16 instruction sets the CPU lists (empty: bf16 would be emulated)."""
    flags: set[str] = set()
    for line in (cpuinfo() if text is None else text).splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
    return [f for f in _NATIVE_FLAGS if f in flags]


def measure_cpu_bf16_speedup(repeats: int = 7) -> float:
    """fp32 time / bf16-autocast time of one conv block's forward and backward on the CPU."""
    generator = torch.Generator().manual_seed(0)
    block = torch.nn.Sequential(torch.nn.Conv3d(16, 32, 3, padding=1), torch.nn.BatchNorm3d(32),
                                torch.nn.LeakyReLU(0.2), torch.nn.Conv3d(32, 16, 3, padding=1))
    x = torch.randn(4, 16, 24, 24, 24, generator=generator)

    def step(bf16: bool) -> float:
        started = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = block(x)
        out.float().square().mean().backward()
        return time.perf_counter() - started

    for _ in range(2):                                # first calls pick and pack kernels
        step(False), step(True)
    fp32, bf16 = [], []
    for _ in range(repeats):                          # interleaved: load changes hit both
        fp32.append(step(False))
        bf16.append(step(True))
    return statistics.median(fp32) / statistics.median(bf16)


def cpu_bf16_pays(measure: Callable[[], float] = measure_cpu_bf16_speedup,
                  text: str | None = None, cache: Path | None = None) -> bool:
    """True when this CPU runs bf16 natively and measurably faster (see the module doc)."""
    text = cpuinfo() if text is None else text
    if not cpu_bf16_flags(text):
        return False
    key = f"{cpu_model(text)} | {torch.get_num_threads()} threads | torch {torch.__version__}"
    path = cache or cache_path("precision.json")

    def measure_once() -> dict:
        speedup = float(measure())
        log.info("bf16 on this CPU (%s): %.2fx fp32's speed, so precision auto picks %s", key,
                 speedup, "bf16" if speedup >= MIN_GAIN else "fp32")
        return {"bf16_speedup": round(speedup, 3), "measured": time.strftime("%Y-%m-%d")}

    return float(cached_measurement(path, key, measure_once)["bf16_speedup"]) >= MIN_GAIN


def bf16_supported(device: torch.device) -> bool:
    """Whether `train.precision=auto` trains in bf16 on `device`."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return cpu_bf16_pays()
    return False


def use_bf16(precision: str, device: torch.device) -> bool:
    if precision == "fp32":
        return False
    if precision == "bf16":
        return True
    if precision == "auto":
        return bf16_supported(device)
    raise ValueError(f"train.precision must be auto, bf16 or fp32, not {precision!r}")
