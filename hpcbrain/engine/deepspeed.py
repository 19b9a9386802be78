"""DeepSpeed: ZeRO stages 0–3, bf16, gradient accumulation and clipping, sharded checkpoints.

The DeepSpeed JSON (`engine.deepspeed_config`, a path or a name under configs/) supplies what
only DeepSpeed knows (ZeRO stage and its bucket sizes, offload, ...). The keys hpcbrain's config
also decides are always filled in from it, so the two never disagree:

    train_batch_size               = train.batch_size (the global batch)
    train_micro_batch_size_per_gpu = train.batch_size / (world · engine.grad_accum_steps)
    gradient_accumulation_steps    = engine.grad_accum_steps
    gradient_clipping              = engine.grad_clip (0 = off)
    bf16.enabled                   = train.precision (auto: bf16 where the hardware has it)
    fp16.enabled                   = false
    zero_optimization.stage        = engine.zero_stage, when set

The optimizer is a torch Adam built by hpcbrain from train.lr / train.weight_decay and passed in
(so DeepSpeed builds no FusedAdam/CPUAdam extension); an "optimizer" or "scheduler" section in
the JSON is dropped with a warning.

bf16: DeepSpeed casts the parameters to bf16 and keeps fp32 master weights in the optimizer.
Buffers are cast to bf16 too (`data_types.buffer_dtype`: BatchNorm's running statistics must
match its bf16 weights, CPU batch_norm refuses the mix) except those the method lists in
`fp32_buffers` (LSOR: ΔG, an EMA that bf16 would round away), kept fp32 through
`data_types.keep_in_fp32_modules`; `_check_fp32_buffers` restores them should a DeepSpeed
version cast them anyway. Parameters a method writes outside the optimizer (LSOR's k-means G)
go through `write_parameter`, which updates the fp32 master too.

Checkpoints: `run_dir/checkpoints/deepspeed/step-NNNNNNNNN/` written by EVERY rank (each its own
optimizer shard), `latest` naming the newest complete one (DeepSpeed writes it last, so a job
killed while saving resumes from the previous one). They are read with ``weights_only=True``
(`WeightsOnlyCheckpointEngine`): tensors, plain values and the three DeepSpeed classes its own
files hold, so a crafted shard runs no code. Our client state (epoch, global step, RNG
states of every rank, config, MLflow run id) rides in the model-states file. ZeRO checkpoints
are tied to the world size they were written with.
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from hpcbrain import dist
from hpcbrain.config_checks import micro_batch
from hpcbrain.engine import checkpoint
from hpcbrain.engine.optimizer import build_optimizer
from hpcbrain.engine.registry import register_engine
from hpcbrain.engine.single import (
    ParameterWriter,
    check_finite,
    refuse_other_checkpoints,
    set_group_lrs,
    to_device,
)

log = logging.getLogger(__name__)


class DeepSpeedGroup:
    """The `process_group.GroupInitializer` of DeepSpeed runs: `deepspeed.init_distributed`
    makes (or wraps) the torch default group, so DeepSpeed's comm layer owns its backend, and
    its destroy releases the groups DeepSpeed cached, so a later group in the same process
    (tests, notebooks) starts clean."""

    @staticmethod
    def _import(device_type: str):
        os.environ.setdefault("DS_ACCELERATOR", device_type)   # cuda | cpu: no guessing
        import deepspeed

        return deepspeed

    def init_group(self, backend: str, timeout, rank: int, world_size: int,
                   device: torch.device) -> None:
        self._import(device.type).init_distributed(
            dist_backend=backend, auto_mpi_discovery=False, timeout=timeout,
            init_method="env://", rank=rank, world_size=world_size)

    def adopt_group(self, timeout) -> None:
        import torch.distributed as torch_dist

        self._import("cuda" if torch.cuda.is_available() else "cpu").init_distributed(
            dist_backend=torch_dist.get_backend(), auto_mpi_discovery=False, timeout=timeout)

    def destroy_group(self) -> None:
        import deepspeed.comm as ds_comm
        import torch.distributed as torch_dist

        if getattr(ds_comm.comm, "cdb", None) is not None:
            ds_comm.destroy_process_group()
        else:
            torch_dist.destroy_process_group()


def load_deepspeed_json(name: str | Path) -> dict[str, Any]:
    from hpcbrain.config import resolve_config_path

    path = resolve_config_path(name)
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc}); engine.deepspeed_config must name a "
                         f"DeepSpeed config file") from None


def deepspeed_config(engine: Any, train: Any, world_size: int, bf16: bool,
                     fp32_buffers: Sequence[str] = ()) -> dict[str, Any]:
    """The DeepSpeed config dict for this run: the JSON `engine.deepspeed_config` with
    hpcbrain's keys filled in from the `engine` and `train` config sections.

    fp32_buffers: buffer names (the method's `fp32_buffers`) kept in fp32 under bf16."""
    ds = copy.deepcopy(load_deepspeed_json(engine.deepspeed_config))
    accum = int(engine.grad_accum_steps)
    global_batch = int(train.batch_size)
    wanted: dict[str, Any] = {
        "train_batch_size": global_batch,
        "train_micro_batch_size_per_gpu": micro_batch(global_batch, accum, world_size),
        "gradient_accumulation_steps": accum,
        "gradient_clipping": float(engine.grad_clip or 0.0),
    }
    changed = [f"{k}: {ds[k]} -> {v}" for k, v in wanted.items() if k in ds and ds[k] != v]
    ds.update(wanted)
    for section in ("optimizer", "scheduler"):
        if section in ds:
            log.warning("deepspeed config: dropping its %r section; hpcbrain passes a torch Adam "
                        "(train.lr, train.weight_decay)", section)
            ds.pop(section)
    if ds.get("fp16", {}).get("enabled"):
        changed.append("fp16.enabled: true -> false (hpcbrain supports fp32 and bf16)")
    ds["fp16"] = {**ds.get("fp16", {}), "enabled": False}
    if bool(ds.get("bf16", {}).get("enabled", False)) != bf16:
        changed.append(f"bf16.enabled -> {bf16} (train.precision)")
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": bool(bf16)}
    if bf16:
        # bf16 parameters need bf16 BatchNorm running statistics (CPU batch_norm refuses the
        # mix); statistics a method accumulates on purpose stay fp32 (LSOR's ΔG).
        types = ds.setdefault("data_types", {})
        types.setdefault("buffer_dtype", "bf16")
        keep = types.get("keep_in_fp32_modules")
        keep = [] if keep in (None, "auto") else list(keep)
        types["keep_in_fp32_modules"] = keep + [f"^{name}$" for name in fp32_buffers
                                                if f"^{name}$" not in keep]
    zero = ds.setdefault("zero_optimization", {"stage": 0})
    if engine.zero_stage is not None:
        stage = int(engine.zero_stage)
        if stage not in (0, 1, 2, 3):
            raise ValueError(f"engine.zero_stage must be 0, 1, 2 or 3, got {stage}")
        if zero.get("stage", 0) != stage:
            changed.append(f"zero_optimization.stage: {zero.get('stage', 0)} -> {stage}")
        zero["stage"] = stage
    ds.setdefault("steps_per_print", 10**9)   # our trainer logs; DeepSpeed's own is noise
    if changed and dist.is_global_rank0():
        log.info("deepspeed config %s, set from the hpcbrain config: %s",
                 engine.deepspeed_config, "; ".join(changed))
    return ds


def deepspeed_checkpoint_globals() -> list[type]:
    """What DeepSpeed pickles into its checkpoint files besides tensors and plain values, found
    with `torch.serialization.get_unsafe_globals_in_checkpoint` on ZeRO 0-3 in fp32 and bf16
    (DeepSpeed 0.19): the ZeRO stage enum, the (unused, static) loss scaler and the fragment
    addresses of ZeRO-1/2's flat groups."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, fragment_address]


def weights_only_checkpoint_engine(config: Any):
    """DeepSpeed's torch checkpoint engine, loading with ``weights_only=True`` (its own loads
    with False: any pickle in a shared run folder would run on the next resume)."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            return checkpoint.load_weights_only(
                path, map_location, allowed=deepspeed_checkpoint_globals(),
                holds="tensors, plain values and DeepSpeed's own checkpoint classes",
                advice="Remove this checkpoint folder if you did not write it")

    return WeightsOnlyCheckpointEngine(config)


