"""Atomic, resumable checkpoints in a run folder.

Single-process and DDP runs write one torch file per checkpoint, from global rank 0:
`run_dir/checkpoints/step-NNNNNNNNN.pt`, written to a temporary file and renamed into place, so
a job killed while saving leaves the previous checkpoint intact and never a half-written one
under a real name. DeepSpeed runs write one folder per checkpoint from every rank:
`run_dir/checkpoints/deepspeed/step-NNNNNNNNN/`, plus the file `latest` that DeepSpeed writes
after all shards are saved (the same guarantee: `latest` only ever names a complete folder).

Both carry the same client state: epoch, global_step, the RNG states of every rank, the
config and the MLflow run id.

Trust: a torch file gets a ``.sha256`` beside it, written after the rename; `load_newest_good`
verifies it before unpickling (with ``weights_only=True``), so a truncated, corrupt,
unverifiable or crafted file is named, moved aside to ``*.bad`` and the previous checkpoint
used. Parameters that are not finite are refused before saving and after loading
(`check_finite`), naming the tensor.
"""
from __future__ import annotations

import hashlib
import logging
import os
import pickle
import random
import re
import shutil
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from hpcbrain.atomic import atomic_write, write_text_atomic

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
DEEPSPEED_DIR = "deepspeed"
_NAME = re.compile(r"^step-(\d{9})\.pt$")
_TAG = re.compile(r"^step-(\d{9})$")
CHECKSUM_SUFFIX = ".sha256"


class CheckpointError(ValueError):
    """A checkpoint that must not be used: the message names the file and why."""


class NonFiniteParameterError(CheckpointError):
    """A parameter or buffer holds NaN or infinity."""


def checkpoint_path(run_dir: Path, global_step: int) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR / f"step-{global_step:09d}.pt"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if _NAME.match(p.name))


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def check_finite(tensors: Mapping[str, Any], where: str) -> None:
    """Raise `NonFiniteParameterError` naming the first floating tensor of `tensors` that holds
    NaN or infinity (`where`: the file or the moment, for the message)."""
    for name, value in tensors.items():
        if torch.is_tensor(value) and value.is_floating_point() and value.numel() and \
                not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise NonFiniteParameterError(
                f"{where}: {name} holds {bad} non-finite value(s) of {value.numel()}; the "
                f"training diverged: lower train.lr or check the data")


def check_finite_everywhere(tensors: Mapping[str, Any], where: str,
                            device: torch.device | str = "cpu") -> None:
    """`check_finite` on every rank's own `tensors`, agreed with one all-reduce, so that all
    ranks refuse together (one rank raising alone would leave the others waiting in the save's
    collectives). A collective when a process group is up: call on every rank."""
    from hpcbrain import dist

    problem: NonFiniteParameterError | None = None
    try:
        check_finite(tensors, where)
    except NonFiniteParameterError as exc:
        problem = exc
    if dist.world_size() > 1:
        flag = torch.tensor([0.0 if problem is None else 1.0], device=device)
        if float(dist.all_reduce_max(flag)[0]) > 0 and problem is None:
            problem = NonFiniteParameterError(f"{where}: another rank holds non-finite "
                                              f"parameters (its log names the tensor)")
    if problem is not None:
        raise problem


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def checksum_path(path: Path) -> Path:
    return Path(path).with_name(Path(path).name + CHECKSUM_SUFFIX)


def verify_checksum(path: Path) -> None:
    """Raise `CheckpointError` unless `path`'s ``.sha256`` exists and matches its bytes."""
    recorded = checksum_path(path)
    if not recorded.is_file():
        raise CheckpointError(f"{path}: no {recorded.name} beside it (written after every "
                              f"checkpoint): unverifiable, the save was interrupted or the file "
                              f"was put there by hand")
    expected = recorded.read_text().split()[0] if recorded.read_text().split() else ""
    actual = file_sha256(path)
    if actual != expected:
        raise CheckpointError(f"{path}: sha256 {actual[:12]}… does not match {recorded.name} "
                              f"({expected[:12] or 'empty'}…): the file is damaged or was "
                              f"replaced")


