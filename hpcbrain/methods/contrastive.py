"""The contrastive methods: AdapN and its baselines as `Method`s, one per loss.

Registered names (losses in `hpcbrain.methods.contrastive_losses`): ``adapn``, ``exponential``,
``threshold``, ``yaware``, ``rnc``, ``simclr``, ``nnclr``.

A training step on a batch of scans {x [B,1,S,S,S], age [B], index [B]}:

1. two views of every scan, drawn from ``contrastive.augment`` with a generator seeded by
   (train.seed, epoch, scan index): deterministic, resumable, independent of the DataLoader
   workers (``data.augment``, applied by the dataset once per scan, is shared by both views);
2. encoder (``model.backbone``: 3D ResNet-18, or the LSOR encoder) → projection head
   (feature_dim → hidden → ``model.projection_dim``, L2-normalised) on the 2B views;
3. the loss on the GLOBAL batch: projections are all-gathered with gradients
   (`hpcbrain.dist.all_gather_with_grad`), labels/scan ids with a plain gather; each rank
   computes the per-anchor terms of its OWN anchors against all N samples; AdapN's neighbour
   sets and its NN_nb schedule are those of the global batch (`global_batch_loss`).

Scaling: rank r returns world/N · Σ_{own anchors} l_i. Its mean over ranks is the global mean
loss (what the trainer logs); the gather's backward sums every rank's gradient into the slice's
owner, so rank r's parameter gradient is world · (its samples' share of ∂L/∂θ), and DDP's
average over ranks gives exactly ∂L/∂θ of one process on the concatenated batch.

AdapN's neighbourhood counts scans: NN_nb(epoch) = `nn_schedule(epoch, train.epochs, global
scans in the batch, nn_final, nn_step)`; with two views per scan an anchor keeps its
2·NN_nb − 1 nearest other samples (the official code's top-(2·NN_nb) including the anchor).
"""
from __future__ import annotations

import logging
from typing import Any, Callable, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from hpcbrain import dist
from hpcbrain.config import MethodSections
from hpcbrain.data.transforms import build_augmentation
from hpcbrain.methods import contrastive_losses as losses
from hpcbrain.methods.base import Method, TrainingSetSize, register_method
from hpcbrain.models.autoencoder import LSOREncoder
from hpcbrain.models.heads import FEATURE_MODES, FeatureExtractor, ProjectionHead
from hpcbrain.models.resnet3d import build_resnet3d

log = logging.getLogger(__name__)

__all__ = ["ContrastiveMethod", "global_batch_loss", "nn_schedule", "gather_rows", "build_backbone",
           "view_generator", "CONTRASTIVE_METHODS"]

CONTRASTIVE_METHODS = losses.LOSSES
N_VIEWS = 2
_VIEW_STREAM = 0x7669657773   # "views": keeps view draws apart from data.augment's draws


def gather_rows(t: Tensor) -> Tensor:
    """Rank-ordered concatenation of every rank's rows, without an autograd graph (a plain
    all-gather; per-rank row counts may differ). The identity without a process group."""
    if dist.world_size() == 1:
        return t
    return dist.all_gather_with_grad(t.detach())


def global_batch_loss(loss_sum: Callable[[Tensor, Tensor, Tensor], Tensor], z: Tensor,
                      labels: Tensor) -> Tensor:
    """Run a contrastive loss on the global batch and return this rank's share.

    z [n, ...] this rank's embeddings (gathered WITH gradients), labels [n, ...] its labels
    (gathered without). ``loss_sum(z_all, labels_all, anchors)`` must return Σ l_i over the
    anchor rows ``anchors`` of the gathered batch (every other quantity over all N rows).
    Returns world/N · Σ_{own} l_i: the mean over ranks of the returned values is the global
    mean loss, and DDP-averaged gradients equal one process's on the concatenated batch.
    Every rank must call it (it runs collectives).
    """
    world = dist.world_size()
    if world == 1:
        anchors = torch.arange(z.shape[0], device=z.device)
        return loss_sum(z, labels, anchors) / z.shape[0]
    me = dist.rank()
    owner = torch.full((z.shape[0],), float(me), dtype=torch.float64, device=z.device)
    z_all = dist.all_gather_with_grad(z)
    meta = gather_rows(torch.cat([owner.reshape(-1, 1),
                                  labels.detach().to(torch.float64).reshape(z.shape[0], -1)], 1))
    start = int((meta[:, 0] < me).sum())
    anchors = torch.arange(start, start + z.shape[0], device=z.device)
    labels_all = meta[:, 1:].to(labels.dtype).reshape(-1, *labels.shape[1:])
    return loss_sum(z_all, labels_all, anchors) * (world / z_all.shape[0])


