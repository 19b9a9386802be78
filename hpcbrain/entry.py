"""The one way a user's request runs here: which exceptions are the user's to fix (one clear
line and exit status 2, never a traceback), and training in this process — what `hpcbrain train`
and `launch/submit.py --local` both do.

    with entry.full_disk_said():                       # a full disk: OutOfSpace, one line
        return entry.train_here(configs)              # one or several (folds, sweeps) configs
    except entry.user_errors() as exc: return entry.report(exc)

Anything else that escapes is a bug, and its traceback is the report.
"""
from __future__ import annotations

import contextlib
import sys
from typing import Iterable, Iterator

__all__ = ["user_errors", "report", "train_here", "print_summary", "deferred_line",
           "full_disk_said", "EXIT_USER_ERROR", "EXIT_DEFERRED"]

EXIT_USER_ERROR = 2
#: Trained, but the tracking server stopped answering before the models (or figures) reached it:
#: sysexits' EX_TEMPFAIL, "try again later" — rerunning the same command sends them.
EXIT_DEFERRED = 75


def user_errors() -> tuple[type[BaseException], ...]:
    """Every exception that says the user's input (config, store, scans, model, cluster
    request, run folder, tracking server) or place (a full disk) is wrong, with what to do in
    its message."""
    from omegaconf.errors import OmegaConfBaseException

    from hpcbrain.bids_app import BidsAppError
    from hpcbrain.config import ConfigError
    from hpcbrain.data.discover import ConversionError
    from hpcbrain.data.preprocess import BadScanError
    from hpcbrain.data.store import StoreError
    from hpcbrain.disk_space import OutOfSpace
    from hpcbrain.evaluate.downstream import DownstreamTaskError
    from hpcbrain.evaluate.encoder_folds import FoldPredictionsError
    from hpcbrain.evaluate.model_inputs import ModelInputError
    from hpcbrain.launcher import LaunchError
    from hpcbrain.run_lock import RunFolderLocked
    from hpcbrain.tracking import TrackingUnavailable

    return (ConfigError, StoreError, FileExistsError, RunFolderLocked, TrackingUnavailable,
            LaunchError, ConversionError, BadScanError, ModelInputError, BidsAppError,
            DownstreamTaskError, FoldPredictionsError, OutOfSpace, OmegaConfBaseException)


def report(error: BaseException) -> int:
    """Print a user error as one line on stderr; the exit status for it."""
    from omegaconf.errors import OmegaConfBaseException

    from hpcbrain.disk_space import EXIT_NO_SPACE, OutOfSpace

    if isinstance(error, OutOfSpace):
        print(f"error: {error}", file=sys.stderr)
        return EXIT_NO_SPACE
    if isinstance(error, OmegaConfBaseException):
        print(f"error: config: {str(error).splitlines()[0]} (a shell ${{VAR}} in a config value "
              f"is an OmegaConf interpolation: write $VAR or \\${{VAR}})", file=sys.stderr)
    else:
        print(f"error: {error}", file=sys.stderr)
    return EXIT_USER_ERROR


def train_here(configs: Iterable) -> int:
    """Train each config in this process, one after the other, printing each run's summary.
    A stop by signal returns its exit status (128 + the signal) at once; user errors propagate
    (the caller reports them). EXIT_DEFERRED when a run's finishing phase deferred uploads."""
    from hpcbrain.engine.stop import TrainingStopped
    from hpcbrain.job import run_training

    status = 0
    for cfg in configs:
        try:
            result = run_training(cfg)
        except TrainingStopped as stopped:
            print(f"stopped: {stopped}", file=sys.stderr)
            return stopped.exit_code
        print_summary(result)
        if result.deferred:
            print(deferred_line(result), file=sys.stderr)
            status = EXIT_DEFERRED
    return status


@contextlib.contextmanager
def full_disk_said() -> Iterator[None]:
    """Any error with a full file system behind it (a library's wrapper of ENOSPC included)
    leaves the block as `OutOfSpace`, which `report` says in one line. Each command-line entry
    point (`hpcbrain`'s main, `launch/submit.py`'s) runs its command inside it."""
    from hpcbrain.disk_space import out_of_space

    try:
        yield
    except Exception as exc:
        full = out_of_space(exc)
        if full is None or full is exc:
            raise
        raise full from exc


def deferred_line(result) -> str:
    """One line on what a finished run could not send, and what to do."""
    from hpcbrain.redact import redact_text

    models = [i for i in result.deferred if i.startswith(("model ", "registration ", "alias "))]
    others = len(result.deferred) - len(models)
    listed = "; ".join(models + ([f"{others} figure(s) and table(s)"] if others else []))
    return (f"deferred: trained, but the tracking server {redact_text(result.tracking_uri or '')} "
            f"stopped answering before these were sent: {listed}. Everything is kept in "
            f"{result.run_dir}; rerun the same command when the server is back to send and "
            f"register them (nothing is retrained) — exit status {EXIT_DEFERRED}")


def print_summary(result) -> None:
    """A finished run as a person reads it: folder, metrics, tracking, models, the SOM grid."""
    from hpcbrain.redact import redact_text

    print(f"run folder:        {result.run_dir}")
    metrics = dict(result.metrics or {})
    grid = {k: metrics.pop(k) for k in list(metrics) if k.startswith("som/")}
    for name, value in sorted(metrics.items()):
        print(f"{name + ':':<26}{value:.3f}")
    print(f"tracking URI:      {redact_text(result.tracking_uri or '')}")
    if result.run_id:
        print(f"MLflow run:        {result.run_id}")
    if result.model_uri:
        print(f"registered model:  {result.model_uri}")
    if result.age_model_uri:
        print(f"age predictor:     {result.age_model_uri}  (hpcbrain predict-age)")
    if grid:   # LSOR: the grid's quality last, where a reader of the demo looks
        print(f"SOM grid (all scans): {grid.get('som/occupied_nodes', float('nan')):.0f} "
              f"occupied nodes")
        for name in sorted(k for k in grid if k.startswith("som/dcor_") and not k.endswith("_p")):
            p_value = grid.get(f"{name}_p", float("nan"))
            print(f"  {'dCor(grid, ' + name[len('som/dcor_'):] + ')':<34}{grid[name]:.3f}   "
                  f"permutation p {p_value:.4f}")
    if result.figures:
        print("figures:")
        for figure in result.figures:
            print(f"  {figure}")
