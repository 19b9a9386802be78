"""Engines by name, registered like methods: ``@register_engine("ddp")`` on the class.

The registry is the one list of engine names (`engine_names`: the config checks ask it), and
what differs between engines is declared on each engine class and asked of it, never inferred
from its name:

    needs_process_group   it runs inside a torch.distributed group, even of one process
    multi_process         it can train with more than one process
    bf16_is_autocast      its bf16 is autocast over fp32 weights (else bf16 weights, fixed
                          when it is built: `precision.use_bf16` never picks it on a CPU)
    channels_last         it accepts channels-last (NDHWC) weights
    checkpoint_kind       what a person calls its checkpoints (single/DDP, DeepSpeed); engines
                          of one kind resume each other's run folders
    find_checkpoint(run_dir)        its kind's newest checkpoint in a run folder, or None
    process_group_initializer()     what starts its process group (None: torch's default)
    build(engine, train, method, device, bf16)  the engine around `method`, from the
                          `engine` and `train` config sections

Adding an engine: one module in hpcbrain/engine/ with a registered class, and its config keys
in the `engine` section. `auto` is a policy, not an engine: `single` for one process, `ddp` for
several.
"""
from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path
from typing import Callable

__all__ = ["register_engine", "engine_names", "get_engine_class", "resolve_engine_name",
           "engine_class_for", "other_checkpoints", "engines_of_kind", "AUTO"]

AUTO = "auto"
_ONE_PROCESS, _SEVERAL_PROCESSES = "single", "ddp"     # what `auto` resolves to
_REGISTRY: dict[str, type] = {}


def register_engine(name: str) -> Callable[[type], type]:
    """Class decorator: ``@register_engine("ddp")``; sets the class's `name`."""

    def deco(cls: type) -> type:
        if name == AUTO:
            raise ValueError(f"{AUTO!r} is the engine policy's name, not an engine's")
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"engine name {name!r} is already registered by "
                             f"{_REGISTRY[name].__qualname__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def _import_all_engines() -> None:
    package = importlib.import_module("hpcbrain.engine")
    for info in pkgutil.iter_modules(package.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"hpcbrain.engine.{info.name}")


def engine_names() -> tuple[str, ...]:
    """Every registered engine's name (what `engine.name` may be, besides auto)."""
    _import_all_engines()
    return tuple(sorted(_REGISTRY))


def get_engine_class(name: str) -> type:
    if name not in _REGISTRY:
        _import_all_engines()
    if name not in _REGISTRY:
        raise ValueError(f"engine.name must be {AUTO} or one of {', '.join(engine_names())}; "
                         f"got {name!r}")
    return _REGISTRY[name]


def resolve_engine_name(name: str, world_size: int) -> str:
    """The engine `engine.name` means for a world of `world_size` processes."""
    if name == AUTO:
        return _SEVERAL_PROCESSES if world_size > 1 else _ONE_PROCESS
    cls = get_engine_class(name)
    if world_size > 1 and not cls.multi_process:
        several = [n for n in engine_names() if _REGISTRY[n].multi_process]
        raise ValueError(f"engine.name={name} but the launcher started {world_size} processes: "
                         f"use engine.name={' or '.join(several)} (or auto), or start one process")
    return name


def engine_class_for(name: str) -> type | None:
    """The class `engine.name` names, or None for auto (decided once the world is known)."""
    return None if name == AUTO else get_engine_class(name)


def other_checkpoints(run_dir: Path, engine: type) -> tuple[str, Path] | None:
    """(a kind, its newest checkpoint) of an engine whose checkpoints `engine` cannot resume,
    when `run_dir` holds one; None otherwise."""
    _import_all_engines()
    for name in sorted(_REGISTRY):
        other = _REGISTRY[name]
        if other.checkpoint_kind != engine.checkpoint_kind:
            found = other.find_checkpoint(run_dir)
            if found is not None:
                return other.checkpoint_kind, found
    return None


def engines_of_kind(kind: str) -> list[str]:
    """The engines that read checkpoints of `kind`."""
    _import_all_engines()
    return [n for n in sorted(_REGISTRY) if _REGISTRY[n].checkpoint_kind == kind]