@register_engine("deepspeed")
class DeepSpeedEngine:
    needs_process_group = True           # its comm layer wraps a torch group, even of one
    multi_process = True
    # DeepSpeed's bf16 casts the parameters themselves, fixed when the engine is built
    bf16_is_autocast = False
    # it flattens parameters into contiguous buffers and refuses channels-last strides
    channels_last = False
    checkpoint_kind = "DeepSpeed"        # a folder per tag, a shard per rank

    @classmethod
    def build(cls, engine: Any, train: Any, method: nn.Module, device: torch.device,
              bf16: bool):
        return cls(method, build_optimizer(train, method), device,
                   deepspeed_config(engine, train, dist.world_size(), bf16, method.fp32_buffers))

    @staticmethod
    def process_group_initializer():
        return DeepSpeedGroup()

    @staticmethod
    def find_checkpoint(run_dir: Path) -> Path | None:
        tag = checkpoint.latest_deepspeed_tag(run_dir)
        return checkpoint.deepspeed_dir(run_dir) / tag if tag else None

    def __init__(self, method: nn.Module, optimizer: torch.optim.Optimizer,
                 device: torch.device, ds_config: dict[str, Any]):
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if device.type == "cuda" else "cpu")
        import deepspeed

        if not dist.is_initialized():
            raise RuntimeError("engine.name=deepspeed needs a process group: call "
                               "hpcbrain.process_group.setup_distributed(require_group=True, "
                               "initializer=DeepSpeedGroup()) first")
        fp32_buffers = {name: buf.dtype for name, buf in method.named_buffers()
                        if name in method.fp32_buffers}
        self.model, self.optimizer, _, _ = deepspeed.initialize(
            model=method, optimizer=optimizer, config=ds_config)
        self.torch_optimizer = optimizer   # what DeepSpeed steps (directly only at ZeRO-0 fp32)
        # hpcbrain configures no decoupled/fast writer, so DeepSpeed made its plain torch
        # engine; swap in the same engine with a safe loader (saving is unchanged)
        self.model.checkpoint_engine = weights_only_checkpoint_engine(self.model._config)
        self.method = method
        method.set_parameter_writer(ParameterWriter(self))
        self.device = device
        self.ds_config = ds_config
        self.bf16 = bool(self.model.bfloat16_enabled())
        self.grad_accum_steps = int(self.model.gradient_accumulation_steps())
        self.zero_stage = int(self.model.zero_optimization_stage())
        self._check_fp32_buffers(fp32_buffers)

    def _check_fp32_buffers(self, before: dict[str, torch.dtype]) -> None:
        """Statistics a method accumulates (LSOR's ΔG EMA) must not be rounded to bf16."""
        for name, buf in self.method.named_buffers():
            if name in before and buf.dtype != before[name]:
                buf.data = buf.data.to(before[name])
                log.info("deepspeed cast buffer %s to %s; restored %s", name, buf.dtype,
                         before[name])

    @torch.no_grad()
    def write_parameter(self, param: nn.Parameter, value: torch.Tensor) -> None:
        """New value for `param` in the model AND in DeepSpeed's fp32 master copy (ZeRO 1–3,
        bf16), its Adam moments zeroed. Call on every rank with the same value. Writing
        `param.data` alone is undone by the next step, which copies the old master back.

        Everything here is local to each rank (its own partition), so ranks holding no piece
        of `param` cannot fall out of step with the others."""
        import deepspeed
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        value = value.detach().to(device=self.device, dtype=torch.float32)
        stepped = self.model.global_steps > 0   # Adam state exists (same answer on every rank)
        if hasattr(param, "ds_id"):             # ZeRO-3: the parameter lives in partitions
            with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                if dist.is_global_rank0():
                    param.data.copy_(value.to(param.dtype))
            safe_set_full_fp32_param(param, value)
            if stepped:
                for key in ("exp_avg", "exp_avg_sq"):
                    safe_set_full_optimizer_state(param, torch.zeros_like(value), key)
            return
        param.data.copy_(value.to(param.dtype))
        mapping = getattr(param, "_hp_mapping", False)
        if mapping is False:                    # ZeRO-0 fp32: DeepSpeed steps our torch Adam
            self.torch_optimizer.state.pop(param, None)
            return
        safe_set_full_fp32_param(param, value)  # ZeRO-1/2 and the bf16 optimizer
        if stepped and mapping is not None:
            link = getattr(self.optimizer, "_lazy_init_hp_params_optimizer_state", None)
            if link is not None:                # links fragments to the (loaded) Adam state
                link()
            for key in ("exp_avg", "exp_avg_sq"):
                if key in mapping.optim_fragment:
                    mapping.optim_fragment[key].zero_()

    def train_step(self, batch: dict[str, Any], where: str) -> dict[str, torch.Tensor]:
        self.model.train()
        # As DDP: BatchNorm running statistics follow rank 0, so every rank (and the
        # checkpoint, which holds rank 0's module state) has the same model.
        dist.broadcast_buffers(self.method)
        losses = self.model(self.method.prepare_batch(to_device(batch, self.device)))
        check_finite(losses, where)
        self.model.backward(losses["loss"])   # scales by 1/accumulation steps itself
        self.model.step()                     # steps the optimizer at accumulation boundaries
        return {k: v.detach() for k, v in losses.items()}

    def disable_bf16(self) -> None:
        raise RuntimeError("a DeepSpeed engine's bf16 is set when it is built (bf16 weights, "
                           "not autocast): set train.precision=fp32 instead")

    @torch.no_grad()
    def validation_step(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        self.method.eval()
        # ZeRO-3 gathers a module's parameters in its forward hooks; validation_step is not a
        # forward of the top module, so its own parameters (LSOR's G) are gathered here.
        with self._gathered(list(self.method.parameters(recurse=False))):
            return self.method.validation_step(to_device(batch, self.device))

    def _gathered(self, params: list[nn.Parameter]):
        if self.zero_stage != 3 or not params:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)

    def full_parameters(self):
        """All parameters whole on every rank (read-only; a collective under ZeRO-3)."""
        return self._gathered(list(self.method.parameters()))

    def method_state_dict(self) -> dict[str, torch.Tensor]:
        """The method's state with every parameter whole and in fp32 (DeepSpeed's master
        weights where it keeps them). A collective under ZeRO: call on every rank."""
        from deepspeed.utils import safe_get_full_fp32_param

        state = {}
        for name, param in self.method.named_parameters():
            full = safe_get_full_fp32_param(param)
            full = param.detach() if full is None else full
            shape = getattr(param, "ds_shape", param.shape)   # ZeRO-3 holds a partition
            state[name] = full.reshape(shape).to("cpu", torch.float32)
        for name, value in self.method.state_dict().items():
            if name not in state:   # buffers: never partitioned
                state[name] = value.detach().to("cpu")
        return state

    def export_method(self, build: Callable[[], nn.Module]) -> nn.Module:
        """A fresh fp32 method (from `build`) holding the trained state; call on every rank."""
        state = self.method_state_dict()
        method = build()
        method.load_state_dict(state)   # copies cast bf16 buffers back to fp32
        return method.to(self.device).eval()

    @property
    def lr(self) -> float:
        return float(self.model.get_lr()[0])

    def set_lr(self, lr: float) -> None:
        # DeepSpeed's optimizer wraps the torch one (ZeRO, bf16) but keeps its own param_groups
        # list at some stages: set both, each once
        for optimizer in {id(o): o for o in (self.optimizer, self.torch_optimizer)}.values():
            set_group_lrs(optimizer, lr)

    # --- checkpoints: every rank writes its shard ---------------------------------------------
    def latest_checkpoint(self, run_dir: Path) -> Path | None:
        return self.find_checkpoint(run_dir)

    def save_checkpoint(self, run_dir: Path, global_step: int,
                        client_state: dict[str, Any]) -> Path:
        folder = checkpoint.deepspeed_dir(run_dir)
        tag = checkpoint.deepspeed_tag(global_step)
        checkpoint.check_finite_everywhere(self._local_parameters(),
                                           f"checkpoint {folder / tag} not written", self.device)
        self.model.save_checkpoint(str(folder), tag=tag, client_state=client_state)
        if dist.is_global_rank0():
            checkpoint.prune_deepspeed(run_dir)
        dist.barrier()
        return folder / tag

    def load_checkpoint(self, run_dir: Path) -> dict[str, Any] | None:
        tag = checkpoint.latest_deepspeed_tag(run_dir)
        if tag is None:
            refuse_other_checkpoints(run_dir, type(self), self.name)
            return None
        folder = checkpoint.deepspeed_dir(run_dir)
        path, client_state = self.model.load_checkpoint(str(folder), tag=tag)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {folder / tag}")
        checkpoint.check_finite_everywhere(self._local_parameters(),
                                           f"checkpoint {folder / tag} loaded", self.device)
        client_state = dict(client_state or {})
        client_state["path"] = folder / tag
        return client_state

    def _local_parameters(self) -> dict[str, torch.Tensor]:
        """What this rank holds of each parameter: the whole tensor at ZeRO 0-2, its partition
        (DeepSpeed's ``ds_tensor``) at ZeRO-3, where the parameter itself is an empty stub."""
        named = self.model.module.named_parameters()
        if self.zero_stage == 3:
            return {name: param.ds_tensor for name, param in named}
        return dict(named)
