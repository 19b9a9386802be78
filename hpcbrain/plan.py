"""`hpcbrain plan`: will a config fit on a GPU, how large a batch fits, how long a step takes —
before anything is submitted.

Per GPU (one rank), the peak of a training step is

    model states (parameters, gradients, optimizer states; `model_states`)
  + activations and the step's transients (`Probe`: measured, linear in the micro-batch)
  + the CUDA context, cuDNN/NCCL workspaces and allocator slack (`CUDA_RESERVE_GIB`, assumed).

**Model states** are counted from the method's parameters and the engine: single / DDP keep fp32
weights, fp32 gradients and Adam's two fp32 moments (16 bytes a parameter; DDP adds its
gradient buckets, 4 more; bf16 autocast adds its bf16 weight copies, 2 more); DeepSpeed follows
the ZeRO paper's accounting — with bf16, 2 bytes of bf16 weights, 2 of gradients, 12 of fp32
master weights and moments, stage 1 dividing the 12 by the ranks, stage 2 the gradients too,
stage 3 the weights as well.

**Activations** are measured, not modelled: the method is built from the config (its networks,
its losses, `train.activation_checkpointing`), and two real training steps at micro-batches of
1 and 2 items run on this CPU at the config's input shape; torch's allocator events
(``torch.profiler`` with ``profile_memory``) give each step's peak above the model states held
before it, and the FLOP counter (``FlopCounterMode``) its FLOPs. Both are linear in the
micro-batch (every activation is), so the two steps give the value at any batch — checked
against a measured step at larger batches in ``bench/plan_memory.py``. The probe runs in fp32;
for bf16 (autocast on a GPU) the activations are taken as half (the saved activations are bf16),
an assumption until a GPU check measures it (``bench/gpu_check.sh``).

**Step time** = the step's FLOPs per GPU / (the GPU's dense peak × MFU). The MFU is an input:
`DEFAULT_MFU` unless given; the ``throughput/mfu`` a run of the same method logs is the value to
give.
"""
from __future__ import annotations

import copy
import math
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from omegaconf import DictConfig

from hpcbrain.gpus import GPU, GPUS

__all__ = ["GPU", "GPUS", "Probe", "ModelStates", "Plan", "probe_step", "model_states",
           "make_plan", "synthetic_batch", "measure_step_peak", "DEFAULT_MFU", "CUDA_RESERVE_GIB"]

GIB = 1024 ** 3
MIB = 1024 ** 2
#: per GPU: the CUDA context (~0.5 GiB), cuDNN and NCCL workspaces and the caching allocator's
#: fragmentation — not visible to the CPU probe, so kept aside
CUDA_RESERVE_GIB = 1.5
#: 3D convolutions with tens of channels reach a small share of a GPU's tensor-core peak
DEFAULT_MFU = 0.25
#: bf16 autocast keeps the activations it saves in bf16: half of the fp32 probe's (assumed)
BF16_ACTIVATION_FACTOR = 0.5


# ------------------------------------------------------------------------------------------
# the probe: two real steps on this CPU
# ------------------------------------------------------------------------------------------
def synthetic_batch(method, items: int, shape: tuple[int, int, int], seed: int = 0) -> dict:
    """A batch of `items` random volumes of `shape` in the form the method trains on (pairs of
    scans with their interval, or scans with an age)."""
    g = torch.Generator().manual_seed(seed)
    volume = lambda: torch.randn(items, 1, *shape, generator=g)  # noqa: E731
    if method.batch_kind == "pairs":
        return {"x_u": volume(), "x_v": volume(), "dt": 0.5 + torch.rand(items, generator=g),
                "index_u": torch.arange(items) * 2, "index_v": torch.arange(items) * 2 + 1}
    return {"x": volume(), "age": 60 + 20 * torch.rand(items, generator=g),
            "index": torch.arange(items)}


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def model_state_bytes(method, optimizer) -> int:
    """Bytes held between steps: parameters, buffers and the optimizer's state tensors."""
    return tensor_bytes(method.parameters()) + tensor_bytes(method.buffers()) + tensor_bytes(
        v for state in optimizer.state.values() for v in state.values()
        if isinstance(v, torch.Tensor))


