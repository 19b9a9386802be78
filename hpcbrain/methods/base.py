"""The method interface the engine drives, and the registry that finds methods by name.

A method is one `torch.nn.Module` that owns its networks, its losses and all its training state
(EMA buffers, SOM grids, phase flags: registered as parameters/buffers so `state_dict()` carries
them). The engine never knows which method it runs:

* ``set_progress(epoch, step_in_epoch, steps_per_epoch)`` before every training step
  (epoch and step counted from 0) drives schedules;
* ``on_epoch_start(epoch, encode_batches)`` at the start of every epoch, on every rank (it may
  run collectives), handles phase transitions;
* ``forward(batch)`` IS the training step (so DDP/DeepSpeed wrappers see it) and returns the
  losses, ``"loss"`` being the total to backpropagate;
* ``validation_step(batch)`` returns the same losses without changing any state;
* ``scalars()`` returns schedule values worth logging; ``encoder()`` the volume → latent network.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Optional

import torch
from torch import Tensor

__all__ = ["Method", "TrainingSetSize", "register_method", "build_method", "available_methods",
           "get_method_class"]


class Method(torch.nn.Module):
    #: "pairs": dicts with x_u [B,1,S,S,S], x_v, dt [B] (years) and index tensors;
    #: "scans": dicts with x [B,1,S,S,S], age, ...
    batch_kind: ClassVar[str] = "scans"
    #: The config section of the method's own keys (`config.MethodSections.own`): the method
    #: is built from it and the shared ones (`from_config`), never from the whole config.
    config_section: ClassVar[str] = ""
    #: True when some parameters receive no gradient in some phase (DDP needs
    #: ``find_unused_parameters=True`` then).
    find_unused_parameters: ClassVar[bool] = False
    #: Buffers a mixed-precision engine must keep in float32 (e.g. an EMA that bf16 would round).
    fp32_buffers: ClassVar[tuple[str, ...]] = ()
    #: Evaluations the job runs after training (rank 0): ridge age regression on the frozen
    #: features of `encoder()` (`hpcbrain.evaluate.ridge`), and the SOM grid's interpretability
    #: (`hpcbrain.evaluate.interpretability`; the method then provides ``grid`` and ``bmu``).
    ridge_evaluation: ClassVar[bool] = False
    som_evaluation: ClassVar[bool] = False
    #: True when training sees the scans' ages (a supervised or regression-aware loss): the
    #: features of training scans are then fitted to their ages, so cross-fitted residuals over
    #: training subjects under-state the error on new subjects, and the registered age model is
    #: calibrated on held-out validation subjects (`evaluate.age_calibration_subjects: auto`).
    learns_from_age: ClassVar[bool] = False

    def __init__(self) -> None:
        super().__init__()
        self.epoch = 0
        self.step_in_epoch = 0
        self.steps_per_epoch = 1
        self._parameter_writer: Optional[Callable[[torch.nn.Parameter, Tensor], None]] = None
        #: data.augment applied on the device (data.augment_on=device): installed by the job,
        #: called by the engines on every training batch once it is on the device
        self.batch_augmentation: Optional[Callable[[dict[str, Any]], dict[str, Any]]] = None

    def set_parameter_writer(self, writer: Optional[Callable[[torch.nn.Parameter, Tensor], None]]
                             ) -> None:
        """Installed by an engine whose optimizer keeps its own copy of the parameters
        (DeepSpeed: fp32 master weights, ZeRO partitions), so that `write_parameter` updates that
        copy too; None: plain copies."""
        self._parameter_writer = writer

    @torch.no_grad()
    def write_parameter(self, param: torch.nn.Parameter, value: Tensor) -> None:
        """Give `param` a new value outside the optimizer (LSOR's k-means SOM initialisation):
        through the engine's writer when one is installed (it also resets the optimizer state
        of `param`), else a plain copy (a `.data.copy_` alone would be overwritten by a
        master copy at the next step)."""
        if self._parameter_writer is not None:
            self._parameter_writer(param, value)
        else:
            param.data.copy_(value.to(device=param.device, dtype=param.dtype))

    def prepare_batch(self, batch: dict[str, Any]) -> dict[str, Any]:
        """A training batch already on the device, as `forward` takes it: augmented here when
        ``batch_augmentation`` is installed (batches without augmentation keys pass through)."""
        if self.batch_augmentation is None:
            return batch
        with torch.no_grad():
            return self.batch_augmentation(batch)

    def forward(self, batch: dict[str, Any]) -> dict[str, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    @torch.no_grad()
    def validation_step(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """Default: the training losses in eval mode, mode restored afterwards."""
        was_training = self.training
        self.eval()
        try:
            return self.forward(batch)
        finally:
            self.train(was_training)

    def set_progress(self, epoch: int, step_in_epoch: int, steps_per_epoch: int) -> None:
        self.epoch = int(epoch)
        self.step_in_epoch = int(step_in_epoch)
        self.steps_per_epoch = max(int(steps_per_epoch), 1)

    def on_epoch_start(self, epoch: int, encode_batches: Callable[[], Iterable[dict]]) -> None:
        self.epoch = int(epoch)

    def on_epoch_end(self, epoch: int, encode_batches: Callable[[], Iterable[dict]]) -> dict[str, float]:
        """Called on every rank after each training epoch (it may run collectives); returns
        health metrics worth logging and showing on the progress line (same on every rank)."""
        return {}

    def scalars(self) -> dict[str, float]:
        return {}

    def parameter_groups(self) -> list[dict[str, Any]]:
        """Optimizer parameter groups; a group's ``lr_scale`` multiplies train.lr for its
        parameters (and every lr schedule applied to it). Default: one group of everything."""
        return [{"params": list(self.parameters()), "lr_scale": 1.0}]

    @classmethod
    def from_config(cls, cfg: Any) -> "Method":
        """This method built from the sections of a job's config it reads (`MethodSections`)."""
        from hpcbrain.config import method_sections

        return cls(method_sections(cfg, cls.config_section))

    @classmethod
    def resolve_config(cls, own: Any, training: "TrainingSetSize") -> None:
        """Settle values of the method's own config section `own` that depend on the training
        set (its size: items of ``batch_kind``, scans, subjects) in place, before the method is
        built, so every later `build_method(cfg)` (export, evaluation) builds the same shapes.
        Default: nothing to settle."""

    def registry_files(self, folder: Path) -> list[Path]:
        """Files (written into `folder`) that travel with the registered encoder, for what
        `hpcbrain embed` adds to the latents (LSOR: its SOM grid). Default: none."""
        return []

    def encoder(self) -> torch.nn.Module:  # pragma: no cover - abstract
        raise NotImplementedError


