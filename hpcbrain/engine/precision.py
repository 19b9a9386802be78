"""Which precision `train.precision` means on a device; `auto` asks here, then the trainer's
kernel probe on the first batch (engine/bf16_check.py) may still send a run to fp32.

* CUDA: bf16 where the GPU has it (Ampere and later); CUDA autocast keeps normalisation and
  reductions in fp32.
* CPU, single and DDP engines (bf16 autocast): bf16 where the CPU has native bf16 (`amx_bf16` or
  `avx512_bf16` in /proc/cpuinfo) AND a conv block of the LSOR encoder's shape measured on this
  host runs at least `MIN_CPU_SPEEDUP` times faster in bf16 than in fp32 (measured once per CPU
  model and thread count, kept in $HPCBRAIN_CACHE_DIR/cpu_bf16.json). Both, because neither
  alone is enough: without native bf16 the block runs 26x *slower* (AMD EPYC, AVX2 only), and
  a flag says nothing of whether torch's kernels use it. Measured: AMD EPYC Zen 4 with
  AVX512-BF16, block 1.5-2.6x, the whole LSOR step 1.34-1.49x.
* CPU, DeepSpeed: fp32. DeepSpeed's bf16 is not autocast but bf16 parameters and buffers
  throughout (fp32 master weights in the optimizer), which the CPU trials never covered; on a
  CPU DeepSpeed is a debug mode of a GPU engine, where fp32 is the safer reference.

Then, for autocast engines, the first batch: every layer the method runs in bf16 is probed
against fp32 at its own shape, and one wrong layer makes the whole run fp32 (a warning names
it). On the Zen 4 above, torch 2.13's bf16 Conv3d weight gradient is wrong for inputs 2 voxels
wide, which every ResNet method has at 32³ and 64³: they train in fp32 there, LSOR and the
autoencoder baselines in bf16.

The rule was set in advance: `auto` picks bf16 on a CPU once `bench/cpu_bf16.py --trials 10`
survives 10 of 10 on a native-bf16 CPU. Measured (bench/README.md): LSOR 10 of 10 (2 of 6
before its latent's neighbours ran at full precision, `models.autoencoder.at_full_precision`);
the ResNet methods 0-2 of 3 when bf16 is forced, which is how the probe's bug was found.
`train.precision=fp32` or `bf16` overrides the choice either way.
"""
from __future__ import annotations

import logging
import statistics
import time

import torch

from hpcbrain.engine.host_cache import cache_path, cached_measurement, cpu_model, cpuinfo

log = logging.getLogger(__name__)

__all__ = ["MIN_CPU_SPEEDUP", "NATIVE_BF16_FLAGS", "bf16_supported", "conv_block_speedup",
           "cpu_bf16_pays", "native_bf16_flags", "use_bf16"]

#: /proc/cpuinfo flags of CPUs with bf16 arithmetic in hardware (Intel AMX; AVX512-BF16 on
#: Intel Cooper Lake and later, AMD Zen 4 and later).
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
#: bf16 must beat fp32 by this much on the conv block: the step as a whole gains less than the
#: convolutions (Zen 4: block 1.5-2.6x, step 1.34-1.49x), and a wash is not worth bf16's
#: rounding.
MIN_CPU_SPEEDUP = 1.2


def native_bf16_flags(text: str | None = None) -> list[str]:
    """Which of NATIVE_BF16_FLAGS this CPU (or the cpuinfo `text`) lists."""
    flags: set[str] = set()
    for line in (cpuinfo() if text is None else text).splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
    return [flag for flag in NATIVE_BF16_FLAGS if flag in flags]


def conv_block_speedup(repeats: int = 7) -> float:
    """fp32 time / bf16-autocast time of one conv block's forward and backward (Conv 16→32, BN,
    LeakyReLU, Conv 32→16 at 24³, batch 4: the LSOR encoder's shape), interleaved, medians."""
    generator = torch.Generator().manual_seed(0)
    # measured inside a run, once per host: the layers' initialisation must not move the run's
    # random stream, or a seeded run would differ between its host's first run and the next
    with torch.random.fork_rng(devices=[]):
        block = torch.nn.Sequential(
            torch.nn.Conv3d(16, 32, 3, padding=1), torch.nn.BatchNorm3d(32),
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


def cpu_bf16_pays(flags: list[str], speedup: float | None) -> bool:
    """The CPU rule of the module doc: native bf16 and a measured speedup of MIN_CPU_SPEEDUP."""
    return bool(flags) and speedup is not None and speedup >= MIN_CPU_SPEEDUP


def _host_speedup() -> float:
    key = f"{cpu_model()} | {torch.get_num_threads()} threads"
    path = cache_path("cpu_bf16.json")

    def measure_once() -> float:
        speedup = round(conv_block_speedup(), 3)
        log.info("bf16 conv block on this CPU (%s): %.2fx fp32 (measured once, cached in %s)",
                 key, speedup, path)
        return speedup

    return float(cached_measurement(path, key, measure_once))


def bf16_supported(device: torch.device, autocast: bool = True) -> bool:
    """Whether `train.precision=auto` trains in bf16 on `device` with an engine whose bf16 is
    autocast over fp32 weights (`autocast`) or bf16 weights (never on a CPU, see above)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu" or not autocast:
        return False
    flags = native_bf16_flags()
    # measured only where the flags allow it: a CPU without them is slow enough in bf16 (26x
    # fp32 on an AVX2 EPYC) that the measurement itself would cost seconds
    return cpu_bf16_pays(flags, _host_speedup() if flags else None)


def use_bf16(precision: str, device: torch.device, autocast: bool = True) -> bool:
    """`train.precision` for an engine whose bf16 is `autocast` (see `bf16_supported`)."""
    if precision == "fp32":
        return False
    if precision == "bf16":
        return True
    if precision == "auto":
        return bf16_supported(device, autocast)
    raise ValueError(f"train.precision must be auto, bf16 or fp32, not {precision!r}")