@contextmanager
def _native_stderr_quiet() -> Iterator[None]:
    """The profiler's C++ side writes a line to file descriptor 2 at each start and stop;
    `hpcbrain plan` prints a table, so those go to /dev/null (Python's errors still raise)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def measure_step_peak(method, optimizer, make_batch: Callable[[], dict]) -> int:
    """Peak bytes torch allocates during one training step above what is allocated before it.
    The gradients are dropped before the step and the batch is made inside it, so the peak
    holds the batch, the gradients, the activations and every transient. (No FLOP counter
    here: a dispatch mode keeps checkpointed segments' tensors alive, measured +40 % on
    AdapN's checkpointed step; `step_flops` counts in a step of its own.)"""
    from torch.profiler import ProfilerActivity, profile

    optimizer.zero_grad(set_to_none=True)
    with _native_stderr_quiet(), \
            profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        batch = make_batch()
        losses = method(method.prepare_batch(batch))
        losses["loss"].backward()
        optimizer.step()
        del losses, batch
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    running = peak = 0
    for _, nbytes in events:
        running += nbytes
        peak = max(peak, running)
    return peak


def step_flops(method, batch: dict) -> float:
    """FLOPs of the matmuls and convolutions of one forward and backward (gradients kept out
    of the optimizer: nothing is stepped)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as flops:
        method(method.prepare_batch(batch))["loss"].backward()
    method.zero_grad(set_to_none=True)
    return float(flops.get_total_flops())


@dataclass(frozen=True)
class Probe:
    """Peak bytes above the model states, and FLOPs, of a step: intercept + slope × items."""

    bytes_at_zero: float
    bytes_per_item: float
    flops_per_item: float
    parameters: int
    item: str                    # "pair" or "scan"

    def dynamic_bytes(self, items: int) -> float:
        return self.bytes_at_zero + self.bytes_per_item * items


def build_for_probe(cfg: DictConfig):
    """(method, optimizer) as the job builds them, on this CPU in fp32, LSOR in its SOM phase."""
    from hpcbrain.config import input_shape
    from hpcbrain.engine.optimizer import build_optimizer
    from hpcbrain.methods import build_method, get_method_class
    from hpcbrain.methods.base import TrainingSetSize
    from hpcbrain.models.checkpointing import set_activation_checkpointing

    cfg = copy.deepcopy(cfg)
    method_class = get_method_class(str(cfg.method))
    # an auto-sized part (LSOR's grid) as for a large cohort: the paper's grid at most
    method_class.resolve_config(cfg[method_class.config_section], TrainingSetSize(600, 2400, 600))
    torch.manual_seed(0)
    method = build_method(cfg).train()
    if cfg.train.activation_checkpointing:
        set_activation_checkpointing(method)
    shape = input_shape(cfg)
    # the last epoch's step, as the trainer starts it (LSOR: the SOM phase, its SOM started
    # from the encoded batches — enough items for one per node)
    last = int(cfg.train.epochs) - 1
    batches = [synthetic_batch(method, 32, shape, seed=100)]
    method.on_epoch_start(last, lambda: iter(batches))
    method.set_progress(last, 0, 100)
    return method, build_optimizer(cfg.train, method), shape


def probe_step(cfg: DictConfig, items: tuple[int, int] = (1, 2)) -> Probe:
    """Two training steps of `cfg`'s method on this CPU (fp32) at micro-batches `items`."""
    method, optimizer, shape = build_for_probe(cfg)
    measure_step_peak(method, optimizer,                # optimizer states exist from here
                      lambda: synthetic_batch(method, items[0], shape, seed=1))
    measured = {n: measure_step_peak(method, optimizer,
                                     lambda n=n: synthetic_batch(method, n, shape, seed=2 + n))
                for n in items}
    a, b = items
    slope = (measured[b] - measured[a]) / (b - a)
    # FLOPs grow with the batch and start at 0 (every convolution and matmul runs per item)
    flops = step_flops(method, synthetic_batch(method, b, shape, seed=99)) / b
    return Probe(bytes_at_zero=measured[a] - slope * a, bytes_per_item=slope,
                 flops_per_item=flops,
                 parameters=sum(p.numel() for p in method.parameters()),
                 item="pair" if method.batch_kind == "pairs" else "scan")


# ------------------------------------------------------------------------------------------
# model states per engine
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelStates:
    parameters: float
    gradients: float
    optimizer: float

    @property
    def total(self) -> float:
        return self.parameters + self.gradients + self.optimizer


def model_states(n_params: int, engine: str, bf16: bool, zero_stage: int, world: int
                 ) -> ModelStates:
    """Bytes per rank of the weights, gradients and Adam states (see the module doc)."""
    p = float(n_params)
    if engine == "deepspeed":
        weights, grads, opt = (2 * p, 2 * p, 12 * p) if bf16 else (4 * p, 4 * p, 8 * p)
        if zero_stage >= 1:
            opt /= world
        if zero_stage >= 2:
            grads /= world
        if zero_stage >= 3:
            weights /= world
        return ModelStates(weights, grads, opt)
    weights = 4 * p + (2 * p if bf16 else 0.0)       # autocast's bf16 weight copies
    grads = 4 * p + (4 * p if engine == "ddp" else 0.0)   # DDP's gradient buckets
    return ModelStates(weights, grads, 8 * p)


# ------------------------------------------------------------------------------------------
# the plan
# ------------------------------------------------------------------------------------------
@dataclass
class Plan:
    method: str
    engine: str
    zero_stage: int
    world: int
    shape: tuple[int, int, int]
    bf16: bool
    checkpointing: bool
    global_batch: int
    micro_batch: int
    probe: Probe
    states: ModelStates
    memory_bytes: float | None   # the GPU's memory (or --memory-gib), None: unknown
    reserve_bytes: float
    gpu: GPU | None
    mfu: float

    @property
    def activations(self) -> float:
        """Bytes at the micro-batch (bf16-scaled when bf16)."""
        return self.activation_bytes(self.micro_batch)

    @property
    def peak(self) -> float:
        return self.states.total + self.activations

    def activation_bytes(self, items: int) -> float:
        scale = BF16_ACTIVATION_FACTOR if self.bf16 else 1.0
        # the probe's dynamic peak holds fp32 gradients (4 bytes a parameter): model states
        # count the gradients, so they are taken out of the activations here
        return max(0.0, scale * (self.probe.dynamic_bytes(items) - 4.0 * self.probe.parameters))

    def fits(self) -> bool | None:
        if self.memory_bytes is None:
            return None
        return self.peak + self.reserve_bytes <= self.memory_bytes

    def largest_micro_batch(self) -> int | None:
        """The largest micro-batch per GPU whose peak fits (0: not even one item)."""
        if self.memory_bytes is None:
            return None
        free = self.memory_bytes - self.reserve_bytes - self.states.total
        per_item = self.activation_bytes(2) - self.activation_bytes(1)
        base = self.activation_bytes(1) - per_item
        if per_item <= 0:
            return None
        return max(0, int(math.floor((free - base) / per_item)))

    def step_seconds(self) -> float | None:
        if self.gpu is None:
            return None
        peak = self.gpu.bf16_tflops if self.bf16 else self.gpu.fp32_tflops
        return self.probe.flops_per_item * self.micro_batch / (peak * 1e12 * self.mfu)

    def lines(self) -> list[str]:
        sides = " × ".join(map(str, self.shape))
        item = self.probe.item
        engine = self.engine + (f" ZeRO-{self.zero_stage}" if self.engine == "deepspeed" else "")
        out = [f"{self.method} on {self.world} GPU(s) ({engine}), input {sides}, "
               f"{'bf16' if self.bf16 else 'fp32'}, activation checkpointing "
               f"{'on' if self.checkpointing else 'off'}",
               f"batch {self.global_batch} {item}s global = {self.micro_batch} per GPU",
               "per GPU:",
               f"  parameters        {_size(self.states.parameters):>11}   "
               f"({self.probe.parameters:,} parameters)",
               f"  gradients         {_size(self.states.gradients):>11}",
               f"  optimizer states  {_size(self.states.optimizer):>11}   (Adam)",
               f"  activations       {_size(self.activations):>11}   "
               f"({_size(self.activation_bytes(2) - self.activation_bytes(1))} per {item}, "
               f"measured on this CPU at 1 and 2 {item}s"
               f"{'; bf16: half of fp32' if self.bf16 else ''})",
               f"  peak              {_size(self.peak):>11}   "
               f"+ {self.reserve_bytes / GIB:.1f} GiB kept for CUDA context and workspaces"]
        if self.memory_bytes is not None:
            where = self.gpu.name if self.gpu else "the given memory"
            share = 100 * (self.peak + self.reserve_bytes) / self.memory_bytes
            verdict = "fits" if self.fits() else "DOES NOT FIT"
            largest = self.largest_micro_batch()
            out.append(f"on {where} ({self.memory_bytes / GIB:.1f} GiB): {verdict} "
                       f"({share:.0f} % of it); the largest micro-batch that fits: {largest} "
                       f"{item}s per GPU (global {largest * self.world})")
        seconds = self.step_seconds()
        if seconds is not None:
            peak = self.gpu.bf16_tflops if self.bf16 else self.gpu.fp32_tflops
            out.append(f"step: {self.probe.flops_per_item * self.micro_batch / 1e12:.2f} TFLOP "
                       f"per GPU at {100 * self.mfu:.0f} % MFU of {peak:g} TFLOP/s → "
                       f"{seconds * 1e3:.0f} ms")
        return out


def _size(nbytes: float) -> str:
    return f"{nbytes / GIB:.2f} GiB" if nbytes >= GIB / 10 else f"{nbytes / MIB:.1f} MiB"


def make_plan(cfg: DictConfig, world: int, gpu: GPU | None = None,
              memory_gib: float | None = None, mfu: float = DEFAULT_MFU,
              bf16: bool | None = None, probe: Probe | None = None) -> Plan:
    """The plan of `cfg` (data.input_size resolved) on `world` GPUs. `bf16`: default as the
    engine would decide on a GPU (train.precision auto or bf16 → bf16)."""
    from hpcbrain.config import input_shape
    from hpcbrain.config_checks import check_global_batch
    from hpcbrain.engine.registry import resolve_engine_name

    engine = resolve_engine_name(str(cfg.engine.name), world)
    if bf16 is None:
        bf16 = str(cfg.train.precision) in ("auto", "bf16")
    probe = probe or probe_step(cfg)
    micro = check_global_batch(cfg, world)
    stage = int(cfg.engine.zero_stage or 0) if engine == "deepspeed" else 0
    states = model_states(probe.parameters, engine, bf16, stage, world)
    memory = gpu.memory_gib * GIB if gpu else (memory_gib * GIB if memory_gib else None)
    return Plan(str(cfg.method), engine, stage, world, input_shape(cfg), bf16,
                bool(cfg.train.activation_checkpointing), int(cfg.train.batch_size), micro,
                probe, states, memory, CUDA_RESERVE_GIB * GIB if memory else 0.0, gpu,
                float(mfu))


def resolve_shape(cfg: DictConfig) -> None:
    """data.input_size from the store when it is auto; StoreError saying what to pass when the
    store is not on this machine."""
    from pathlib import Path

    from hpcbrain.data.store import StoreError
    from hpcbrain.job import open_store

    if cfg.data.input_size != "auto":
        return
    if not Path(str(cfg.data.store)).exists():
        raise StoreError(f"data.input_size is auto (the store's shape) and data.store "
                         f"{cfg.data.store} is not on this machine: point data.store at it, or "
                         f"give the shape, e.g. data.input_size=64 or data.input_size=[80,96,80]")
    open_store(cfg)


def describe_gpus() -> str:
    return ", ".join(GPUS)


def plan_from_args(cfg: DictConfig, nodes: int, gpus_per_node: int, gpu: str | None,
                   memory_gib: float | None, mfu: float) -> Plan:
    if gpu is not None and gpu not in GPUS:
        raise ValueError(f"--gpu {gpu!r}: known GPUs are {describe_gpus()} (or give "
                         f"--memory-gib M)")
    resolve_shape(cfg)
    return make_plan(cfg, max(1, nodes) * max(1, gpus_per_node), GPUS.get(gpu) if gpu else None,
                     memory_gib, mfu)


def describe(plan: Plan) -> str:
    return "\n".join(plan.lines())


def submit_check(cfg: DictConfig, world: int) -> tuple[str, bool] | None:
    """(what `launch/submit.py` prints, whether the job fits) when ``slurm.gpu`` names the
    nodes' GPU; None when it does not, or the input shape cannot be known here (the store is
    not on this machine and data.input_size is auto)."""
    if not cfg.slurm.gpu or not int(cfg.slurm.gpus_per_node):
        return None
    from pathlib import Path

    if cfg.data.input_size == "auto" and not Path(str(cfg.data.store)).exists():
        return None
    cfg = copy.deepcopy(cfg)
    plan = plan_from_args(cfg, 1, world, str(cfg.slurm.gpu), None, DEFAULT_MFU)
    fits = bool(plan.fits())
    largest = plan.largest_micro_batch()
    if fits:
        text = (f"plan: {_size(plan.peak)} a GPU of the {plan.gpu.name}'s "
                f"{plan.gpu.memory_gib:.0f} GiB (largest micro-batch that fits: {largest})")
    else:
        text = (f"warning: this job will not fit: a step needs about {_size(plan.peak)} per GPU "
                f"+ {CUDA_RESERVE_GIB:g} GiB for CUDA, the {plan.gpu.name} has "
                f"{plan.gpu.memory_gib:.0f} GiB. The largest micro-batch that fits is {largest} "
                f"(train.batch_size={largest * plan.world} over {plan.world} GPUs); or set "
                f"train.activation_checkpointing=true. Details: hpcbrain plan --cfg … "
                f"--gpu {plan.gpu.name}")
    return text, fits