@dataclass(frozen=True)
class TrainingSetSize:
    """What `Method.resolve_config` may size things by."""

    items: int          # what a batch is made of (``batch_kind``: pairs or scans)
    scans: int
    subjects: int


_REGISTRY: dict[str, type[Method]] = {}


def register_method(name: str) -> Callable[[type[Method]], type[Method]]:
    """Class decorator: ``@register_method("lsor")``."""

    def deco(cls: type[Method]) -> type[Method]:
        if not (isinstance(cls, type) and issubclass(cls, Method)):
            raise TypeError(f"{cls!r} is not a Method subclass")
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"method name {name!r} is already registered by {_REGISTRY[name].__qualname__}")
        _REGISTRY[name] = cls
        cls.method_name = name  # type: ignore[attr-defined]
        return cls

    return deco


def _import_all_methods() -> None:
    """Import every module of `hpcbrain.methods` so their decorators register them."""
    pkg = importlib.import_module("hpcbrain.methods")
    for info in pkgutil.iter_modules(pkg.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"hpcbrain.methods.{info.name}")


def available_methods() -> list[str]:
    _import_all_methods()
    return sorted(_REGISTRY)


def get_method_class(name: str) -> type[Method]:
    if name not in _REGISTRY:
        _import_all_methods()
    if name not in _REGISTRY:
        raise KeyError(f"unknown method {name!r}; registered methods: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def build_method(cfg: Any) -> Method:
    """The method named by ``cfg.method``, built from the config sections it reads."""
    return get_method_class(str(cfg.method)).from_config(cfg)