def nn_schedule(epoch: int, max_epochs: int, batch_size: int, nn_final: int,
                step_size: int) -> int:
    """NN_nb(epoch), the paper's Algorithm 1 with ``epoch`` counted from 0.

        steps_completed = ⌊epoch / step_size⌋
        total_steps     = ⌊max_epochs / step_size⌋
        decrement       = (batch_size − nn_final) / (total_steps − 1)
        NN_nb           = max(int(batch_size − decrement · steps_completed), nn_final)

    Epoch 0 gives ``batch_size``; the result is truncated to int and never below ``nn_final``.
    Never divides by zero: ``step_size <= 0`` means no schedule (the whole batch, as the
    official code's step size 0), and ``total_steps − 1`` is taken as at least 1 (with fewer
    than two steps the first step holds the batch size and every later one ``nn_final``).
    """
    epoch, max_epochs = int(epoch), int(max_epochs)
    batch_size, nn_final, step_size = int(batch_size), int(nn_final), int(step_size)
    if step_size <= 0:
        return max(batch_size, nn_final)
    steps_completed = max(epoch, 0) // step_size
    total_steps = max_epochs // step_size
    decrement = (batch_size - nn_final) / float(max(total_steps - 1, 1))
    return max(int(batch_size - (decrement * steps_completed)), nn_final)


def view_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """The generator the two views of scan `index` are drawn from in `epoch`."""
    state = np.random.SeedSequence([int(seed), int(epoch), int(index), _VIEW_STREAM]) \
        .generate_state(1, dtype=np.uint64)
    return torch.Generator().manual_seed(int(state[0]))


def build_backbone(model: Any, input_size: int | tuple[int, int, int]) -> tuple[nn.Module, int]:
    """(encoder, feature_dim) from the `model` section's backbone: resnet18 | resnet34 | lsor."""
    name = str(model.backbone)
    if name == "lsor":
        encoder = LSOREncoder([int(w) for w in model.widths], input_size)
        return encoder, int(encoder.latent_dim)
    if name.startswith("resnet"):
        encoder = build_resnet3d(name, int(model.resnet_width))
        return encoder, int(encoder.feature_dim)
    raise ValueError(f"model.backbone must be resnet18, resnet34 or lsor, not {name!r}")


