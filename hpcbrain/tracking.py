"""MLflow tracking and model registry, from global rank 0 only.

The embedded default is a sqlite tracking store in the project folder (MLflow 3 refuses the old
./mlruns file store), with artifacts beside it in mlartifacts/. `tracking.uri` in the config, or
MLFLOW_TRACKING_URI, points runs at a shared server instead.

mlflow is imported lazily: `import mlflow.pytorch` costs ~3 s, too much for every CLI call and
every DataLoader worker.

Outages: a tracking server is asked for its health at start (`tracking.health_timeout_s`); when
it does not answer, the run stops with a message naming it (`tracking.on_unreachable: fail`) or
goes on offline (`offline`). Metrics go through a background sender and a spool in the run
folder (`hpcbrain.metric_sender`), so a server that disappears mid-run never stalls training;
what it missed is sent when it is back, or by the next run of the same command, each value
once. MLflow's own HTTP retries are bounded (`_bound_http_retries`), and so is `finish`.
The finishing phase (`begin_finishing`: figures, tables, models, registrations) sends each item
once over every run of the folder and waits at most `tracking.outage_wait_s` for a server that
stopped answering; what it could not send is *deferred* (`deferred`) to the next run of the same
command (`hpcbrain.publish_ledger`).
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

from omegaconf import DictConfig

from hpcbrain.config import PROJECT_ROOT
from hpcbrain.metric_sender import MetricSender
from hpcbrain.metric_spool import MetricRecord, MetricSpool
from hpcbrain.publish_ledger import PublishLedger
from hpcbrain.redact import redact_text

log = logging.getLogger(__name__)

RUN_ID_FILE = "mlflow_run_id"


class TrackingUnavailable(RuntimeError):
    """The tracking server did not answer at start and tracking.on_unreachable is fail."""


def _bound_http_retries() -> None:
    """MLflow retries a failed request 7 times with exponential backoff and waits 120 s for
    each answer (a vanished server held every call ~4 minutes). Metrics are retried by our
    sender instead, so one quick retry is enough; a user's own settings win."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


def server_health(uri: str, timeout_s: float) -> str | None:
    """None when the tracking store answers, else why not. Only http(s) servers are asked
    (their /health endpoint); a local sqlite store is always there."""
    if not uri.startswith(("http://", "https://")):
        return None
    import requests

    url = uri.rstrip("/") + "/health"
    try:
        answer = requests.get(url, timeout=timeout_s)
    except requests.RequestException as exc:
        return f"{type(exc).__name__} after at most {timeout_s:g} s"
    if answer.status_code != 200:
        return f"HTTP {answer.status_code} from {redact_text(url)}"
    return None


def tracking_uri(tracking: DictConfig) -> str:
    """The `tracking` section's uri first, then $MLFLOW_TRACKING_URI, then sqlite in the
    project folder."""
    if tracking.uri:
        return str(tracking.uri)
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{PROJECT_ROOT / 'mlflow.db'}"


