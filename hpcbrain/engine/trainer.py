"""The training loop: epochs of steps, validation, checkpoints, resume, metrics.

It knows an engine (how a step runs) and a method (what a step computes) only through their
small interfaces, so the same loop serves every method and every engine.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

from hpcbrain import dist
from hpcbrain.engine import checkpoint
from hpcbrain.engine.backends import NonFiniteLossError
from hpcbrain.tracking import NullTracker

log = logging.getLogger(__name__)


@dataclass
class Progress:
    epoch: int = 0          # the next epoch to run (= epochs completed)
    global_step: int = 0    # optimizer steps taken so far


class Trainer:
    def __init__(self, cfg: DictConfig, engine, train_set: Dataset, val_set: Dataset | None,
                 run_dir: Path, tracker: NullTracker | None = None):
        self.cfg = cfg
        self.engine = engine
        self.method = engine.method
        self.train_set = train_set
        self.val_set = val_set
        self.run_dir = Path(run_dir)
        self.tracker = tracker or NullTracker()
        self.progress = Progress()
        self.world = dist.world_size()
        self.rank = dist.rank()
        global_batch = cfg.train.batch_size
        if global_batch % self.world:
            raise ValueError(f"train.batch_size={global_batch} is the global batch and must be "
                             f"divisible by the world size {self.world}")
        self.batch_per_rank = global_batch // self.world
        # The sampler is seeded per epoch in every engine, so the data order depends only on
        # (seed, epoch): that is what makes a resumed run equal an uninterrupted one.
        self.sampler = DistributedSampler(train_set, num_replicas=self.world, rank=self.rank,
                                          shuffle=True, seed=cfg.train.seed, drop_last=True)
        self.train_loader = self._loader(train_set, self.sampler)
        steps = len(self.train_loader)
        if steps == 0:
            raise ValueError(f"the training set ({len(train_set)} items) is smaller than one "
                             f"batch of {self.batch_per_rank} per rank: lower train.batch_size")
        cap = cfg.train.max_steps_per_epoch
        self.steps_per_epoch = min(steps, cap) if cap else steps

    # --- data ----------------------------------------------------------------------------
    def _loader(self, dataset: Dataset, sampler, drop_last: bool = True) -> DataLoader:
        workers = self.cfg.data.num_workers
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
        if hasattr(self.train_set, "set_epoch"):
            self.train_set.set_epoch(epoch)

    def encode_batches(self) -> Callable[[], Iterable[dict[str, Any]]]:
        """Un-augmented training batches, each rank its own share (for k-means init)."""
        plain = getattr(self.train_set, "without_augmentation", lambda: self.train_set)()

        def batches():
            for batch in self._ordered_loader(plain):
                yield {k: v.to(self.engine.device) if torch.is_tensor(v) else v
                       for k, v in batch.items()}
        return batches

    # --- checkpoints ---------------------------------------------------------------------
    def save_checkpoint(self) -> Path | None:
        path = checkpoint.checkpoint_path(self.run_dir, self.progress.global_step)
        payload = {"engine": self.engine.state_dict(), "epoch": self.progress.epoch,
                   "global_step": self.progress.global_step, "rng": checkpoint.rng_state(),
                   "config": OmegaConf.to_container(self.cfg, resolve=True),
                   "mlflow_run_id": self.tracker.run_id}
        if self.rank == 0:   # one writer; the others wait so nobody races ahead of the file
            checkpoint.save_atomic(payload, path)
        dist.barrier()
        return path

    def resume(self) -> bool:
        """Load the run folder's latest checkpoint, if any. True when it resumed."""
        path = checkpoint.latest_checkpoint(self.run_dir)
        if path is None or not self.cfg.run.resume:
            return False
        state = checkpoint.load(path, map_location=self.engine.device)
        self.engine.load_state_dict(state["engine"])
        checkpoint.restore_rng_state(state["rng"])
        self.progress = Progress(epoch=state["epoch"], global_step=state["global_step"])
        log.info("resumed from %s (epoch %d, step %d)", path, self.progress.epoch,
                 self.progress.global_step)
        return True

    # --- loop ----------------------------------------------------------------------------
    def fit(self) -> Progress:
        epochs = self.cfg.train.epochs
        while self.progress.epoch < epochs:
            epoch = self.progress.epoch
            self._set_epoch(epoch)
            self.method.on_epoch_start(epoch, self.encode_batches())
            train_means = self._train_epoch(epoch)
            val_means = self.validate()
            self.progress.epoch += 1
            metrics = {f"epoch/train_{k}": v for k, v in train_means.items()}
            metrics.update({f"epoch/val_{k}": v for k, v in val_means.items()})
            metrics["epoch/epoch"] = epoch
            self.tracker.log_metrics(metrics, step=self.progress.global_step)
            self.save_checkpoint()
            if self.rank == 0:
                summary = " ".join(f"{k.split('/')[-1]}={v:.4f}" for k, v in metrics.items()
                                   if k.endswith("loss"))
                log.info("epoch %d/%d done: %s", epoch + 1, epochs, summary)
        return self.progress

    def _train_epoch(self, epoch: int) -> dict[str, float]:
        sums: dict[str, float] = {}
        bar = tqdm(total=self.steps_per_epoch, desc=f"epoch {epoch + 1}/{self.cfg.train.epochs}",
                   disable=self.rank != 0, unit="step", dynamic_ncols=True, leave=False)
        iterator = iter(self.train_loader)
        data_wait = 0.0
        epoch_start = time.perf_counter()
        for step_in_epoch in range(self.steps_per_epoch):
            fetch_start = time.perf_counter()
            batch = next(iterator)
            step_start = time.perf_counter()
            data_wait += step_start - fetch_start
            self.method.set_progress(epoch, step_in_epoch, self.steps_per_epoch)
            where = f"epoch {epoch}, step {step_in_epoch} (global step {self.progress.global_step})"
            try:
                losses = self.engine.train_step(batch, where)
            except NonFiniteLossError as exc:
                last = checkpoint.latest_checkpoint(self.run_dir)
                raise NonFiniteLossError(
                    f"{exc}; stopped without updating the parameters. The last good checkpoint "
                    f"is {last or 'none (no epoch completed)'}; lower train.lr or check the "
                    f"data, then rerun to resume") from None
            self.progress.global_step += 1
            values = {k: float(v) for k, v in losses.items()}
            for key, value in values.items():
                sums[key] = sums.get(key, 0.0) + value
            elapsed = time.perf_counter() - epoch_start
            done = step_in_epoch + 1
            samples_per_s = done * self.batch_per_rank * self.world / max(elapsed, 1e-9)
            bar.set_postfix(loss=f"{values['loss']:.4f}", samples_s=f"{samples_per_s:.1f}")
            bar.update(1)
            if done % self.cfg.train.log_every_steps == 0 or done == self.steps_per_epoch:
                metrics = {f"train/{k}": v for k, v in values.items()}
                metrics.update({f"schedule/{k}": v for k, v in self.method.scalars().items()})
                metrics["schedule/lr"] = self.engine.lr
                metrics["throughput/samples_per_s"] = samples_per_s
                metrics["throughput/samples_per_s_per_rank"] = samples_per_s / self.world
                metrics["throughput/data_wait_share"] = data_wait / max(elapsed, 1e-9)
                self.tracker.log_metrics(metrics, step=self.progress.global_step)
        bar.close()
        return {k: v / self.steps_per_epoch for k, v in sums.items()}

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
