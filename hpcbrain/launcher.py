"""Slurm launch with submitit: configs → one job (or one job array) of checkpointable trainers.

    jobs = launch(plan)          # plan = plan_launch(files, overrides, ...)
    wait(jobs)

How a config's `slurm` section becomes a job:
- one task per GPU (`ntasks-per-node` = `gpus_per_node`, `--gres=gpu:G`); on a CPU-only
  partition (`gpus_per_node: 0`) `tasks_per_node` tasks (default 1);
- `time_min`, `signal_delay_s`: Slurm sends USR2 that long before the time limit; submitit's
  handler on global rank 0 calls `hpcbrain.job.TrainingJob.checkpoint()` and requeues the job, which resumes
  from the run folder's latest checkpoint in the same MLflow run. `max_requeues` bounds the
  requeues after time limits. Preemption: submitit ignores SIGTERM; a USR2 (what
  `job._interrupt()` sends after SIGTERM) requeues without counting against the limit, and a
  cluster that requeues preempted jobs itself (PreemptMode=REQUEUE; jobs go out --requeue)
  restarts the same callable, which resumes the same way;
- folds (`folds=K`) and sweeps (`sweeps={"train.lr": [..]}`) expand into one job array, one
  run folder (and MLflow run) per element.

Nothing here imports torch or mlflow at module level (submitit costs ~0.2 s): `--dry-run` stays
fast and works on a machine without Slurm.
"""
from __future__ import annotations

import itertools
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import submitit
from omegaconf import DictConfig, OmegaConf
from submitit.core.utils import FailedJobError, FailedSubmissionError

from hpcbrain.config import PROJECT_ROOT, ConfigError, load_config, resolve_config_path
from hpcbrain.config_checks import check_global_batch

DEFAULT_LOG_DIR = "slurm-logs/%j"       # under run.root unless slurm.log_dir says otherwise
PROFILE_DIR = PROJECT_ROOT / "slurm" / "profiles"


class LaunchError(RuntimeError):
    """Something about the cluster or the request is wrong; the message says what to do."""


# ---------------------------------------------------------------------------------------------
# Planning: configs, resources, checks (no Slurm needed)
# ---------------------------------------------------------------------------------------------
@dataclass
class LaunchPlan:
    configs: list[DictConfig]                 # one per job (array element)
    names: list[str]                          # run names, same order
    parameters: dict[str, Any]                # SlurmExecutor.update_parameters(**parameters)
    log_dir: Path                             # submitit folder (with %j)
    max_requeues: int
    world_size: int

    @property
    def is_array(self) -> bool:
        return len(self.configs) > 1


