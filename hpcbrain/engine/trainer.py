"""The training loop: epochs of steps, validation, checkpoints, resume, metrics.

It knows an engine (how a step runs) and a method (what a step computes) only through their
small interfaces, so the same loop serves every method and every engine.
"""
from __future__ import annotations

import itertools
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from tqdm import tqdm

from hpcbrain import dist
from hpcbrain.data.datasets import StoreDataset
from hpcbrain.engine import checkpoint
from hpcbrain.engine.backends import NonFiniteLossError, peak_memory_mb
from hpcbrain.engine.base import Engine
from hpcbrain.engine.bf16_check import keep_bf16_only_if_right
from hpcbrain.engine.flops import count_flops, device_peak_tflops
from hpcbrain.engine.metrics import StepMetrics
from hpcbrain.engine.stop import StopRequest, TrainingStopped
from hpcbrain.tracking import NullTracker

log = logging.getLogger(__name__)


def lr_at_epoch(base_lr: float, epoch: int, every: int | None, gamma: float) -> float:
    """Step schedule: base_lr · gamma^⌊epoch / every⌋ (epoch from 0); constant when every is
    None or < 1. AdapN's paper setting: every 10 epochs, gamma 0.9."""
    if not every or every < 1:
        return float(base_lr)
    return float(base_lr) * float(gamma) ** (max(int(epoch), 0) // int(every))


@dataclass
class Progress:
    epoch: int = 0          # the epoch running or next to run (= epochs completed)
    global_step: int = 0    # train steps (micro-batches under accumulation) taken so far
    step_in_epoch: int = 0  # steps of `epoch` already taken (a mid-epoch checkpoint resumes here)
    epoch_sums: dict[str, float] = field(default_factory=dict)  # loss sums of those steps


class SkipFirst(Sampler):
    """The sampler's epoch order without its first `skip` items: a mid-epoch resume sees
    exactly the batches the interrupted run had not trained on yet."""

    def __init__(self, sampler: Sampler, skip: int):
        self.sampler, self.skip = sampler, skip

    def __iter__(self):
        return itertools.islice(iter(self.sampler), self.skip, None)

    def __len__(self) -> int:
        return max(len(self.sampler) - self.skip, 0)


@dataclass(frozen=True)
class TrainerSettings:
    """What the loop needs of a job's config, composed by the job (`job.trainer_settings`): the
    loop reads no config section itself, so a test can build it from these alone."""

    epochs: int
    seed: int                          # the sampler's: data order = f(seed, epoch)
    batch_per_rank: int                # train.batch_size / (world · accumulation steps)
    lr: float
    lr_gamma: float = 1.0
    lr_step_every_epochs: int | None = None
    max_steps_per_epoch: int | None = None
    checkpoint_every_steps: int | None = None
    log_every_steps: int = 10
    precision: str = "auto"            # train.precision: `auto` runs the first-batch bf16 probe
    num_workers: int = 0
    resume: bool = True
    timeout_minutes: float = 30.0      # collectives outside steps / within them
    step_timeout_minutes: float = 2.0
    config_record: dict = field(default_factory=dict)   # the job's config, redacted: kept in
                                                         # every checkpoint


class Trainer:
    def __init__(self, settings: TrainerSettings, engine: Engine, train_set: StoreDataset,
                 val_set: StoreDataset | None,
                 run_dir: Path, tracker: NullTracker | None = None,
                 stop: StopRequest | None = None):
        self.settings = settings
        self.engine = engine
        self.method = engine.method
        self.train_set = train_set
        self.val_set = val_set
        self.run_dir = Path(run_dir)
        self.tracker = tracker or NullTracker()
        # set by a signal handler (hpcbrain.engine.stop); honoured at the next step boundary
        self.stop = stop or StopRequest()
        self.progress = Progress()
        self._corrupt_named: set[int] = set()   # corrupt scans already named in the log
        # FLOPs of one step, counted on this process's first step; the peak they compare with
        self.flops_per_step: float | None = None
        self.peak_tflops: float | None = None
        self.world = dist.world_size()
        self.rank = dist.rank()
        # The run id lives on rank 0 (the only one tracking); every rank's checkpoint holds it.
        self.run_id = dist.broadcast_object(self.tracker.run_id)
        # train.batch_size is the GLOBAL batch of one optimizer step: each rank loads
        # batch / (world · accumulation steps) items per micro-batch (= per train_step).
        self.grad_accum_steps = int(engine.grad_accum_steps)
        self.long_timeout = float(settings.timeout_minutes)
        self.step_timeout = float(settings.step_timeout_minutes)
        self.batch_per_rank = int(settings.batch_per_rank)
        # The sampler is seeded per epoch in every engine, so the data order depends only on
        # (seed, epoch): that is what makes a resumed run equal an uninterrupted one.
        self.sampler = DistributedSampler(train_set, num_replicas=self.world, rank=self.rank,
                                          shuffle=True, seed=settings.seed, drop_last=True)
        self.train_loader = self._loader(train_set, self.sampler)
        steps = len(self.train_loader)
        if steps == 0:
            raise ValueError(f"the training set ({len(train_set)} items) is smaller than one "
                             f"batch of {self.batch_per_rank} per rank: lower train.batch_size")
        cap = settings.max_steps_per_epoch
        self.steps_per_epoch = min(steps, cap) if cap else steps
        # Whole optimizer steps per epoch, so no accumulated gradient spans a checkpoint.
        self.steps_per_epoch -= self.steps_per_epoch % self.grad_accum_steps
        every = settings.checkpoint_every_steps
        if self.steps_per_epoch == 0 or (every and every % self.grad_accum_steps):
            raise ValueError(f"engine.grad_accum_steps={self.grad_accum_steps} must divide "
                             f"train.checkpoint_every_steps ({every}) and fit into an epoch of "
                             f"{min(steps, cap) if cap else steps} micro-batches")

    # --- data ----------------------------------------------------------------------------
    def _loader(self, dataset: Dataset, sampler, drop_last: bool = True) -> DataLoader:
        workers = self.settings.num_workers
        return DataLoader(dataset, batch_size=self.batch_per_rank, sampler=sampler,
                          num_workers=workers, drop_last=drop_last,
                          persistent_workers=False, pin_memory=torch.cuda.is_available(),
                          multiprocessing_context="fork" if workers else None)

    def _ordered_loader(self, dataset: Dataset) -> DataLoader:
        sampler = DistributedSampler(dataset, num_replicas=self.world, rank=self.rank,
                                     shuffle=False, drop_last=False)
        return self._loader(dataset, sampler, drop_last=False)

    def _set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)
        self.train_set.set_epoch(epoch)

    def encode_batches(self) -> Callable[[], Iterable[dict[str, Any]]]:
        """Un-augmented training batches, each rank its own share (for k-means init)."""
        plain = self.train_set.without_augmentation()

        def batches():
            for batch in self._ordered_loader(plain):
                yield {k: v.to(self.engine.device) if torch.is_tensor(v) else v
                       for k, v in batch.items()}
        return batches

    # --- checkpoints ---------------------------------------------------------------------
    def save_checkpoint(self) -> Path | None:
        """Every rank calls it; the engine decides who writes what (DDP: rank 0, one file;
        DeepSpeed: every rank its shard)."""
        client_state = {"progress": asdict(self.progress), "epoch": self.progress.epoch,
                        "global_step": self.progress.global_step,
                        "rng": checkpoint.gather_rng_states(),   # one entry per rank
                        "config": self.settings.config_record,
                        "mlflow_run_id": self.run_id, "engine_name": self.engine.name,
                        "world_size": self.world}
        return self.engine.save_checkpoint(self.run_dir, self.progress.global_step, client_state)

    def resume(self) -> bool:
        """Load the run folder's latest checkpoint, if any. True when it resumed."""
        if not self.settings.resume:
            return False
        state = self.engine.load_checkpoint(self.run_dir)
        if state is None:
            return False
        path = state["path"]
        checkpoint.restore_rng_state(state["rng"], self.rank)
        self.progress = Progress(**state["progress"])
        if state.get("mlflow_run_id") and self.run_id and state["mlflow_run_id"] != self.run_id:
            log.warning("checkpoint %s belongs to MLflow run %s, tracking continues in %s",
                        path, state["mlflow_run_id"], self.run_id)
        log.info("resumed from %s (epoch %d, step %d of the epoch, global step %d)", path,
                 self.progress.epoch, self.progress.step_in_epoch, self.progress.global_step)
        return True

    # --- loop ----------------------------------------------------------------------------
    def fit(self) -> Progress:
        """Every epoch: the method's epoch start (e.g. LSOR's k-means), the training steps,
        its epoch end, validation, a checkpoint. Collectives wait engine.timeout_minutes only
        in the method's epoch start (LSOR's k-means initialisation runs there, on rank 0, while
        the others wait) and engine.step_timeout_minutes everywhere else — training steps,
        the method's epoch end (every rank encodes its share, then one all-reduce), validation
        and checkpoints — as torchtitan does after the first step: a rank that dies or hangs
        anywhere in an epoch is noticed in minutes, not half an hour; a failed collective
        names the phase. (Checkpoints larger than the step timeout's worth of disk writing need
        a larger engine.step_timeout_minutes.)"""
        epochs = self.settings.epochs
        while self.progress.epoch < epochs:
            epoch = self.progress.epoch
            self._set_epoch(epoch)
            self._apply_lr_schedule(epoch)
            with dist.timeout(self.long_timeout, "the method's epoch start"):
                self.method.on_epoch_start(epoch, self.encode_batches())
            train_means = self._train_epoch(epoch)
            with dist.timeout(self.step_timeout, "the method's epoch end"):
                with self.engine.full_parameters():
                    health = self.method.on_epoch_end(epoch, self.encode_batches())
            # validation steps are steps: a rank that hangs in them is noticed as fast
            with dist.timeout(self.step_timeout, "validation"):
                val_means = self.validate()
            self.progress = Progress(epoch=epoch + 1, global_step=self.progress.global_step)
            metrics = {f"epoch/train_{k}": v for k, v in train_means.items()}
            metrics.update({f"epoch/val_{k}": v for k, v in val_means.items()})
            metrics["epoch/epoch"] = epoch
            metrics.update(health)
            metrics.update(self._corrupt_scans_report(epoch))
            self.tracker.log_metrics(metrics, step=self.progress.global_step)
            with dist.timeout(self.step_timeout, "a checkpoint"):
                saved = self.save_checkpoint()
            if self.rank == 0:
                summary = " ".join(f"{k.split('/')[-1]}={v:.4f}" for k, v in metrics.items()
                                   if k.endswith("loss"))
                summary += "".join(f" {k.split('/')[-1]}={v:.4g}" for k, v in health.items())
                log.info("epoch %d/%d done: %s", epoch + 1, epochs, summary)
            # a stop asked for during the epoch's end (validation, SOM health): this
            # checkpoint is the one to resume from
            if self._stop_agreed():
                self._stopped(saved)
        dist.set_timeout(self.long_timeout)   # export and evaluation on rank 0 take a while
        dist.set_phase("the export and evaluation after training")
        return self.progress

    def _corrupt_scans_report(self, epoch: int) -> dict[str, float]:
        """data.on_corrupt_scan=skip: the corrupt scans skipped so far (on any rank or loader
        worker), named once each by rank 0 when first met; their count as a metric."""
        skipping = [d for d in (self.train_set, self.val_set)
                    if d is not None and d.corrupt_log is not None]
        if not skipping:
            return {}
        met: dict[int, str] = {}
        for dataset in skipping:
            met.update(dataset.corrupt_scans_met())
        new = sorted(set(met) - self._corrupt_named)
        if new and self.rank == 0:
            log.warning("epoch %d: %d corrupt scan(s) skipped (%d in all; data.on_corrupt_scan="
                        "skip): %s. Repair them with `hpcbrain convert --repair`", epoch + 1,
                        len(new), len(met), "; ".join(met[i] for i in new[:5])
                        + (f"; and {len(new) - 5} more" if len(new) > 5 else ""))
        self._corrupt_named.update(new)
        return {"data/corrupt_scans_skipped": float(len(met))}

    def _apply_lr_schedule(self, epoch: int) -> None:
        """train.lr_step_every_epochs / train.lr_gamma: set this epoch's lr through the engine.
        A function of the epoch only, so a resumed run gets the lr of an uninterrupted one."""
        every = self.settings.lr_step_every_epochs
        if not every:
            return
        self.engine.set_lr(lr_at_epoch(self.settings.lr, epoch, every, self.settings.lr_gamma))

    def _train_epoch(self, epoch: int) -> dict[str, float]:
        first = self.progress.step_in_epoch        # > 0 after a mid-epoch resume
        metrics = StepMetrics(self.world, self.batch_per_rank, self.progress.epoch_sums)
        every = self.settings.checkpoint_every_steps
        bar = tqdm(total=self.steps_per_epoch, initial=first, unit="step", leave=False,
                   desc=f"epoch {epoch + 1}/{self.settings.epochs}", disable=self.rank != 0,
                   dynamic_ncols=True)
        loader = self.train_loader
        if first:
            loader = self._loader(self.train_set,
                                  SkipFirst(self.sampler, first * self.batch_per_rank))
        iterator = iter(loader)
        for step_in_epoch in range(first, self.steps_per_epoch):
            fetch_start = time.perf_counter()
            batch = next(iterator)
            data_wait = time.perf_counter() - fetch_start
            self.method.set_progress(epoch, step_in_epoch, self.steps_per_epoch)
            if self.flops_per_step is None:
                losses = self._first_step(batch, epoch, step_in_epoch)
            else:
                losses = self._step(batch, epoch, step_in_epoch)
            if step_in_epoch == first:     # the first step compiled and allocated: now short
                dist.set_timeout(self.step_timeout)
                dist.set_phase("training steps")
            metrics.add_step(losses, data_wait)
            self.progress.global_step += 1
            self.progress.step_in_epoch = done = step_in_epoch + 1
            bar.update(1)
            if done % self.settings.log_every_steps == 0 or done == self.steps_per_epoch:
                # Every rank gets here at the same steps: the reductions are collective.
                self._log_window(metrics, bar)
            periodic = every and done % every == 0 and done < self.steps_per_epoch
            stopping = self._stop_agreed()
            if periodic or stopping:
                self.progress.epoch_sums = metrics.epoch_sums()
                with dist.timeout(self.step_timeout, "a checkpoint"):
                    saved = self.save_checkpoint()   # the epoch-end one follows validation
                if stopping:
                    bar.close()
                    self._stopped(saved)
        bar.close()
        sums = metrics.epoch_sums()
        return self._mean_over_ranks({k: v / self.steps_per_epoch for k, v in sums.items()})

    def _stop_agreed(self) -> bool:
        """Whether any rank was asked to stop: one all-reduce of one number per step, so
        every rank stops after the same step."""
        local = float(self.stop.signals[0]) if self.stop.requested else 0.0
        if self.world > 1:
            with dist.named_collective("the per-step stop agreement (one all-reduce)"):
                local = self._max_over_ranks([local])[0]
        if local and not self.stop.requested:
            self.stop.request(int(local))       # a peer's signal: stop with it
        return local > 0

    def _stopped(self, saved: Path | None) -> None:
        stopped = TrainingStopped(self.stop.signal_name or "a stop request",
                                  self.progress.global_step, str(saved) if saved else None)
        log.warning("%s", stopped)
        raise stopped

    def _first_step(self, batch: dict[str, Any], epoch: int,
                    step_in_epoch: int) -> dict[str, torch.Tensor]:
        """This process's first step, its FLOPs counted (for throughput/tflops and mfu)."""
        if self.settings.precision == "auto":
            self._settle_auto_precision(batch)
        losses, flops = count_flops(lambda: self._step(batch, epoch, step_in_epoch))
        self.flops_per_step = flops
        self.peak_tflops = device_peak_tflops(self.engine.device, self.engine.bf16)
        return losses

    def _settle_auto_precision(self, batch: dict[str, Any]) -> None:
        """`auto` chose bf16 autocast: kept only if every layer the method runs in bf16 computes
        it right on this host (engine/bf16_check.py), on every rank; else fp32 for the run."""
        settled = keep_bf16_only_if_right(self.engine, batch,
                                          lambda error: self._max_over_ranks([error])[0])
        if settled is None:
            return
        found, worst = settled
        if self.engine.bf16:
            log.info("train.precision=auto: bf16 (%d layers probed; bf16 within %.2g of fp32, "
                     "worst %s)", found.layers_probed, worst, found.worst_layer)
            return
        log.warning("train.precision=auto: fp32, because this host computes bf16 wrongly for "
                    "a layer of this method (rank %d: %s at input %s, %.3g relative error; "
                    "worst over ranks %.3g; see hpcbrain/engine/bf16_check.py). "
                    "train.precision=bf16 forces bf16", self.rank, found.worst_layer,
                    list(found.worst_shape), found.worst_relative_error, worst)

    def _step(self, batch: dict[str, Any], epoch: int, step_in_epoch: int) -> dict[str, torch.Tensor]:
        where = f"epoch {epoch}, step {step_in_epoch} (global step {self.progress.global_step})"
        try:
            with dist.named_collective(f"training step at {where} (the gradient all-reduce, "
                                       f"or a loss's all-gather over ranks)"):
                return self.engine.train_step(batch, where)
        except NonFiniteLossError as exc:
            last = self.engine.latest_checkpoint(self.run_dir)
            raise NonFiniteLossError(
                f"{exc}; stopped without updating the parameters. The last good checkpoint "
                f"is {last or 'none (no epoch completed)'}; lower train.lr or check the "
                f"data, then rerun to resume") from None

    def _log_window(self, metrics: StepMetrics, bar) -> None:
        """The log step: the latest losses (mean over ranks), schedules, the window's
        throughput and the worst rank's data wait and memory, to the tracker and the bar."""
        values = metrics.last_losses()
        window = metrics.close_window(self.flops_per_step, self.peak_tflops)
        postfix = {"loss": f"{values['loss']:.4f}", "samples_s": f"{window['samples_per_s']:.1f}"}
        note = self.tracker.health_note()        # e.g. "tracking offline 12s, 40 spooled"
        if note:
            postfix["warning"] = note
        bar.set_postfix(**postfix)
        logged = {f"train/{k}": v for k, v in self._mean_over_ranks(values).items()}
        logged.update({f"schedule/{k}": v for k, v in self.method.scalars().items()})
        logged["schedule/lr"] = self.engine.lr
        logged.update({f"throughput/{k}": v for k, v in window.items()})
        worst = self._max_over_ranks([window["data_wait_share"],
                                      peak_memory_mb(self.engine.device)])
        logged["throughput/data_wait_share_max"] = worst[0]   # the slowest loader
        logged["memory/peak_mb"] = worst[1]                  # the largest rank
        self.tracker.log_metrics(logged, step=self.progress.global_step)

    def _mean_over_ranks(self, values: dict[str, float]) -> dict[str, float]:
        if self.world == 1 or not values:
            return values
        keys = sorted(values)
        total = dist.all_reduce_sum(torch.tensor([values[k] for k in keys], dtype=torch.float64,
                                                 device=self.engine.device))
        return {k: float(t) / self.world for k, t in zip(keys, total.tolist())}

    def _max_over_ranks(self, values: list[float]) -> list[float]:
        if self.world == 1:
            return values
        return dist.all_reduce_max(torch.tensor(values, dtype=torch.float64,
                                                device=self.engine.device)).tolist()

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Mean validation losses over the whole validation set (all ranks)."""
        if self.val_set is None or len(self.val_set) == 0:
            return {}
        sums: dict[str, torch.Tensor] = {}
        count = torch.zeros((), dtype=torch.float64)
        for batch in self._ordered_loader(self.val_set):
            n = len(next(v for v in batch.values() if torch.is_tensor(v)))
            for key, value in self.engine.validation_step(batch).items():
                sums[key] = sums.get(key, torch.zeros((), dtype=torch.float64)) + float(value) * n
            count += n
        keys = sorted(sums)
        totals = torch.stack([sums[k] for k in keys] + [count])
        totals = dist.all_reduce_sum(totals)
        return {k: float(totals[i] / totals[-1]) for i, k in enumerate(keys)
                if math.isfinite(float(totals[-1])) and float(totals[-1]) > 0}
