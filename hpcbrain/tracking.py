"""MLflow tracking and model registry, from global rank 0 only.

The embedded default is a sqlite tracking store in the project folder (MLflow 3 refuses the old
./mlruns file store), with artifacts beside it in mlartifacts/. `tracking.uri` in the config, or
MLFLOW_TRACKING_URI, points runs at a shared server instead.

mlflow is imported lazily: `import mlflow.pytorch` costs ~3 s, too much for every CLI call and
every DataLoader worker.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Mapping

from omegaconf import DictConfig

from hpcbrain.config import PROJECT_ROOT, flatten_config

RUN_ID_FILE = "mlflow_run_id"


def tracking_uri(cfg: DictConfig) -> str:
    """Config first, then $MLFLOW_TRACKING_URI, then sqlite in the project folder."""
    if cfg.tracking.uri:
        return str(cfg.tracking.uri)
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{PROJECT_ROOT / 'mlflow.db'}"


def _artifact_root_for(uri: str) -> str | None:
    """Where a new experiment keeps artifacts when the store is a local sqlite file."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").resolve().as_uri()
    return None  # a tracking server decides for itself


class NullTracker:
    """What every rank but global rank 0 gets, and rank 0 when tracking is disabled."""

    run_id: str | None = None
    enabled = False

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...
    def log_figure(self, figure: Any, name: str) -> None: ...
    def log_encoder(self, encoder: Any, example: Any,
                    extra_files: list[Path] | None = None) -> str | None: return None
    def log_model(self, module: Any, example: Any, artifact: str, registered_name: str | None,
                  extra_files: list[Path] | None = None) -> str | None: return None
    def finish(self, status: str = "FINISHED") -> None: ...


class MlflowTracker(NullTracker):
    """One MLflow run per run folder: a resumed job continues the run it started."""

    enabled = True

    def __init__(self, cfg: DictConfig, run_dir: Path, run_id: str | None = None):
        import mlflow

        self._mlflow = mlflow
        self.cfg = cfg
        self.uri = tracking_uri(cfg)
        mlflow.set_tracking_uri(self.uri)
        experiment = mlflow.get_experiment_by_name(cfg.tracking.experiment)
        if experiment is None:
            experiment_id = mlflow.create_experiment(cfg.tracking.experiment,
                                                     artifact_location=_artifact_root_for(self.uri))
        else:
            experiment_id = experiment.experiment_id
        id_file = Path(run_dir) / RUN_ID_FILE
        run_id = run_id or (id_file.read_text().strip() if id_file.exists() else None)
        if run_id:
            self.run = mlflow.start_run(run_id=run_id)
        else:
            self.run = mlflow.start_run(experiment_id=experiment_id, run_name=Path(run_dir).name)
            mlflow.log_params({k: _param(v) for k, v in flatten_config(cfg).items()})
            id_file.parent.mkdir(parents=True, exist_ok=True)
            id_file.write_text(self.run.info.run_id)
        self.run_id = self.run.info.run_id

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        finite = {k: float(v) for k, v in metrics.items() if math.isfinite(float(v))}
        if finite:
            self._mlflow.log_metrics(finite, step=step)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._mlflow.log_artifact(str(path), artifact_path=artifact_path)

    def log_figure(self, figure: Any, name: str) -> None:
        self._mlflow.log_figure(figure, name)

    def log_encoder(self, encoder: Any, example: Any,
                    extra_files: list[Path] | None = None) -> str | None:
        """Log the encoder (pytorch flavour, with signature) as `tracking.registered_model`;
        see `log_model`. `extra_files` land in the model's ``extra_files/`` folder (LSOR: its
        SOM grid)."""
        return self.log_model(encoder, example, "encoder", self.cfg.tracking.registered_model,
                              extra_files)

    def log_model(self, module: Any, example: Any, artifact: str, registered_name: str | None,
                  extra_files: list[Path] | None = None) -> str | None:
        """Log a torch module (pytorch flavour, signature from `example`) under `artifact`;
        register it as `registered_name` and point `tracking.alias` at the new version.

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
        info = mlflow.pytorch.log_model(module, name=artifact, signature=signature,
                                        input_example=example.numpy(),
                                        registered_model_name=registered_name or None,
                                        extra_files=[str(f) for f in extra_files or []] or None)
        if not registered_name:
            return info.model_uri
        alias = self.cfg.tracking.alias
        self._mlflow.MlflowClient().set_registered_model_alias(
            registered_name, alias, str(info.registered_model_version))
        return f"models:/{registered_name}@{alias}"

    def finish(self, status: str = "FINISHED") -> None:
        self._mlflow.end_run(status=status)


def _param(value: Any) -> Any:
    return str(value) if isinstance(value, (list, tuple, dict)) else value


def make_tracker(cfg: DictConfig, run_dir: Path, is_global_rank0: bool,
                 run_id: str | None = None) -> NullTracker:
    if is_global_rank0 and cfg.tracking.enabled:
        return MlflowTracker(cfg, run_dir, run_id)
    return NullTracker()
