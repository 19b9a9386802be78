"""Which precision `train.precision` means on a device; `auto` asks here.

* CUDA: bf16 where the GPU has it (Ampere and later); CUDA autocast keeps normalisation and
  reductions in fp32.
* CPU: fp32. bf16 autocast is faster on CPUs with native bf16 (measured on an AMD EPYC Zen 4
  with AVX512-BF16: an LSOR-shaped conv block 1.9-2.6x, the whole LSOR step 1.34x;
  `bench/cpu_bf16.py`, bench/README.md), but LSOR did not reliably survive it there: of three
  8-epoch smoke runs 0 and, measured again, 2 ended without a NaN. The first non-finite output
  of a failing run was the decoder's first convolution, fed LSOR's latent (values ~12 +- 0.4,
  where bf16's spacing is 1/16); since that boundary runs at full precision
  (`models.autoencoder._at_full_precision`) 3 of 3 runs survived — too few trials to tell
  from the old rate, on the one native-bf16 machine measured. `auto` picks bf16 on a CPU once
  `bench/cpu_bf16.py --trials 10` survives 10 of 10 on a native-bf16 CPU; until then
  `train.precision=bf16` forces it.
"""
from __future__ import annotations

import torch

__all__ = ["bf16_supported", "use_bf16"]


def bf16_supported(device: torch.device) -> bool:
    """Whether `train.precision=auto` trains in bf16 on `device` (see the module doc)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return False


def use_bf16(precision: str, device: torch.device) -> bool:
    if precision == "fp32":
        return False
    if precision == "bf16":
        return True
    if precision == "auto":
        return bf16_supported(device)
    raise ValueError(f"train.precision must be auto, bf16 or fp32, not {precision!r}")
