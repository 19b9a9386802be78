"""The GPUs hpcbrain knows: memory and dense peak FLOP/s (NVIDIA data sheets, SXM parts).

One table for `hpcbrain plan --gpu NAME` (memory, peak) and for the MFU a run logs
(`engine.flops`: the peak of the GPU torch reports, found by its name). No torch import here:
the command line lists the names in its help.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["GPU", "GPUS", "peak_tflops_of_device"]


@dataclass(frozen=True)
class GPU:
    name: str                   # what `--gpu` and slurm.gpu take
    device_name: str            # a fragment of torch.cuda.get_device_name
    memory_gib: float           # as the card reports it
    bf16_tflops: float          # dense peak, tensor cores
    fp32_tflops: float          # dense peak without TF32


#: in the order device names are matched ("A100" before "A10")
GPUS: dict[str, GPU] = {g.name: g for g in (
    GPU("h200-141gb", "H200", 139.8, 989.0, 67.0),
    GPU("h100-80gb", "H100", 79.6, 989.0, 67.0),
    GPU("a100-80gb", "A100", 79.2, 312.0, 19.5),
    GPU("a100-40gb", "A100", 39.4, 312.0, 19.5),
    GPU("l40s-48gb", "L40S", 44.4, 362.0, 91.6),
    GPU("a10-24gb", "A10", 22.1, 125.0, 31.2),
    GPU("v100-32gb", "V100", 31.7, 125.0, 15.7),      # fp16 tensor cores: V100 has no bf16
    GPU("v100-16gb", "V100", 15.8, 125.0, 15.7),
)}


def peak_tflops_of_device(device_name: str) -> tuple[float, float] | None:
    """(bf16, fp32) dense peak of the GPU torch names `device_name`; None when unknown. A PCIe
    card of the same name is slower, so its MFU reads a little low."""
    for gpu in GPUS.values():
        if gpu.device_name in device_name:
            return gpu.bf16_tflops, gpu.fp32_tflops
    return None
