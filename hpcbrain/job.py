"""What a training job runs, locally (`--local`) or on Slurm: config → data, method, engine → train.

The only module that ties data, method and engine together.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import random
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import submitit.helpers
import torch
from omegaconf import DictConfig, OmegaConf

from hpcbrain import dist, process_group
from hpcbrain.atomic import write_text_atomic
from hpcbrain.config import save_config
from hpcbrain.data.store import CohortStore, StoreError
from hpcbrain.engine.backends import build_engine, needs_process_group
from hpcbrain.engine.registry import engine_class_for, get_engine_class, resolve_engine_name
from hpcbrain.engine.stop import StopRequest, TrainingStopped, stop_on_signals
from hpcbrain.redact import redacted
from hpcbrain.run_lock import run_folder_lock

log = logging.getLogger(__name__)


@dataclass
class TrainingResult:
    run_dir: Path
    global_step: int
    epochs: int
    model_uri: str | None = None
    age_model_uri: str | None = None     # contrastive runs: encoder + ridge (predict-age)
    tracking_uri: str | None = None
    run_id: str | None = None
    figures: list[Path] | None = None
    metrics: dict[str, float] | None = None
    # what the finishing phase could not send to a tracking server that stopped answering
    # (models, registrations, figures, tables): the next run of the same command sends them
    deferred: list[str] | None = None


def run_dir_of(cfg: DictConfig) -> Path:
    return Path(cfg.run.root).expanduser().resolve() / cfg.run.name


def age_calibration_fold_configs(cfg: DictConfig) -> list[DictConfig]:
    """The K fold runs the job trains before `cfg`'s own run when its age model is calibrated
    on encoder folds (`evaluate/encoder_folds.py`; none otherwise): `cfg` with fold k of K as
    its test fold, in a folder of the run, registering nothing and calibrating cheaply (they
    only supply predictions)."""
    from hpcbrain.evaluate.encoder_folds import FOLDS_FOLDER, SOURCE

    if str(cfg.evaluate.age_calibration_subjects) != SOURCE:
        return []
    folds = int(cfg.evaluate.age_calibration_folds)
    runs = []
    for fold in range(folds):
        sub = copy.deepcopy(cfg)
        sub.run.root = str(run_dir_of(cfg) / FOLDS_FOLDER)
        sub.run.name = f"fold-{fold}"
        sub.data.n_folds = folds
        sub.data.fold = fold
        sub.tracking.registered_model = None
        sub.tracking.registered_age_model = None
        sub.evaluate.age_calibration_subjects = "training"
        runs.append(sub)
    return runs


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def open_store(cfg: DictConfig) -> CohortStore:
    """The store of data.store, with data.input_size resolved to its shape (S for a cube, else
    [D, H, W]: what the run's config.yaml records); StoreError when a size the user set
    disagrees with the store's volumes."""
    store = CohortStore(cfg.data.store)
    shape = tuple(store.shape)
    wanted = cfg.data.input_size
    if wanted != "auto":
        from hpcbrain.config import input_shape

        if input_shape(cfg) != shape:
            given = OmegaConf.to_object(wanted) if OmegaConf.is_config(wanted) else wanted
            raise StoreError(f"data.input_size={given} but {cfg.data.store} holds "
                             f"{'x'.join(map(str, shape))} volumes: leave data.input_size "
                             f"out (it follows the store), set it to the store's shape, or "
                             f"reconvert with --shape {' '.join(map(str, input_shape(cfg)))}")
    cfg.data.input_size = shape[0] if len(set(shape)) == 1 else list(shape)
    return store


def choose_conv_weight_grad(choice: str, method, device: torch.device) -> bool:
    """train.conv_weight_grad: the swapped weight gradient on a CPU where it pays (`auto`:
    measured once per CPU model, thread count and oneDNN ISA limit, kept in the host cache)."""
    from hpcbrain.models.conv_weight_grad import (
        MIN_SPEEDUP,
        set_swapped_weight_grad,
        weight_grad_speedup,
    )

    swapped = choice == "swapped"
    if choice == "auto" and device.type == "cpu":
        from hpcbrain.engine.host_cache import cache_path, cached_measurement, cpu_model

        key = (f"{cpu_model()} | {torch.get_num_threads()} threads | ONEDNN_MAX_CPU_ISA="
               f"{os.environ.get('ONEDNN_MAX_CPU_ISA', '')}")
        speedup = float(cached_measurement(cache_path("conv_weight_grad.json"), key,
                                           lambda: round(weight_grad_speedup(), 3)))
        # every rank takes rank 0's choice: one gradient algorithm across the job
        swapped = bool(dist.broadcast_object(speedup >= MIN_SPEEDUP))
        if dist.is_global_rank0():
            log.info("conv weight gradient: %s (the swapped one is %.2fx oneDNN's here)",
                     "swapped" if swapped else "oneDNN's", speedup)
    set_swapped_weight_grad(method, swapped)
    return swapped


def build_datasets(cfg: DictConfig, store: CohortStore, batch_kind: str):
    """Subject-level split of the store, then the method's kind of dataset over each part."""
    from hpcbrain.data.datasets import PairDataset, ScanDataset
    from hpcbrain.data.splits import subject_kfold
    from hpcbrain.data.transforms import build_augmentation

    # Stratify folds by diagnostic group where the cohort has one, so every fold sees each group.
    groups = store.column("group") if "group" in store.columns else None
    split = subject_kfold(store.column("subject"), n_folds=cfg.data.n_folds, fold=cfg.data.fold,
                          val_fraction=cfg.data.val_fraction, seed=cfg.data.split_seed,
                          groups=groups)
    augment = build_augmentation(cfg.data.augment)
    on_device = cfg.data.augment_on == "device"
    if batch_kind == "pairs":
        consecutive = {"all": False, "consecutive": True}.get(cfg.data.pairs)
        if consecutive is None:
            raise ValueError(f"data.pairs must be 'all' or 'consecutive', not {cfg.data.pairs!r}")
        train = PairDataset(store, split.train, consecutive_only=consecutive, transform=augment,
                            seed=cfg.train.seed, augment_on_device=on_device)
        val = PairDataset(store, split.val, consecutive_only=consecutive) if len(split.val) else None
    elif batch_kind == "scans":
        train = ScanDataset(store, split.train, transform=augment, seed=cfg.train.seed,
                            augment_on_device=on_device)
        val = ScanDataset(store, split.val) if len(split.val) else None
    else:
        raise ValueError(f"unknown batch kind {batch_kind!r}")
    if cfg.data.on_corrupt_scan == "skip":
        for dataset in (train, val):
            if dataset is not None:
                dataset.skip_corrupt_scans(run_dir_of(cfg) / CORRUPT_SCANS_FILE)
    if len(train) == 0:
        raise StoreError(f"{cfg.data.store}: the training split holds no {batch_kind} "
                         f"({len(split.train)} scans; pairs need two visits of a subject at "
                         f"different ages)")
    return split, train, val


def trainer_settings(cfg: DictConfig, world: int):
    """The loop's settings from the job's config sections (the trainer reads none itself)."""
    from hpcbrain.config_checks import check_global_batch
    from hpcbrain.engine.trainer import TrainerSettings

    train = cfg.train
    return TrainerSettings(
        epochs=int(train.epochs), seed=int(train.seed),
        batch_per_rank=check_global_batch(cfg, world), lr=float(train.lr),
        lr_gamma=float(train.lr_gamma), lr_step_every_epochs=train.lr_step_every_epochs,
        max_steps_per_epoch=train.max_steps_per_epoch,
        checkpoint_every_steps=train.checkpoint_every_steps,
        log_every_steps=int(train.log_every_steps), precision=str(train.precision),
        num_workers=int(cfg.data.num_workers), resume=bool(cfg.run.resume),
        timeout_minutes=float(cfg.engine.timeout_minutes),
        step_timeout_minutes=float(cfg.engine.step_timeout_minutes),
        config_record=redacted(OmegaConf.to_container(cfg, resolve=True)))


def setup_process_group(cfg: DictConfig) -> process_group.DistState:
    """The process group the launcher's environment describes (torchrun, Slurm, submitit, or
    none); DDP and DeepSpeed get a one-process group when nothing launched us. Idempotent."""
    engine = engine_class_for(cfg.engine.name)        # None for auto
    initializer = engine.process_group_initializer() if engine is not None else None
    return process_group.setup_distributed(backend=cfg.engine.backend,
                                           timeout_minutes=cfg.engine.timeout_minutes,
                                           require_group=needs_process_group(cfg.engine.name),
                                           initializer=initializer)


def run_training(cfg: DictConfig, stop: StopRequest | None = None) -> TrainingResult:
    """Train (or resume) the configured method on every rank the launcher started; on rank 0
    evaluate and register the encoder. Ends the process group if it started it.

    SIGTERM or SIGUSR2 stop the run after the current step with a checkpoint of that step
    (`TrainingStopped`); a rerun resumes at the next step. Pass `stop` when the caller routes
    the signals itself (`TrainingJob`); otherwise they are routed here while training runs."""
    if stop is None:
        stop = StopRequest()
        with stop_on_signals(stop):
            return run_training(cfg, stop)
    group = setup_process_group(cfg)
    process_group.configure_logging()
    try:
        with run_folder_lock(run_dir_of(cfg)):     # one job per run folder
            # An encoder-folds age calibration first trains its fold runs (in folders of this
            # run; finished ones are reused), whose held-out predictions calibrate this run.
            for fold_cfg in age_calibration_fold_configs(cfg):
                with run_folder_lock(run_dir_of(fold_cfg)):
                    _train_in_group(fold_cfg, group.device, stop)
            return _train_in_group(cfg, group.device, stop)
    finally:
        if group.created:
            process_group.teardown()


def _train_in_group(cfg: DictConfig, device: torch.device, stop: StopRequest) -> TrainingResult:
    from hpcbrain.config import flatten_config
    from hpcbrain.data.batch_augment import BatchAugmentation
    from hpcbrain.engine.trainer import Trainer
    from hpcbrain.methods import build_method, get_method_class
    from hpcbrain.tracking import make_tracker, tracking_uri

    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    seed_everything(cfg.train.seed, cfg.train.deterministic)
    run_dir = run_dir_of(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    store = open_store(cfg)
    method_class = get_method_class(cfg.method)
    split, train_set, val_set = build_datasets(cfg, store, method_class.batch_kind)
    from hpcbrain.methods.base import TrainingSetSize

    subjects = np.unique(np.asarray(store.column("subject"))[split.train].astype(str)).size
    method_class.resolve_config(cfg[method_class.config_section],
                                TrainingSetSize(len(train_set), len(split.train), int(subjects)))
    if dist.is_global_rank0():
        save_config(cfg, run_dir / "config.yaml")
    method = build_method(cfg)
    if cfg.train.activation_checkpointing:
        from hpcbrain.models.checkpointing import set_activation_checkpointing

        networks = set_activation_checkpointing(method)
        if dist.is_global_rank0():
            log.info("activation checkpointing on in %d network(s) of %s", networks, cfg.method)
    method.to(device)
    choose_conv_weight_grad(str(cfg.train.conv_weight_grad), method, device)
    if train_set.augment_on_device:
        method.batch_augmentation = BatchAugmentation(train_set.transform, train_set.seed)
    engine_class = get_engine_class(resolve_engine_name(cfg.engine.name, dist.world_size()))
    if cfg.train.channels_last and engine_class.channels_last:
        # oneDNN (CPU) and cuDNN pick their faster channels-last 3D kernels from the weights'
        # layout; measured 1.2 s vs 1.9 s per LSOR step at 32³ on this 2-core CPU (DeepSpeed
        # refuses channels-last strides: it says so with `channels_last = False`).
        method.to(memory_format=torch.channels_last_3d)
    engine = build_engine(cfg.engine, cfg.train, method, device)
    tracker = make_tracker(cfg.tracking, flatten_config(cfg), run_dir, dist.is_global_rank0())
    trainer = Trainer(trainer_settings(cfg, dist.world_size()), engine, train_set, val_set,
                      run_dir, tracker, stop)
    trainer.resume()
    if dist.is_global_rank0():
        log.info("training %s on %d %s (%d train / %d val scans), %d steps per epoch, run %s",
                 cfg.method, len(train_set), method.batch_kind, len(split.train),
                 len(split.val), trainer.steps_per_epoch, run_dir)
        tracker.log_artifact(run_dir / "config.yaml")
    status = "FAILED"
    try:
        done = load_result(run_dir)
        complete = done is not None and trainer.progress.epoch >= cfg.train.epochs
        # A run that finished while the tracking server was away sends what it deferred (its
        # models, their registration, figures) on the first rerun that reaches the server: its
        # final checkpoint is loaded, nothing is retrained, and what was sent is not sent again.
        register_late = dist.broadcast_object(bool(
            complete and tracker.online
            and (done.deferred or (done.model_uri is None and cfg.tracking.registered_model))))
        if complete and not register_late:
            # A finished run rerun (the demo twice, a requeue after the end): keep its model
            # version instead of registering the same weights again.
            log.info("run %s is already complete; its encoder is %s", run_dir, done.model_uri)
            if done.run_id is None and trainer.run_id is not None and dist.is_global_rank0():
                done.run_id = trainer.run_id      # trained offline: its metrics went here now
                save_result(done)
            status = "FINISHED"
            return done
        progress = trainer.fit()
        result = TrainingResult(run_dir, progress.global_step, progress.epoch,
                                tracking_uri=tracking_uri(cfg.tracking), run_id=trainer.run_id)
        # The trained method whole and in fp32 (DeepSpeed: gathered from its master weights);
        # a collective under ZeRO, so every rank takes part before rank 0 evaluates.
        trained = engine.export_method(lambda: build_method(cfg))
        if dist.is_global_rank0():
            finish_on_rank0(cfg, trained, store, split, tracker, run_dir, result)
            save_result(result)
        status = "FINISHED"
        return result
    except TrainingStopped:
        status = "KILLED"         # MLflow's word for stopped from outside; a resume reopens it
        raise
    finally:
        tracker.finish(status)


RESULT_FILE = "result.json"
CORRUPT_SCANS_FILE = "corrupt-scans.tsv"     # data.on_corrupt_scan=skip: the scans skipped


def save_result(result: TrainingResult) -> Path:
    """The finished run's summary, written last: its presence means evaluation and
    registration are done."""
    path = result.run_dir / RESULT_FILE
    summary = redacted({k: v for k, v in asdict(result).items() if k != "run_dir"})
    summary["figures"] = [str(f) for f in result.figures or []]
    return write_text_atomic(path, json.dumps(summary, indent=2))


def load_result(run_dir: Path) -> TrainingResult | None:
    path = run_dir / RESULT_FILE
    if not path.exists():
        return None
    summary = json.loads(path.read_text())
    summary["figures"] = [Path(f) for f in summary.get("figures") or []]
    return TrainingResult(run_dir=run_dir, **summary)


def finish_on_rank0(cfg, method, store, split, tracker, run_dir: Path,
                    result: TrainingResult) -> None:
    """Interpretability figures and metrics, then the encoder into the model registry. What
    the tracking server does not take (it stopped answering for `tracking.outage_wait_s`) is
    listed in `result.deferred`; the run folder keeps all of it."""
    from hpcbrain.evaluate.interpretability import evaluate_som

    tracker.begin_finishing(run_dir, result.global_step)
    scans = np.arange(len(store))
    if cfg.data.on_corrupt_scan == "skip":
        split, scans = _without_corrupt_scans(store, split)
    # The grid is described over every scan of the store (what `hpcbrain embed` of the cohort
    # gives): its quality is a property of the map, not a prediction scored on held-out data.
    report = evaluate_som(method, store, scans, run_dir / "figures")
    if report is not None:
        tracker.log_metrics(report.metrics, step=result.global_step)
        for figure in report.figures:
            tracker.log_artifact(figure, artifact_path="figures")
        result.metrics = report.metrics
        result.figures = report.figures
    from hpcbrain.evaluate.model_inputs import model_inputs_metadata
    from hpcbrain.evaluate.ridge import EvaluationContext, evaluate_after_training

    context = EvaluationContext(cfg.evaluate, cfg.tracking, str(cfg.method),
                                str(cfg.model.backbone),
                                tuple(run_dir_of(c) for c in age_calibration_fold_configs(cfg)))
    age = evaluate_after_training(context, method, store, split, tracker, run_dir,
                                  result.global_step)   # contrastive methods: age MAE
    example = torch.from_numpy(np.stack([store.read_image(i) for i in split.train[:2]]))[:, None]
    example = example.reshape(-1, 1, *store.shape)
    inputs = model_inputs_metadata(store)
    result.model_uri = tracker.log_encoder(method.encoder(), example,
                                           extra_files=method.registry_files(run_dir / "registry"),
                                           metadata=inputs)
    if age is not None:
        result.metrics = {**(result.metrics or {}), **age.metrics}
        if cfg.tracking.registered_age_model:
            from hpcbrain.evaluate.age_calibration import write_model_files

            name = cfg.tracking.registered_age_model
            card = write_model_files(age.calibration, run_dir / "registry" / "age_model", name)
            metadata = {**inputs, "hpcbrain": {**inputs["hpcbrain"],
                                               "age_model": age.calibration.card()}}
            result.age_model_uri = tracker.log_model(age.predictor, example, "age_predictor",
                                                     name, extra_files=card, metadata=metadata)
    result.deferred = tracker.deferred or None


def _without_corrupt_scans(store: CohortStore, split):
    """data.on_corrupt_scan=skip: the split and the store's scans less every scan that fails
    its checksum (a scrub of the store: the evaluation reads every scan anyway)."""
    import dataclasses

    from hpcbrain.data.verify import unreadable_scans

    bad = unreadable_scans(store)
    if bad:
        log.warning("the evaluation after training leaves out %d corrupt scan(s) "
                    "(data.on_corrupt_scan=skip): %s", len(bad),
                    "; ".join(list(bad.values())[:3]))
    drop = np.fromiter(bad, dtype=np.int64, count=len(bad))
    kept = {part: np.setdiff1d(getattr(split, part), drop)
            for part in ("train", "val", "test")}
    return dataclasses.replace(split, **kept), np.setdiff1d(np.arange(len(store)), drop)


class TrainingJob(submitit.helpers.Checkpointable):
    """What every Slurm task runs: export torch.distributed's env from Slurm's, then train.

    Every task (one per GPU, or per CPU slot) runs `__call__`; `run_training` starts the process
    group from the exported env (`hpcbrain.process_group.setup_distributed`, with the config's engine
    backend and timeout) and ends it. When Slurm signals a time limit or a preemption, submitit
    calls `checkpoint()` on global rank 0 only, inside a signal handler, and requeues the job:
    the requeued job calls `__call__` again and `run_training` resumes from the run folder's
    latest checkpoint and the MLflow run id kept beside it.
    """

    #: How long global rank 0, stopped by SIGTERM alone, waits for the USR2 that submitit's
    #: preemption sends after it before leaving the requeue to Slurm (PreemptMode=REQUEUE).
    usr2_grace_s = 10.0

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg

    def __call__(self):
        # MASTER_ADDR = first node, MASTER_PORT from the job id (the same after a requeue), RANK,
        # WORLD_SIZE, LOCAL_RANK. Devices are picked by LOCAL_RANK, so CUDA_VISIBLE_DEVICES stays.
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        stop = StopRequest()
        # submitit's USR2 handler (checkpoint + `scontrol requeue`) is set aside while training
        # runs: a signal only marks the stop, every rank stops after the same step with a
        # checkpoint of it, and then rank 0 hands over to submitit's handler to requeue.
        with stop_on_signals(stop) as previous:
            try:
                return run_training(self.cfg, stop)
            except TrainingStopped as stopped:
                self._leave_for_requeue(stopped, stop, previous.get(int(signal.SIGUSR2)))

    def _leave_for_requeue(self, stopped: TrainingStopped, stop: StopRequest, requeue) -> None:
        """After a stop: rank 0 requeues through submitit (which exits); every other rank, and
        rank 0 when nothing can requeue, exits with 128 + the signal, as a killed task would."""
        if int(os.environ.get("RANK", "0")) == 0 and callable(requeue):
            deadline = time.monotonic() + self.usr2_grace_s
            while not stop.received(signal.SIGUSR2) and time.monotonic() < deadline:
                time.sleep(0.1)
            if stop.received(signal.SIGUSR2):
                log.info("%s; requeueing", stopped)
                requeue(signal.SIGUSR2, None)     # submitit: checkpoint(), requeue, sys.exit
        raise SystemExit(stopped.exit_code)

    def checkpoint(self, *args: Any, **kwargs: Any):
        # Called by submitit's USR2 handler on global rank 0: after the training loop stopped
        # with a checkpoint of its last step (`_leave_for_requeue`), or, for a signal before
        # training started, directly. Nothing to save here; resubmit ourselves, unchanged.
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)