def save_atomic(payload: dict[str, Any], path: Path, keep_last: int = 2) -> Path:
    """torch.save atomically (`hpcbrain.atomic`), then its checksum beside it; then drop all
    but the newest `keep_last` (with their checksums)."""
    path = Path(path)
    with atomic_write(path, "wb", what="a checkpoint") as handle:
        torch.save(payload, handle)
    try:
        write_text_atomic(checksum_path(path), f"{file_sha256(path)}  {path.name}\n",
                          what="a checkpoint's checksum")
    except BaseException:
        path.unlink(missing_ok=True)   # without its checksum it is not complete: the previous
        raise                          # one stays the newest
    for old in list_checkpoints(path.parent.parent)[:-keep_last]:
        old.unlink(missing_ok=True)
        checksum_path(old).unlink(missing_ok=True)
    return path


def load_weights_only(path: str | Path, map_location: Any = "cpu",
                      allowed: Sequence[type] = (),
                      holds: str = "tensors and plain values, which hpcbrain never writes",
                      advice: str = "Remove it if you did not put it there; the run resumes "
                                    "from the previous checkpoint") -> Any:
    """``torch.load(weights_only=True)`` allowing only the classes in `allowed` beyond tensors
    and plain containers, so a crafted file cannot run code; a refusal names the file, what
    it may hold (`holds`) and what to do (`advice`)."""
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise pickle.UnpicklingError(
            f"{path}: refused to load: it holds objects other than {holds} "
            f"({str(exc).splitlines()[0]}). {advice}") from None


def load(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A checkpoint written by `save_atomic`, read with `load_weights_only`: tensors and plain
    containers of numbers and strings only, so a crafted file in a shared run folder cannot
    run code on the next resume (it fails to load instead, naming the file)."""
    return load_weights_only(path, map_location)


def load_newest_good(run_dir: Path, map_location: str | torch.device = "cpu"
                     ) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint of `run_dir` that loads, with its path; None when there is none.
    One that does not verify or load (truncated, corrupt, no or a wrong checksum, holding more
    than tensors and plain values, or non-finite parameters) is renamed to ``*.pt.bad`` (its
    checksum with it) with a warning naming it, and the one before it is tried: a damaged file
    never crash-loops a requeued job."""
    for path in reversed(list_checkpoints(run_dir)):
        try:
            verify_checksum(path)
            state = load(path, map_location)
            method_state = state.get("engine", {}).get("method", {})
            check_finite(method_state, str(path))
            return path, state
        except Exception as exc:  # torch raises several types for a damaged zip or pickle
            aside = path.with_name(path.name + ".bad")
            os.replace(path, aside)
            if checksum_path(path).exists():
                os.replace(checksum_path(path), checksum_path(aside))
            log.warning("checkpoint %s does not load (%s: %s); moved aside to %s, trying the "
                        "one before it", path, type(exc).__name__, str(exc).splitlines()[0],
                        aside.name)
    return None


def deepspeed_dir(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR / DEEPSPEED_DIR


def deepspeed_tag(global_step: int) -> str:
    return f"step-{global_step:09d}"


def latest_deepspeed_tag(run_dir: Path) -> str | None:
    """The tag DeepSpeed's `latest` file names, if that folder exists."""
    latest = deepspeed_dir(run_dir) / "latest"
    if not latest.is_file():
        return None
    tag = latest.read_text().strip()
    return tag if tag and (deepspeed_dir(run_dir) / tag).is_dir() else None


def prune_deepspeed(run_dir: Path, keep_last: int = 2) -> None:
    """Remove all but the newest `keep_last` DeepSpeed checkpoint folders (never `latest`'s)."""
    folder = deepspeed_dir(run_dir)
    latest = latest_deepspeed_tag(run_dir)
    tags = sorted(p.name for p in folder.iterdir() if p.is_dir() and _TAG.match(p.name))
    for tag in tags[:-keep_last]:
        if tag != latest:
            shutil.rmtree(folder / tag, ignore_errors=True)


def rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors and plain values (loadable with weights_only)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    state = {"python": [version, list(internal), gauss],
             "numpy": {"name": str(name), "keys": torch.from_numpy(keys.astype(np.int64)),
                       "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def gather_rng_states() -> list[dict[str, Any]]:
    """Every rank's RNG state, in rank order (a collective: call on every rank)."""
    from hpcbrain import dist

    return dist.all_gather_object(rng_state())


def restore_rng_state(state: dict[str, Any] | list[dict[str, Any]], rank: int = 0) -> None:
    """Restore one state, or this rank's entry of a per-rank list (entry 0 when the world grew)."""
    if isinstance(state, (list, tuple)):
        state = state[rank] if rank < len(state) else state[0]
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    npy = state["numpy"]
    np.random.set_state((npy["name"], npy["keys"].numpy().astype(np.uint32), npy["pos"],
                         npy["has_gauss"], npy["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
