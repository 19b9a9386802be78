"""Starting and ending the process group, and rank-aware logging.

One function starts the process group from whatever launched us:

* torchrun (or `deepspeed`, or anything that exports the same variables):
  RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT;
* a submitit job: `submitit.helpers.TorchDistributedEnvironment` (Slurm or submitit's local
  executor), MASTER_PORT derived from the job id by submitit;
* a plain Slurm task (`srun python ...`): SLURM_PROCID, SLURM_NTASKS (or SLURM_STEP_NUM_TASKS),
  SLURM_LOCALID, SLURM_JOB_NODELIST, SLURM_JOB_ID; MASTER_ADDR is the first host of the node
  list (`scontrol show hostnames`, or our parser where scontrol is missing), MASTER_PORT is
  derived from the job id so every task of the job picks the same one;
* nothing: one process and no group (unless an engine needs one: `require_group=True` makes a
  one-process group on 127.0.0.1, which DDP and DeepSpeed want even for a world of 1).

The variables a Slurm or submitit environment implies are exported (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT) so DeepSpeed, which reads them, picks the same rank and
the same device as we do; `teardown()` restores them. On GPUs every process drives the CUDA
device of its LOCAL_RANK (NCCL), on CPUs gloo is used. An engine that must create the group
itself (DeepSpeed) passes a `GroupInitializer` (engine/deepspeed.py); the rank queries and the
collectives live in `hpcbrain.dist`.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import subprocess
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import Mapping, Protocol

import torch
import torch.distributed as torch_dist

from hpcbrain.dist import is_global_rank0, is_initialized, rank, world_size

log = logging.getLogger(__name__)

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
SLURM_TASK_VARS = ("SLURM_PROCID", "SLURM_LOCALID")
MASTER_PORT_RANGE = (20_000, 60_000)
LOG_ALL_RANKS_ENV = "HPCBRAIN_LOG_ALL_RANKS"


class DistributedSetupError(RuntimeError):
    """The launch environment is incomplete or inconsistent; the message says what is missing."""


# ---------------------------------------------------------------------------------------------
# Queries (safe without a group)
# ---------------------------------------------------------------------------------------------

# ---------------------------------------------------------------------------------------------
# Where the launch environment says we are
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LaunchEnv:
    """What the environment says about this process. `source`: torchrun | submitit | slurm | none."""

    source: str
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str | None = None
    master_port: int | None = None

    def exports(self) -> dict[str, str]:
        """The torchrun-style variables that describe this process (for env:// and DeepSpeed)."""
        return {"RANK": str(self.rank), "WORLD_SIZE": str(self.world_size),
                "LOCAL_RANK": str(self.local_rank), "MASTER_ADDR": str(self.master_addr),
                "MASTER_PORT": str(self.master_port)}


def _missing(environ: Mapping[str, str], names: tuple[str, ...]) -> list[str]:
    return [name for name in names if not environ.get(name)]


def _int_var(environ: Mapping[str, str], name: str) -> int:
    try:
        return int(environ[name])
    except ValueError:
        raise DistributedSetupError(f"{name}={environ[name]!r} is not an integer") from None


def master_port_for_job(job_id: str | int) -> int:
    """A port in [20000, 60000) that every task of one Slurm job derives alike from the job id
    (array jobs: pass SLURM_JOB_ID, which is unique per array element)."""
    digits = re.sub(r"\D", "", str(job_id)) or "0"
    low, high = MASTER_PORT_RANGE
    return low + int(digits) % (high - low)


def expand_nodelist(nodelist: str) -> list[str]:
    """Slurm's compressed node list → host names: 'gpu[01-03,7],login1' → gpu01 gpu02 gpu03 gpu7 login1.

    Handles one bracket group per host name (what Slurm emits for flat host names)."""
    hosts: list[str] = []
    for match in re.finditer(r"([^,\[]+)(?:\[([^\]]*)\])?(?:,|$)", nodelist.strip()):
        prefix, ranges = match.group(1), match.group(2)
        if ranges is None:
            hosts.append(prefix)
            continue
        for part in ranges.split(","):
            if "-" in part:
                lo, hi = part.split("-", 1)
                hosts.extend(f"{prefix}{i:0{len(lo)}d}" for i in range(int(lo), int(hi) + 1))
            else:
                hosts.append(prefix + part)
    return hosts


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list: `scontrol show hostnames` when available."""
    scontrol = shutil.which("scontrol")
    if scontrol:
        try:
            out = subprocess.run([scontrol, "show", "hostnames", nodelist], check=True,
                                 capture_output=True, text=True, timeout=30).stdout.split()
            if out:
                return out[0]
        except (subprocess.SubprocessError, OSError) as exc:
            log.warning("scontrol show hostnames %s failed (%s); parsing the list ourselves",
                        nodelist, exc)
    hosts = expand_nodelist(nodelist)
    if not hosts:
        raise DistributedSetupError(f"SLURM_JOB_NODELIST={nodelist!r} names no host")
    return hosts[0]


def detect_launch_env(environ: Mapping[str, str] | None = None) -> LaunchEnv:
    """Read torchrun, submitit or Slurm variables (in that order); `none` when there are none.

    Raises DistributedSetupError naming the missing variables when an environment is half set
    (e.g. RANK without MASTER_PORT), instead of hanging in a rendezvous that cannot complete.
    """
    env = os.environ if environ is None else environ
    if any(env.get(name) for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK")):
        missing = _missing(env, TORCHRUN_VARS)
        if missing:
            present = [n for n in TORCHRUN_VARS if n not in missing]
            raise DistributedSetupError(
                f"half-set torchrun environment: {', '.join(present)} set but "
                f"{', '.join(missing)} missing. Launch with torchrun (or srun/submitit without "
                f"exporting RANK/WORLD_SIZE/LOCAL_RANK yourself), or unset them for one process")
        env_ = LaunchEnv("torchrun", _int_var(env, "RANK"), _int_var(env, "WORLD_SIZE"),
                         _int_var(env, "LOCAL_RANK"), env["MASTER_ADDR"],
                         _int_var(env, "MASTER_PORT"))
    elif env.get("SUBMITIT_EXECUTOR") and environ is None:
        import submitit.helpers

        sub = submitit.helpers.TorchDistributedEnvironment()
        env_ = LaunchEnv("submitit", sub.rank, sub.world_size, sub.local_rank, sub.master_addr,
                         int(sub.master_port))
    elif any(env.get(name) for name in SLURM_TASK_VARS):
        count_var = next((n for n in ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS")
                          if env.get(n)), "SLURM_NTASKS")
        nodelist_var = "SLURM_NODELIST" if env.get("SLURM_NODELIST") else "SLURM_JOB_NODELIST"
        if env.get("SLURM_JOB_NODELIST"):
            nodelist_var = "SLURM_JOB_NODELIST"
        needed = ("SLURM_PROCID", count_var, "SLURM_LOCALID", nodelist_var, "SLURM_JOB_ID")
        missing = _missing(env, needed)
        if missing:
            raise DistributedSetupError(
                f"half-set Slurm environment: {', '.join(missing)} missing (have "
                f"{', '.join(n for n in needed if n not in missing)}). Start the tasks with "
                f"srun (sbatch --ntasks=N ... srun python ...), or use torchrun")
        port = (_int_var(env, "MASTER_PORT") if env.get("MASTER_PORT")
                else master_port_for_job(env["SLURM_JOB_ID"]))
        addr = env.get("MASTER_ADDR") or first_host(env[nodelist_var])
        env_ = LaunchEnv("slurm", _int_var(env, "SLURM_PROCID"), _int_var(env, count_var),
                         _int_var(env, "SLURM_LOCALID"), addr, port)
    else:
        return LaunchEnv("none")
    if not 0 <= env_.rank < env_.world_size:
        raise DistributedSetupError(f"{env_.source}: rank {env_.rank} outside a world of "
                                    f"{env_.world_size} processes")
    return env_


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


# ---------------------------------------------------------------------------------------------
# Setup and teardown
# ---------------------------------------------------------------------------------------------
@dataclass
class DistState:
    """What `setup_distributed` did: `created` is True when it started the group (and
    `teardown` should end it)."""

    source: str
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None
    created: bool = False
    exported: dict[str, str | None] = field(default_factory=dict)  # previous values
    initializer: "GroupInitializer | None" = None   # who made the group, and ends it


class GroupInitializer(Protocol):
    """What an engine that must own the process group's creation provides (DeepSpeed, whose
    comm layer wraps the torch default group: `hpcbrain.engine.deepspeed.DeepSpeedGroup`)."""

    def init_group(self, backend: str, timeout: timedelta, rank: int, world_size: int,
                   device: torch.device) -> None:
        """Create the default group from the exported torchrun variables (env://)."""

    def adopt_group(self, timeout: timedelta) -> None:
        """Wrap a group that already exists (made by the launcher or an earlier call)."""

    def destroy_group(self) -> None:
        """End the group and release whatever the engine cached about it."""


_STATE: DistState | None = None


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def device_for(local_rank_: int) -> torch.device:
    return torch.device("cuda", local_rank_) if torch.cuda.is_available() else torch.device("cpu")


def setup_distributed(*, backend: str | None = None, timeout_minutes: float = 30.0,
                      require_group: bool = False,
                      initializer: GroupInitializer | None = None) -> DistState:
    """Start the process group this process's launch environment describes (idempotent).

    backend: None = NCCL on GPUs, gloo on CPUs. timeout_minutes: how long a collective (and the
    rendezvous) may wait for the other ranks before failing. require_group: without any launch
    environment, still make a one-process group (DDP and DeepSpeed need one). initializer: an
    engine's own way to create (or adopt) the group, e.g. DeepSpeed's; the group is the same
    torch.distributed default group either way.

    Returns the state; `state.created` tells whether this call started the group. An already
    initialised group (e.g. made by the launcher) is adopted, never re-made.
    """
    global _STATE
    timeout = timedelta(minutes=float(timeout_minutes))
    if is_initialized():
        if initializer is not None:
            initializer.adopt_group(timeout)
        if _STATE is not None and _STATE.created:   # ours, made by an earlier call
            return replace(_STATE, created=False, exported={})
        lr = int(os.environ.get("LOCAL_RANK", 0))
        return DistState("existing", rank(), world_size(), lr, device_for(lr),
                         torch_dist.get_backend())
    launch = detect_launch_env()
    if launch.world_size == 1 and launch.source in ("slurm", "submitit"):
        # One task (an interactive srun shell, a one-task job): nothing to rendezvous with, and
        # a port derived from the job id could clash with a second run in the same job.
        launch = LaunchEnv("none")
    if launch.source == "none":
        if not require_group:
            return DistState("none", 0, 1, 0, device_for(0), None)
        launch = LaunchEnv("local", 0, 1, 0, "127.0.0.1", free_port())
    previous = {name: os.environ.get(name) for name in TORCHRUN_VARS}
    os.environ.update(launch.exports())
    device = device_for(launch.local_rank)
    if device.type == "cuda":
        # Before any CUDA work, so NCCL and DeepSpeed (which reads LOCAL_RANK) agree on it.
        torch.cuda.set_device(device)
    backend = backend or default_backend()
    try:
        if initializer is not None:
            initializer.init_group(backend, timeout, launch.rank, launch.world_size, device)
        else:
            torch_dist.init_process_group(backend, init_method="env://", rank=launch.rank,
                                          world_size=launch.world_size, timeout=timeout)
    except Exception as exc:
        _restore_env(previous)
        raise DistributedSetupError(
            f"could not start the {backend} process group as rank {launch.rank} of "
            f"{launch.world_size} ({launch.source} environment, master "
            f"{launch.master_addr}:{launch.master_port}, timeout {timeout_minutes} min): {exc}. "
            f"Check that all {launch.world_size} processes were started and can reach the "
            f"master") from exc
    _STATE = DistState(launch.source, launch.rank, launch.world_size, launch.local_rank, device,
                       backend, created=True, exported=previous, initializer=initializer)
    log.info("process group up: %s, rank %d of %d, local rank %d, %s, master %s:%s",
             backend, launch.rank, launch.world_size, launch.local_rank, device,
             launch.master_addr, launch.master_port)
    return _STATE


def _restore_env(previous: Mapping[str, str | None]) -> None:
    for name, value in previous.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def teardown() -> None:
    """End the process group if `setup_distributed` started it; restore the variables it set."""
    global _STATE
    state, _STATE = _STATE, None
    if state is None or not state.created:
        return
    if is_initialized():
        # No barrier: after a failure on one rank the others must still get out.
        if state.initializer is not None:
            state.initializer.destroy_group()
        else:
            torch_dist.destroy_process_group()
    _restore_env(state.exported)


# ---------------------------------------------------------------------------------------------
# Rank-aware logging
# ---------------------------------------------------------------------------------------------
class RankFilter(logging.Filter):
    """Adds `rank` and `world` to every record (read at emit time: valid before and after setup)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = rank()
        record.world = world_size()
        return True


class _RankHandler(logging.StreamHandler):
    """Marks the handler `configure_logging` installed, so a second call replaces it."""


LOG_FORMAT = "%(asctime)s [rank %(rank)d/%(world)d] %(levelname)s %(name)s: %(message)s"


def configure_logging(level: int = logging.INFO, all_ranks: bool | None = None) -> None:
    """Root logging with the rank in every line; ranks other than 0 log WARNING and above only,
    unless `all_ranks` (or HPCBRAIN_LOG_ALL_RANKS=1) asks for every rank at `level`."""
    if all_ranks is None:
        all_ranks = os.environ.get(LOG_ALL_RANKS_ENV, "") not in ("", "0", "false")
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _RankHandler)]:
        root.removeHandler(handler)
    handler = _RankHandler()
    handler.addFilter(RankFilter())
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root.addHandler(handler)
    root.setLevel(level if (all_ranks or is_global_rank0()) else max(level, logging.WARNING))