class ContrastiveMethod(Method):
    """Encoder + projection head trained with one loss of the AdapN family (see module doc).

    State: the networks; NNCLR adds its support queue (buffers ``queue``, ``queue_ptr``,
    ``queue_filled``), identical on every rank (every rank enqueues the global batch).
    """

    batch_kind = "scans"
    config_section = "contrastive"
    loss_name: ClassVar[str] = ""
    #: the job evaluates these with ridge regression on frozen features (evaluate/ridge.py)
    ridge_evaluation: ClassVar[bool] = True
    learns_from_age: ClassVar[bool] = True          # the kernels weight pairs by age distance
    fp32_buffers: ClassVar[tuple[str, ...]] = ("queue",)

    def __init__(self, sections: MethodSections) -> None:
        super().__init__()
        if self.loss_name not in losses.LOSSES:
            raise TypeError(f"{type(self).__name__}: unknown loss {self.loss_name!r}")
        c = sections.own
        self.epochs = sections.epochs
        self.seed = sections.seed
        self.temperature = float(c.temperature)
        self.kernel = str(c.kernel)
        self.sigma = float(c.sigma)
        self.distance = str(c.distance)
        self.nn_final = int(c.nn_final)
        self.nn_step = int(c.nn_step)
        self.far_lambda = None if c.far_lambda is None else float(c.far_lambda)
        self.max_shift = bool(c.max_shift)
        self.weight_norm = str(c.weight_norm)
        self.nn_epoch_base = int(c.nn_epoch_base)
        self.nn_min_batch = int(c.nn_min_batch)
        self.loss_scale = 1.0 if c.base_temperature is None else \
            self.temperature / float(c.base_temperature)
        self.rnc_similarity = str(c.rnc_similarity)
        # official RnC: the loss sees the encoder's features and the head gets no gradient
        # (DDP must then expect unused parameters)
        self.loss_on_backbone = self.loss_name == "rnc" and str(c.rnc_features) == "backbone"
        self.find_unused_parameters = self.loss_on_backbone
        self.nnclr_exclude_self = bool(c.nnclr_exclude_self)
        if self.weight_norm not in losses.WEIGHT_NORMS:
            raise ValueError(f"contrastive.weight_norm must be one of {losses.WEIGHT_NORMS}, "
                             f"not {self.weight_norm!r}")
        if self.nn_epoch_base not in (0, 1):
            raise ValueError(f"contrastive.nn_epoch_base must be 0 or 1, got {self.nn_epoch_base}")
        if not self.loss_scale > 0:
            raise ValueError(f"contrastive.base_temperature must be > 0, got {c.base_temperature}")
        if self.rnc_similarity not in losses.RNC_SIMILARITIES:
            raise ValueError(f"contrastive.rnc_similarity must be one of "
                             f"{losses.RNC_SIMILARITIES}, not {self.rnc_similarity!r}")
        if str(c.rnc_features) not in ("projection", "backbone"):
            raise ValueError(f"contrastive.rnc_features must be projection or backbone, "
                             f"not {c.rnc_features!r}")
        if self.kernel not in losses.KERNELS:
            raise ValueError(f"contrastive.kernel must be one of {losses.KERNELS}, not {self.kernel!r}")
        if self.distance not in losses.DISTANCES:
            raise ValueError(f"contrastive.distance must be one of {losses.DISTANCES}, "
                             f"not {self.distance!r}")
        if not (self.temperature > 0 and self.sigma > 0):
            raise ValueError("contrastive.temperature and contrastive.sigma must be > 0")
        if self.nn_final < 1:
            raise ValueError(f"contrastive.nn_final must be >= 1, got {self.nn_final}")
        self.features = str(sections.model.features)
        if self.features not in FEATURE_MODES:
            raise ValueError(f"model.features must be one of {FEATURE_MODES}, not {self.features!r}")
        self.backbone, self.feature_dim = build_backbone(sections.model, sections.input_size)
        self.head = ProjectionHead(self.feature_dim, sections.model.projection_hidden,
                                   int(sections.model.projection_dim))
        self.view_transform = build_augmentation(c.augment)
        self._nn_nb = 0
        if self.loss_name == "nnclr":
            size = int(c.nnclr_queue)
            if size < 1:
                raise ValueError(f"contrastive.nnclr_queue must be >= 1, got {size}")
            self.register_buffer("queue", torch.zeros(size, self.head.out_dim))
            # scan id of each queued projection (−1: empty), so the anchor's own scan is skipped
            self.register_buffer("queue_ids", torch.full((size,), -1, dtype=torch.long))
            self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
            self.register_buffer("queue_filled", torch.zeros((), dtype=torch.long))

    # --- interface ------------------------------------------------------------------------------
    def encoder(self) -> nn.Module:
        """Volumes → evaluation features (after the projection, or before: model.features)."""
        return FeatureExtractor(self.backbone, self.head if self.features == "projection" else None)

    def scalars(self) -> dict[str, float]:
        return {"nn_nb": float(self._nn_nb)} if self.loss_name == "adapn" else {}

    def nn_nb_at(self, epoch: int, scans_in_batch: int) -> int:
        """NN_nb (in scans) for a global batch of `scans_in_batch` scans (epoch from 0).

        Algorithm 1 at epoch + ``nn_epoch_base`` (the official loop counts from 1, so its first
        epoch already shrinks the neighbourhood); the whole batch (= Exponential) when the batch
        holds fewer than ``nn_min_batch`` scans (the official code's gate at 32)."""
        if scans_in_batch < self.nn_min_batch:
            return scans_in_batch
        return nn_schedule(epoch + self.nn_epoch_base, self.epochs, scans_in_batch,
                                  self.nn_final, self.nn_step)

    def forward(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        ref = next(self.head.parameters())
        x = batch["x"].to(device=ref.device, dtype=ref.dtype, non_blocking=True)
        b = x.shape[0]
        index = batch.get("index")
        index = (torch.arange(b) if index is None else torch.as_tensor(index)).reshape(-1)
        age = torch.as_tensor(batch["age"]).to(device=ref.device, dtype=torch.float32).reshape(-1)
        views = self.make_views(x, index)                            # [2B, 1, S, S, S]
        features = self.backbone(views)
        if self.loss_on_backbone:
            z = features.float()                                    # official RnC: encoder features
        else:
            z = self.head(features).float()                         # [2B, d], unit rows
        # the loss in fp32 even inside a bf16 autocast region (similarities, distances, exps)
        with torch.autocast(device_type=z.device.type, enabled=False):
            ids = index.to(device=z.device, dtype=torch.float64)
            if self.loss_name == "nnclr":
                loss = self._nnclr(z[:b], z[b:], ids)
            else:
                labels = torch.stack([torch.cat([age, age]).double(), torch.cat([ids, ids])], 1)
                loss = global_batch_loss(self._loss_sum, z, labels)
        return {"loss": self.loss_scale * loss}

    # --- views ----------------------------------------------------------------------------------
    def make_views(self, x: Tensor, index: Tensor) -> Tensor:
        """[B,1,S,S,S] → [2B,1,S,S,S]: all first views, then all second views."""
        if self.view_transform is None:
            return torch.cat([x, x], dim=0)
        # draws on the CPU, per scan from its own generator (first view, then second); the
        # volumes are augmented where they are, the whole 2B batch at once
        first, second = [], []
        for scan in index.tolist():
            generator = view_generator(self.seed, self.epoch, int(scan))
            first.append(self.view_transform.sample(x.shape[1:], generator))
            second.append(self.view_transform.sample(x.shape[1:], generator))
        return self.view_transform.apply_batch(torch.cat([x, x], dim=0), first + second)

    # --- losses -----------------------------------------------------------------------------------
    def _loss_sum(self, z: Tensor, labels: Tensor, anchors: Tensor) -> Tensor:
        """Σ l_i over `anchors` of the gathered batch (z [N, d], labels [N, 2] = age, scan id)."""
        y, ids = labels[:, 0], labels[:, 1]
        common = dict(temperature=self.temperature, anchors=anchors, reduction="sum")
        weighted = dict(sigma=self.sigma, kernel=self.kernel, weight_norm=self.weight_norm)
        name = self.loss_name
        if name != "simclr" and not bool(torch.isfinite(y).all()):
            # checked on the gathered labels: every rank raises alike, none waits for the others
            raise ValueError(f"{name}: every scan of a batch needs a finite age "
                             f"(got {y.tolist()})")
        if name == "adapn":
            scans = z.shape[0] // N_VIEWS
            self._nn_nb = self.nn_nb_at(self.epoch, scans)
            neighbours = min(max(N_VIEWS * self._nn_nb - 1, 1), z.shape[0] - 1)
            return losses.adapn_loss(z, y, neighbours, distance=self.distance,
                                     far_lambda=self.far_lambda, max_shift=self.max_shift,
                                     **weighted, **common)
        if name == "exponential":
            return losses.exponential_loss(z, y, max_shift=self.max_shift, **weighted, **common)
        if name == "threshold":
            return losses.threshold_loss(z, y, **weighted, **common)
        if name == "yaware":
            return losses.yaware_loss(z, y, **weighted, **common)
        if name == "rnc":
            return losses.rnc_loss(z, y, similarity=self.rnc_similarity, **common)
        if name == "simclr":
            return losses.simclr_loss(z, ids, **common)
        raise AssertionError(name)

    def _nnclr(self, z1: Tensor, z2: Tensor, ids: Tensor) -> Tensor:
        filled = int(self.queue_filled)
        support = self.queue[:filled] if filled else None
        support_ids = self.queue_ids[:filled] if filled and self.nnclr_exclude_self else None
        d = z1.shape[1]

        def loss_sum(z_all: Tensor, labels_all: Tensor, anchors: Tensor) -> Tensor:
            return losses.nnclr_loss(z_all[:, :d], z_all[:, d:], support,
                                     temperature=self.temperature, support_ids=support_ids,
                                     ids=labels_all.reshape(-1).long(), anchors=anchors,
                                     reduction="sum")

        both = torch.cat([z1, z2], dim=1)
        loss = global_batch_loss(loss_sum, both, ids.reshape(-1, 1))
        if self.training:
            self._enqueue(gather_rows(z1), gather_rows(ids.reshape(-1, 1)).reshape(-1))
        return loss

    @torch.no_grad()
    def _enqueue(self, rows: Tensor, ids: Tensor) -> None:
        """FIFO ring of the global batch's view-1 projections and their scan ids (the same on
        every rank)."""
        size = self.queue.shape[0]
        rows = rows.detach().to(self.queue.dtype)[-size:]
        ids = ids.detach().to(device=self.queue_ids.device, dtype=torch.long)[-size:]
        ptr = int(self.queue_ptr)
        positions = (ptr + torch.arange(rows.shape[0], device=self.queue.device)) % size
        self.queue[positions] = rows
        self.queue_ids[positions] = ids
        self.queue_ptr.fill_((ptr + rows.shape[0]) % size)
        self.queue_filled.fill_(min(int(self.queue_filled) + rows.shape[0], size))


@register_method("adapn")
class AdapN(ContrastiveMethod):
    """AdapN: contrastive regression with adaptive neighbourhoods (Träuble et al. 2024)."""
    loss_name = "adapn"


@register_method("exponential")
class Exponential(ContrastiveMethod):
    """Exponential contrastive regression (Barbano et al. 2023)."""
    loss_name = "exponential"


@register_method("threshold")
class Threshold(ContrastiveMethod):
    """Threshold contrastive regression (Barbano et al. 2023)."""
    loss_name = "threshold"


@register_method("yaware")
class YAware(ContrastiveMethod):
    """Y-Aware contrastive learning (Dufumier et al. 2021)."""
    loss_name = "yaware"


@register_method("rnc")
class RankNContrast(ContrastiveMethod):
    """Rank-N-Contrast (Zha et al. 2023)."""
    loss_name = "rnc"


@register_method("simclr")
class SimCLR(ContrastiveMethod):
    """SimCLR: NT-Xent over the two views of every scan (Chen et al. 2020)."""
    loss_name = "simclr"
    learns_from_age = False


@register_method("nnclr")
class NNCLR(ContrastiveMethod):
    """NNCLR: nearest-neighbour positives from a support queue (Dwibedi et al. 2021)."""
    loss_name = "nnclr"
    learns_from_age = False

    @classmethod
    def resolve_config(cls, own: Any, training: TrainingSetSize) -> None:
        """A support queue larger than the training set holds stale copies of the same scans
        (the audit: 1,024 slots for ~114 scans), so it is capped at the training set."""
        if int(own.nnclr_queue) > training.items:
            log.info("contrastive.nnclr_queue %d capped at the %d training scans",
                     int(own.nnclr_queue), training.items)
            own.nnclr_queue = int(training.items)