def parse_time_min(value: str | int) -> int:
    """Slurm's time formats → whole minutes (seconds round up): "90" (minutes), "90:30"
    (minutes:seconds), "1:30:00", "2-12" (days-hours), "2-12:30", "2-12:30:00"."""
    text = str(value).strip()
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text)
    if not match:
        raise LaunchError(f"--time {text!r}: use minutes (90), H:MM:SS (1:30:00) or D-HH:MM:SS")
    days, a, b, c = (int(x) if x is not None else None for x in match.groups())
    if days is None:
        if b is None:
            seconds = a * 60                          # minutes
        elif c is None:
            seconds = a * 60 + b                      # minutes:seconds
        else:
            seconds = a * 3600 + b * 60 + c           # hours:minutes:seconds
    else:
        seconds = days * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)
    minutes = -(-seconds // 60)
    if minutes <= 0:
        raise LaunchError(f"--time {text!r} is not a positive duration")
    return minutes


def tasks_per_node(slurm: DictConfig) -> int:
    """One task per GPU; on CPU-only partitions `slurm.tasks_per_node` (default 1)."""
    gpus = int(slurm.gpus_per_node or 0)
    tasks = slurm.tasks_per_node
    if gpus < 0:
        raise LaunchError(f"slurm.gpus_per_node={gpus} must be 0 (CPU partition) or more")
    if gpus > 0:
        if tasks is not None and int(tasks) != gpus:
            raise LaunchError(
                f"slurm.tasks_per_node={tasks} does not match slurm.gpus_per_node={gpus}: "
                f"the launcher runs one task per GPU. Leave tasks_per_node unset (null) or set "
                f"it to {gpus}; tasks_per_node is only for CPU-only partitions "
                f"(gpus_per_node 0)")
        return gpus
    tasks = 1 if tasks is None else int(tasks)
    if tasks < 1:
        raise LaunchError(f"slurm.tasks_per_node={tasks} must be at least 1")
    return tasks


def _mem(mem_gb: float) -> str:
    return f"{int(mem_gb)}G" if float(mem_gb) == int(mem_gb) else f"{int(float(mem_gb) * 1024)}M"


def log_dir_of(cfg: DictConfig) -> Path:
    folder = cfg.slurm.log_dir or str(Path(cfg.run.root) / DEFAULT_LOG_DIR)
    return Path(folder).expanduser().absolute()


def executor_parameters(cfg: DictConfig, job_name: str) -> dict[str, Any]:
    """The SlurmExecutor parameters for a config's `slurm` section (flags already merged in)."""
    slurm = cfg.slurm
    params: dict[str, Any] = {
        "job_name": job_name,
        "nodes": int(slurm.nodes),
        "ntasks_per_node": tasks_per_node(slurm),
        "time": int(slurm.time_min),
        "signal_delay_s": int(slurm.signal_delay_s),
        "array_parallelism": int(slurm.array_parallelism),
    }
    if int(slurm.nodes) < 1:
        raise LaunchError(f"slurm.nodes={slurm.nodes} must be at least 1")
    if slurm.gpus_per_node:
        params["gres"] = f"gpu:{int(slurm.gpus_per_node)}"
    optional = {"partition": slurm.partition, "account": slurm.account, "qos": slurm.qos,
                "cpus_per_task": slurm.cpus_per_task, "constraint": slurm.constraint,
                "exclude": slurm.exclude}
    params.update({k: v for k, v in optional.items() if v is not None})
    if slurm.mem_gb is not None:
        params["mem"] = _mem(slurm.mem_gb)
    # The job must run the code that submitted it, installed or not.
    setup = [f"export PYTHONPATH={shlex.quote(str(PROJECT_ROOT))}${{PYTHONPATH:+:$PYTHONPATH}}"]
    setup += list(slurm.setup)
    params["setup"] = setup
    if slurm.srun_args:
        params["srun_args"] = list(slurm.srun_args)
    # --requeue: submitit requeues with `scontrol requeue`, which clusters with JobRequeue=0
    # refuse for jobs not submitted requeueable.
    extra: dict[str, Any] = {"requeue": True}
    extra.update(OmegaConf.to_container(slurm.additional_parameters, resolve=True) or {})
    params["additional_parameters"] = extra
    return params


def _absolute(path: str) -> str:
    return str(Path(path).expanduser().absolute())


def _split_values(text: str) -> list[str]:
    """'1e-3,1e-4' → ['1e-3', '1e-4']; commas inside [...] or {...} stay ('[4,8],[8,16]')."""
    values, depth, current = [], 0, ""
    for char in text:
        depth += char in "[{"
        depth -= char in "]}"
        if char == "," and depth == 0:
            values.append(current)
            current = ""
        else:
            current += char
    values.append(current)
    return [v.strip() for v in values if v.strip()]


def parse_sweeps(items: Sequence[str]) -> list[tuple[str, list[str]]]:
    sweeps = []
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not key or not _split_values(values):
            raise LaunchError(f"--sweep {item!r}: use key=v1,v2 (e.g. --sweep train.lr=1e-3,1e-4)")
        if key.startswith("slurm."):
            raise LaunchError(f"--sweep {item!r}: every element of a job array gets the same "
                              f"resources; submit separate jobs to vary slurm.* settings")
        sweeps.append((key.strip(), _split_values(values)))
    return sweeps


def _name_part(key: str, value: str) -> str:
    short = key.split(".")[-1]
    return re.sub(r"[^A-Za-z0-9._+-]", "", f"{short}{value}")


def resolve_config_files(files: Sequence[str]) -> list[str]:
    """Config names as load_config finds them, else cluster profiles: `--cfg devcluster.yaml`
    finds slurm/profiles/devcluster.yaml, and `slurm/profiles/...` works from any folder."""
    resolved = []
    for name in files:
        try:
            resolved.append(str(resolve_config_path(name)))
            continue
        except ConfigError:
            pass
        for candidate in (PROFILE_DIR / name, PROJECT_ROOT / name):
            if not Path(name).is_absolute() and candidate.is_file():
                resolved.append(str(candidate))
                break
        else:
            resolved.append(str(name))   # load_config reports where it looked
    return resolved


def expand_jobs(files: Sequence[str], overrides: Sequence[str], *, folds: int | None = None,
                sweeps: Sequence[tuple[str, list[str]]] = ()
                ) -> tuple[list[DictConfig], list[str], str]:
    """One config per array element (the product of sweep values, times the folds), their run
    names, and the base run name (the job's name)."""
    files = resolve_config_files(files)
    base = load_config(files, overrides)
    sweep_axes = [[(key, value) for value in values] for key, values in sweeps]
    fold_axis = [[("data.fold", str(k))] for k in range(folds)] if folds else [[]]
    configs, names = [], []
    for combo in itertools.product(*sweep_axes) if sweep_axes else [()]:
        for fold in fold_axis:
            extra = [f"{k}={v}" for k, v in combo]
            name = "-".join([str(base.run.name)] + [_name_part(k, v) for k, v in combo])
            if folds:
                extra += [f"data.n_folds={folds}", f"data.fold={fold[0][1]}"]
                name += f"-fold{fold[0][1]}"
            if combo or folds:
                extra.append(f"run.name={name}")
            configs.append(load_config(files, [*overrides, *extra]) if extra else base)
            names.append(name)
    if folds is not None and folds < 2:
        raise LaunchError(f"--folds {folds}: cross-validation needs at least 2 folds")
    return configs, names, str(base.run.name)


def plan_launch(files: Sequence[str], overrides: Sequence[str], *,
                folds: int | None = None, sweeps: Sequence[str] = ()) -> LaunchPlan:
    """Resolve configs, resources and log folder; raise LaunchError/ConfigError on a bad request."""
    configs, names, job_name = expand_jobs(files, overrides, folds=folds,
                                           sweeps=parse_sweeps(sweeps))
    for cfg in configs:  # the job may start in another folder: pin relative paths now
        cfg.run.root = _absolute(cfg.run.root)
        cfg.data.store = _absolute(cfg.data.store)
        if cfg.slurm.log_dir:
            cfg.slurm.log_dir = _absolute(cfg.slurm.log_dir)
    first = configs[0]
    params = executor_parameters(first, job_name)
    world = params["nodes"] * params["ntasks_per_node"]
    for cfg in configs:
        check_global_batch(cfg, world)   # world = nodes × tasks per node
    return LaunchPlan(configs=configs, names=names, parameters=params,
                      log_dir=log_dir_of(first), max_requeues=int(first.slurm.max_requeues),
                      world_size=world)


def sbatch_script(plan: LaunchPlan, python: str | None = None) -> str:
    """The sbatch file submitit writes for this plan (what --dry-run shows)."""
    from submitit.slurm.slurm import _make_sbatch_string  # the function SlurmExecutor uses

    python = python or plan.configs[0].slurm.python or shlex.quote(sys.executable)
    command = f"{python} -u -m submitit.core._submit {shlex.quote(str(plan.log_dir))}"
    params = dict(plan.parameters)
    if plan.is_array:
        params["map_count"] = len(plan.configs)
    return _make_sbatch_string(command=command, folder=plan.log_dir, **params)


# ---------------------------------------------------------------------------------------------
# Talking to Slurm
# ---------------------------------------------------------------------------------------------
def require_slurm() -> None:
    missing = [cmd for cmd in ("sbatch", "srun", "sinfo", "sacct") if shutil.which(cmd) is None]
    if missing:
        raise LaunchError(
            f"no Slurm on this machine ({', '.join(missing)} not on PATH). Use --local to train "
            f"here without Slurm, --dry-run to see the job script, or start the single-host dev "
            f"cluster: eval \"$(slurm/devcluster/start.sh)\"")


def partitions() -> list[str]:
    """Partition names from `sinfo` (the default one without its '*')."""
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True,
                             timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise LaunchError(f"sinfo failed: {exc}") from None
    if out.returncode != 0:
        conf = os.environ.get("SLURM_CONF", "the default slurm.conf")
        raise LaunchError(f"sinfo failed (is slurmctld reachable? SLURM_CONF={conf}): "
                          f"{out.stderr.strip() or out.stdout.strip()}")
    return sorted({line.strip().rstrip("*") for line in out.stdout.splitlines() if line.strip()})


def check_partition(partition: str | None) -> None:
    if partition is None:
        return
    known = partitions()
    if partition not in known:
        raise LaunchError(f"unknown partition {partition!r}: this cluster has "
                          f"{', '.join(known) or 'no partitions'} (sinfo -h -o %P). Set "
                          f"--partition or slurm.partition to one of them")


def make_executor(plan: LaunchPlan):
    plan.log_dir.parent.mkdir(parents=True, exist_ok=True)
    python = plan.configs[0].slurm.python
    executor = submitit.SlurmExecutor(folder=plan.log_dir, max_num_timeout=plan.max_requeues,
                                      python=python)
    executor.update_parameters(**plan.parameters)
    return executor


def launch(plan: LaunchPlan) -> list:
    """Submit the plan: one job, or one job array. Returns the submitit jobs."""
    from hpcbrain.job import TrainingJob  # torch: imported only when something is submitted

    require_slurm()
    check_partition(plan.parameters.get("partition"))
    executor = make_executor(plan)
    try:
        if not plan.is_array:
            return [executor.submit(TrainingJob(plan.configs[0]))]
        jobs = []
        with executor.batch():
            for cfg in plan.configs:
                jobs.append(executor.submit(TrainingJob(cfg)))
        return jobs
    except (FailedJobError, FailedSubmissionError) as exc:  # sbatch's own message, plainly
        raise LaunchError(f"sbatch refused the job: {str(exc).strip()}") from None


def task_log_paths(job) -> tuple[Path, Path]:
    """stdout/stderr of global rank 0 (other tasks: same names with their task number)."""
    paths = job.paths
    return (Path(str(paths.stdout).replace("%t", "0")), Path(str(paths.stderr).replace("%t", "0")))


def single_task_executor(cfg: DictConfig, job_name: str):
    """A submitit SlurmExecutor for arrays of one-node, one-task elements (the BIDS-App's
    participants, the conversion's blocks): the config's `slurm` section and flags, the
    partition checked, logs under `log_dir_of(cfg)`. Returns (executor, its parameters)."""
    import submitit

    require_slurm()
    params = executor_parameters(cfg, job_name)
    params.update(nodes=1, ntasks_per_node=1)
    check_partition(params.get("partition"))
    folder = log_dir_of(cfg)
    folder.parent.mkdir(parents=True, exist_ok=True)
    executor = submitit.SlurmExecutor(folder=folder, python=cfg.slurm.python)
    executor.update_parameters(**params)
    return executor, params


class JobVanished(LaunchError):
    """A job left Slurm's queue without ever running (e.g. an array task `scancel`ed while
    pending: Slurm keeps no accounting record of it, so its state stays unknown)."""


def _in_queue(job_id: str) -> bool:
    """Whether Slurm's queue still holds `job_id` (pending or running); an error (an invalid,
    i.e. finished or cancelled, id) counts as no."""
    try:
        out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%i"], capture_output=True,
                             text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return True                      # cannot tell: keep waiting
    return out.returncode == 0 and bool(out.stdout.strip())


def wait(jobs: Sequence, poll_s: float = 5.0, force_every_s: float = 30.0,
         echo=print) -> list[tuple[Any, Any, BaseException | None]]:
    """Wait for every job, echoing state changes; [(job, rank-0 result, error or None)].

    A job with no accounting record that the queue no longer holds at two forced checks in a
    row has vanished (cancelled before it started): it ends the wait for it with `JobVanished`
    instead of waiting for ever."""
    last_state: dict[str, str] = {}
    last_force = 0.0
    absent: dict[str, int] = {}
    vanished: set[str] = set()
    pending = list(jobs)
    while pending:
        force = time.monotonic() - last_force > force_every_s
        if force:
            last_force = time.monotonic()
        still = []
        for job in pending:
            done = job.done(force_check=force)
            state = job.watcher.get_state(job.job_id, mode="cache")
            if state != "UNKNOWN" and state != last_state.get(job.job_id):  # UNKNOWN: no sacct yet
                last_state[job.job_id] = state
                echo(f"job {job.job_id}: {state}")
            if not done and force and state == "UNKNOWN":
                absent[job.job_id] = 0 if _in_queue(job.job_id) else absent.get(job.job_id, 0) + 1
                if absent[job.job_id] >= 2:
                    echo(f"job {job.job_id}: left the queue without running (cancelled?)")
                    vanished.add(job.job_id)
                    done = True
            if not done:
                still.append(job)
        pending = still
        if pending:
            time.sleep(poll_s)
    outcomes = []
    for job in jobs:
        if job.job_id in vanished:
            outcomes.append((job, None, JobVanished(
                f"job {job.job_id} left Slurm's queue without running (cancelled while "
                f"pending?)")))
            continue
        try:
            results = job.results()
            outcomes.append((job, results[0], None))
        except Exception as exc:  # the job's own traceback comes back in the exception
            outcomes.append((job, None, exc))
    return outcomes


def tracking_summary(cfg: DictConfig) -> tuple[str, str | None]:
    """(tracking URI, MLflow run id when the run folder already has one, i.e. a resume)."""
    from hpcbrain.tracking import RUN_ID_FILE, tracking_uri

    id_file = Path(cfg.run.root) / cfg.run.name / RUN_ID_FILE
    run_id = id_file.read_text().strip() if id_file.exists() else None
    return tracking_uri(cfg.tracking), run_id


__all__ = ["LaunchError", "JobVanished", "LaunchPlan", "check_partition", "executor_parameters",
           "expand_jobs", "launch", "parse_time_min", "partitions", "plan_launch",
           "require_slurm", "sbatch_script", "single_task_executor", "tasks_per_node", "wait"]