def _artifact_root_for(uri: str) -> str | None:
    """Where a new experiment keeps artifacts when the store is a local sqlite file."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").resolve().as_uri()
    return None  # a tracking server decides for itself


@contextlib.contextmanager
def store_creation_lock(uri: str) -> Iterator[None]:
    """Held while a process first opens a local sqlite tracking store. MLflow creates the file
    and runs its schema migrations on first use; two processes doing that at once (two runs
    started together on a fresh project) break it: "table _alembic_tmp_params already exists",
    and the migration of one fails. A blocking flock on `STORE.lock` makes them take turns;
    a tracking server migrates its own store."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    import fcntl

    database = Path(uri[len("sqlite:///"):])
    database.parent.mkdir(parents=True, exist_ok=True)
    with open(database.with_name(database.name + ".lock"), "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        yield                       # closing the handle releases it


def experiment_id(name: str, uri: str) -> str:
    """The id of experiment `name` in the store at `uri`, created (artifacts beside a local
    sqlite store, not in the working folder) when it does not exist yet."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(name, artifact_location=_artifact_root_for(uri))
    except Exception:
        # two runs starting together both found no experiment and both create it: the
        # second is refused (RESOURCE_ALREADY_EXISTS) and uses the first one's
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


class NullTracker:
    """What every rank but global rank 0 gets, and rank 0 when tracking is disabled."""

    run_id: str | None = None
    enabled = False
    online = False           # metrics and models reach a tracking server

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...
    def log_figure(self, figure: Any, name: str) -> None: ...
    def log_encoder(self, encoder: Any, example: Any, extra_files: list[Path] | None = None,
                    metadata: dict | None = None) -> str | None: return None
    def log_model(self, module: Any, example: Any, artifact: str, registered_name: str | None,
                  extra_files: list[Path] | None = None,
                  metadata: dict | None = None) -> str | None: return None
    def finish(self, status: str = "FINISHED") -> None: ...

    def begin_finishing(self, run_dir: Path, step: int) -> None:
        """From now on every upload is the finishing phase's of `step` (see the module doc)."""

    @property
    def deferred(self) -> list[str]:
        """The finishing phase's items that did not reach the server (sent by the next run)."""
        return []

    def server_answers(self) -> bool:
        """Whether the tracking store answers now (a failed request then is a real error)."""
        return True

    def health_note(self) -> str | None:
        """None while metrics reach the server; else a short note for the progress line."""
        return None


class MlflowTracker(NullTracker):
    """One MLflow run per run folder: a resumed job continues the run it started."""

    enabled = True

    def __init__(self, tracking: DictConfig, params: dict[str, Any], run_dir: Path,
                 run_id: str | None = None):
        """`tracking`: the config's tracking section; `params`: what a new MLflow run logs as
        its parameters (the job's whole config, flattened)."""
        import mlflow

        _bound_http_retries()
        self._mlflow = mlflow
        self.tracking = tracking
        self.uri = tracking_uri(tracking)
        self.spool = MetricSpool(run_dir)
        # A run resumed after a kill retrains the steps after its last checkpoint; their values
        # were logged before the kill (same values on a CPU with fixed seeds, not always on a
        # GPU): one value per step, the first, so a key's retrained steps are not logged again.
        self._logged_steps = self.spool.logged_steps()
        self.sender: MetricSender | None = None
        self.run_id = None
        self._ledger: PublishLedger | None = None
        problem = server_health(self.uri, float(tracking.health_timeout_s))
        if problem is not None:
            where = redact_text(self.uri)
            if tracking.on_unreachable != "offline":
                raise TrackingUnavailable(
                    f"tracking server {where} does not answer ({problem}). Start it, point "
                    f"tracking.uri at one that runs, set tracking.on_unreachable=offline to "
                    f"train now and send the metrics later (by rerunning the same command), or "
                    f"tracking.enabled=false")
            log.warning("tracking server %s does not answer (%s): training offline; metrics are "
                        "kept in %s and sent by the next run of the same command; no model is "
                        "registered until then", where, problem, self.spool.path)
            return
        self._start_run(params, run_dir, run_id)

    def _start_run(self, params: dict[str, Any], run_dir: Path, run_id: str | None) -> None:
        mlflow = self._mlflow
        mlflow.set_tracking_uri(self.uri)
        with store_creation_lock(self.uri):
            mlflow.MlflowClient(self.uri).search_experiments(max_results=1)
        id_file = Path(run_dir) / RUN_ID_FILE
        run_id = run_id or (id_file.read_text().strip() if id_file.exists() else None)
        if run_id:
            self.run = mlflow.start_run(run_id=run_id)
        else:
            self.run = mlflow.start_run(experiment_id=experiment_id(self.tracking.experiment,
                                                                    self.uri),
                                        run_name=Path(run_dir).name)
            mlflow.log_params({k: _param(v) for k, v in params.items()})
            id_file.parent.mkdir(parents=True, exist_ok=True)
            id_file.write_text(self.run.info.run_id)
        self.run_id = self.run.info.run_id
        client = mlflow.MlflowClient(self.uri)
        run = self.run_id

        def send(records: list[MetricRecord]) -> None:
            from mlflow.entities import Metric

            client.log_batch(run, metrics=[Metric(r.key, r.value, r.timestamp_ms, r.step)
                                           for r in records], synchronous=True)

        # replays what an earlier run of this folder could not send, then takes new metrics
        self.sender = MetricSender(send, self.spool, int(self.tracking.queue_size),
                                   float(self.tracking.retry_s), redact_text(self.uri))

    @property
    def online(self) -> bool:
        return self.sender is not None

    def health_note(self) -> str | None:
        if self.sender is None:
            return f"tracking offline, {len(self.spool)} spooled"
        note = self.sender.status()
        return f"tracking {note}" if note else None

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        records = [MetricRecord(k, float(v), now, int(step)) for k, v in metrics.items()
                   if math.isfinite(float(v)) and int(step) > self._logged_steps.get(k, -1)]
        # (a rerun that finishes again logs its finishing metrics at the same step: dropped
        # here like a retrained step's)
        if self.sender is None:
            self.spool.append(records)
        else:
            self.sender.submit(records)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        where = f"{artifact_path}/{Path(path).name}" if artifact_path else Path(path).name
        self._publish(f"artifact {where}", lambda: self._mlflow.log_artifact(
            str(path), artifact_path=artifact_path))

    def log_figure(self, figure: Any, name: str) -> None:
        self._publish(f"figure {name}", lambda: self._mlflow.log_figure(figure, name))

    def begin_finishing(self, run_dir: Path, step: int) -> None:
        self._ledger = PublishLedger(run_dir, step, patience_s=float(self.tracking.outage_wait_s),
                                     retry_s=float(self.tracking.retry_s),
                                     server_down=lambda: not self.server_answers(),
                                     where=f"tracking server {redact_text(self.uri)}")

    @property
    def deferred(self) -> list[str]:
        return list(self._ledger.deferred) if self._ledger is not None else []

    def server_answers(self) -> bool:
        return server_health(self.uri, float(self.tracking.health_timeout_s)) is None

    def _publish(self, item: str, upload):
        """`upload()` now, or (finishing phase) once per folder, outage-proof; None when the
        item could not be sent (offline: it stays in the run folder)."""
        if not self.online:
            log.warning("tracking offline: %s not sent (it stays in the run folder)", item)
            if self._ledger is not None:
                self._ledger.defer(item)
            return None
        if self._ledger is None:
            return upload()
        return self._ledger.send(item, upload)

    def log_encoder(self, encoder: Any, example: Any, extra_files: list[Path] | None = None,
                    metadata: dict | None = None) -> str | None:
        """Log the encoder (pytorch flavour, with signature) as `tracking.registered_model`;
        see `log_model`. `extra_files` land in the model's ``extra_files/`` folder (LSOR: its
        SOM grid)."""
        return self.log_model(encoder, example, "encoder", self.tracking.registered_model,
                              extra_files, metadata)

    def log_model(self, module: Any, example: Any, artifact: str, registered_name: str | None,
                  extra_files: list[Path] | None = None,
                  metadata: dict | None = None) -> str | None:
        """Log a torch module (pytorch flavour, signature from `example`) under `artifact`;
        register it as `registered_name` and point `tracking.alias` at the new version.
        `metadata` goes into the model's MLmodel file (hpcbrain's: how its inputs were made,
        `hpcbrain.evaluate.model_inputs`).

        Returns the `models:/NAME@ALIAS` URI, or the run's model URI when `registered_name` is
        empty. `example` must hold at least 2 volumes: torch.export freezes a batch dimension
        of 1.
        """
        import copy

        import mlflow.pytorch
        import torch
        from mlflow.models import infer_signature

        module = copy.deepcopy(module).eval().to("cpu", torch.float32)
        with torch.no_grad():
            outputs = module(example)
        signature = infer_signature(example.numpy(), outputs.numpy())
        # Three steps, each sent once (a rerun after an outage between them goes on from the
        # last one that landed): log the model, register that logged model, move the alias.
        item = f"model {artifact}" + (f" for {registered_name}" if registered_name else "")
        model_uri = self._publish(item, lambda: mlflow.pytorch.log_model(
            module, name=artifact, signature=signature, input_example=example.numpy(),
            extra_files=[str(f) for f in extra_files or []] or None,
            metadata=metadata).model_uri)
        if model_uri is None or not registered_name:
            return model_uri
        version = self._publish(f"registration of {artifact} as {registered_name}",
                                lambda: _retry_conflicts(
                                    lambda: self._register(model_uri, registered_name)))
        if version is None:
            return None
        alias = self.tracking.alias
        client = self._mlflow.MlflowClient()
        moved = self._publish(f"alias {registered_name}@{alias}", lambda: _retry_conflicts(
            lambda: client.set_registered_model_alias(registered_name, alias, version)
            or version))
        return f"models:/{registered_name}@{alias}" if moved is not None else None

    def _register(self, model_uri: str, name: str) -> str:
        """The version of `name` made from `model_uri`: an existing one (a registration whose
        answer was lost to an outage) or a new one."""
        client = self._mlflow.MlflowClient()
        try:
            versions = client.search_model_versions(f"name='{name}'")
        except Exception:           # no such model yet (the store says so in its own ways)
            versions = []
        for version in versions:
            if version.source == model_uri:
                return str(version.version)
        return str(self._mlflow.register_model(model_uri, name).version)

    def finish(self, status: str = "FINISHED") -> None:
        """Send what is left (at most tracking.finish_timeout_s; the rest stays spooled), then
        end the MLflow run with `status`. Never raises: the run's outcome is already decided."""
        if self.sender is None:
            return
        try:
            self.sender.close(float(self.tracking.finish_timeout_s))
        except OSError as exc:       # the spool's file system is full: what it holds stays
            log.warning("metrics still queued could not be kept: %s", exc)
        try:
            self._mlflow.end_run(status=status)
        except Exception as exc:   # the server went away again: the next run reopens the run
            log.warning("could not mark MLflow run %s %s (%s: %s); it stays RUNNING until the "
                        "next run of the same command", self.run_id, status, type(exc).__name__,
                        str(exc).splitlines()[0] if str(exc) else "")


def _retry_conflicts(call, attempts: int = 5):
    """`call()`, tried again after a short random pause when the store refuses it as a
    conflict with a writer racing it: a sqlite store checks, then inserts, so two runs that
    register one name or move one alias at the same moment collide ("UNIQUE constraint failed",
    "database is locked") though each request alone is fine; the next try sees the other's row.
    Anything else, or the last conflict, is raised."""
    import random

    from mlflow.exceptions import MlflowException

    for attempt in range(attempts):
        try:
            return call()
        except MlflowException as exc:
            text = str(exc)
            conflict = any(s in text for s in ("UNIQUE constraint", "database is locked",
                                               "RESOURCE_ALREADY_EXISTS"))
            if not conflict or attempt == attempts - 1:
                raise
            time.sleep(random.uniform(0.1, 0.5) * (attempt + 1))


def _param(value: Any) -> Any:
    return str(value) if isinstance(value, (list, tuple, dict)) else value


def make_tracker(tracking: DictConfig, params: dict[str, Any], run_dir: Path,
                 is_global_rank0: bool, run_id: str | None = None) -> NullTracker:
    """MLflow on global rank 0 when the `tracking` section enables it, else a tracker that
    drops everything; `params` as for `MlflowTracker`."""
    if is_global_rank0 and tracking.enabled:
        return MlflowTracker(tracking, params, run_dir, run_id)
    return NullTracker()
