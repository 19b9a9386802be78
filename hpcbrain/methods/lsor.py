"""LSOR (Ouyang et al., MICCAI 2023) as a `Method`: the autoencoder, the SOM phase's schedule,
the k-means initialisation across ranks, SOM health and the files its encoder carries.

Schedule: ``warmup_epochs`` reconstruction-only epochs (on z; G/ΔG untouched), then at the start
of the SOM phase a k-means of the latents of all training scans initialises G and ΔG
(`initialise_som`: gathered to rank 0, computed there, broadcast), then all losses with τ
decaying geometrically from τmax to τmin over the SOM phase's steps. The mathematics (losses,
EMA, grid, initialisation) is `hpcbrain.methods.som`; paper-vs-official-code decisions are in
docs/lsor-decisions.md.
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hpcbrain import dist
from hpcbrain.config import MethodSections
from hpcbrain.methods.base import Method, TrainingSetSize, register_method
from hpcbrain.methods.som import (
    centre_update,
    ema_update,
    lsor_losses,
    similarity_grid,
    som_health,
    som_health_sums,
    squared_distances,
    tau_at,
)
from hpcbrain.methods.som_init import init_reference_trajectories, kmeans_grid_init, pca_grid_init
from hpcbrain.models.autoencoder import ConvAutoencoder

__all__ = ["LSOR", "batch_norm_mode", "SOM_FILE"]

log = logging.getLogger(__name__)

#: Optional keys of a pair batch holding global scan indices of x_u / x_v; when present the SOM
#: initialisation de-duplicates scans (k-means sees each scan once) and pairs.
SCAN_INDEX_KEYS = ("index_u", "index_v")


#: The SOM file registered with an LSOR encoder (`LSOR.registry_files`, read by `hpcbrain embed`).
SOM_FILE = "som.npz"


@contextlib.contextmanager
def batch_norm_mode(module: nn.Module, use_batch_statistics: bool):
    """No-grad encoding context: every BatchNorm normalises with its batch's statistics
    (``use_batch_statistics``) or with its running statistics (eval mode); dropout-like layers
    are in eval mode either way. Running statistics and training modes are restored on exit, so
    encoding never changes the model."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [{k: v.clone() for k, v in m.named_buffers(recurse=False)} for m in norms]
    modes = {m: m.training for m in module.modules()}
    module.eval()
    if use_batch_statistics:
        for m in norms:
            m.train()
    try:
        yield
    finally:
        for m, state in zip(norms, saved):
            for key, value in state.items():
                getattr(m, key).copy_(value)
        for m, mode in modes.items():
            m.training = mode



@register_method("lsor")
class LSOR(Method):
    """LSOR as a `Method`: pair batches {x_u, x_v: [B,1,S,S,S], dt: [B] years, (index_u, index_v)}.

    State carried by ``state_dict()``: ``G`` (parameter [K, D], the SOM nodes), ``dG`` (buffer
    [K, D], reference trajectories), ``initialised`` (bool buffer: SOM phase active).
    """

    batch_kind = "pairs"
    config_section = "lsor"
    # G gets no gradient during the recon-only warm-up (DDP: find_unused_parameters=True).
    find_unused_parameters = True
    # The EMAs (reference trajectories, the nodes' latent centre) must not be rounded to bf16
    # by a mixed-precision engine.
    fp32_buffers = ("dG", "latent_centre")
    som_evaluation = True

    def __init__(self, sections: MethodSections) -> None:
        super().__init__()
        self.input_size = sections.input_size
        self.widths = [int(w) for w in sections.model.widths]
        self.epochs = sections.epochs
        self.seed = sections.seed
        c = sections.own
        if "auto" in (c.grid_rows, c.grid_cols):
            raise ValueError("lsor.grid_rows / grid_cols are still 'auto': the training set "
                             "settles them (LSOR.resolve_config) before the method is built; "
                             "give numbers to build it without one")
        self.grid = (int(c.grid_rows), int(c.grid_cols))
        self.warmup_epochs = int(c.warmup_epochs)
        self.lambda_recon = float(c.lambda_recon)
        self.lambda_commit = float(c.lambda_commit)
        self.lambda_som = float(c.lambda_som)
        self.lambda_dir = float(c.lambda_dir)
        self.som_ramp_epochs = float(c.som_ramp_epochs)
        self.centred_nodes = bool(c.centred_nodes)
        self.centre_momentum = float(c.centre_momentum)
        self.tau_max = float(c.tau_max)
        self.tau_min = float(c.tau_min)
        self.ema_alpha = float(c.ema_alpha)
        self.kmeans_max_iter = int(c.kmeans_max_iter)
        self.kmeans_n_init = int(c.kmeans_n_init)
        self.init_bn_mode = str(c.init_bn_mode)
        self.node_lr_scale = float(c.node_lr_scale)
        self.init = str(c.init)
        # ranges and choices (grid ≥ 1, warm-up ≤ epochs, node lr > 0, τmin ≤ τmax, the BN
        # mode, the initialisation) are checked when the config loads (config_checks.py)

        self.net = ConvAutoencoder(self.widths, self.input_size)
        self.latent_dim = self.net.latent_dim
        n_nodes = self.grid[0] * self.grid[1]
        # Random small nodes until the k-means initialisation overwrites them.
        self.G = nn.Parameter(0.05 * torch.randn(n_nodes, self.latent_dim))
        self.register_buffer("dG", torch.zeros(n_nodes, self.latent_dim))
        # lsor.centred_nodes: the nodes are G + latent_centre, an EMA of the training latents'
        # mean (docs/lsor-decisions.md). Without it the centre stays zero and the nodes are G.
        self.register_buffer("latent_centre", torch.zeros(self.latent_dim))
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))
        self._tau = self.tau_max
        self._som_step = 0
        self._som_weight = 1.0
        # (latent mean, G) at the last epoch end, for the drift-vs-node-movement health metric
        self._previous_epoch_state: Optional[tuple[Tensor, Tensor]] = None

    # --- interface ----------------------------------------------------------------------------
    def encoder(self) -> nn.Module:
        return self.net.encoder

    def som_active(self) -> bool:
        return bool(self.initialised.item())

    @property
    def nodes(self) -> Tensor:
        """The SOM nodes in latent space [K, D]: G + latent_centre (= G unless
        ``lsor.centred_nodes``); carries G's gradient."""
        return self.G + self.latent_centre.to(self.G.dtype)

    def set_progress(self, epoch: int, step_in_epoch: int, steps_per_epoch: int) -> None:
        super().set_progress(epoch, step_in_epoch, steps_per_epoch)
        total = self.steps_per_epoch * (self.epochs - self.warmup_epochs)
        step = (self.epoch - self.warmup_epochs) * self.steps_per_epoch + self.step_in_epoch
        self._som_step = max(step, 0)
        self._tau = tau_at(self._som_step, total, self.tau_min, self.tau_max)
        ramp_steps = self.som_ramp_epochs * self.steps_per_epoch
        self._som_weight = 1.0 if ramp_steps <= 0 else min(1.0, (self._som_step + 1) / ramp_steps)

    @property
    def tau(self) -> float:
        return self._tau

    def scalars(self) -> dict[str, float]:
        return {"tau": float(self._tau), "phase": 1.0 if self.som_active() else 0.0,
                "som_weight": float(self._som_weight)}

    @classmethod
    def resolve_config(cls, own: Any, training: TrainingSetSize) -> None:
        """lsor.grid_rows / grid_cols "auto": the grid `som_grid.auto_grid` sizes to the
        training subjects (logged; the resolved numbers go into the run's config, MLflow
        params and the model's som.npz). Explicit numbers stay, with a warning when they leave
        fewer subjects a node than the rule's minimum."""
        from hpcbrain.methods.som_grid import MIN_SUBJECTS_PER_NODE, auto_grid, subjects_per_node

        if own.grid_rows == "auto" and own.grid_cols == "auto":
            own.grid_rows, own.grid_cols = auto_grid(training.subjects)
            log.info("lsor grid auto: %d × %d for %d training subjects (%.1f a node)",
                     own.grid_rows, own.grid_cols, training.subjects,
                     subjects_per_node(training.subjects, (own.grid_rows, own.grid_cols)))
            return
        grid = (int(own.grid_rows), int(own.grid_cols))
        per_node = subjects_per_node(training.subjects, grid)
        if per_node < MIN_SUBJECTS_PER_NODE:
            suggested = auto_grid(training.subjects)
            log.warning("lsor grid %d × %d leaves %.1f training subjects a node (fewer than "
                        "%.1f): a node's mean age then carries its few subjects' brain-age "
                        "gaps and the grid orders age poorly (docs/lsor-decisions.md, "
                        "\"Subjects per node\"); lsor.grid_rows=auto lsor.grid_cols=auto "
                        "would give %d × %d", *grid, per_node, MIN_SUBJECTS_PER_NODE,
                        *suggested)

    def on_epoch_start(self, epoch: int, encode_batches: Callable[[], Iterable[dict]]) -> None:
        super().on_epoch_start(epoch, encode_batches)
        # ">=" also covers a resume after the transition epoch from a pre-init checkpoint; a
        # checkpoint taken after init carries initialised=True and never re-runs k-means.
        if epoch >= self.warmup_epochs and not self.som_active():
            self.initialise_som(encode_batches)

    @torch.no_grad()
    def on_epoch_end(self, epoch: int, encode_batches: Callable[[], Iterable[dict]]) -> dict[str, float]:
        """SOM health over the training scans, encoded as evaluation and `hpcbrain embed` see
        them (running BatchNorm statistics): occupied nodes, quantisation and topographic
        error, and how far the latent cloud moved this epoch against how far the nodes moved.
        Scans are taken as the pair batches hold them (a scan in several pairs counts once per
        pair). A collective when a process group is up (one all-reduce)."""
        n_nodes = self.grid[0] * self.grid[1]
        with batch_norm_mode(self, use_batch_statistics=False):
            sums = None
            for batch in encode_batches():
                x_u, x_v, _ = self._unpack(batch)
                z = self.net.encoder(torch.cat([x_u, x_v], dim=0))
                part = som_health_sums(z, self.nodes.detach(), self.grid)
                sums = part if sums is None else sums + part
        if sums is None:
            sums = torch.zeros(n_nodes + self.latent_dim + 4, dtype=torch.float64,
                               device=self.G.device)
        sums = dist.all_reduce_sum(sums)
        health = som_health(sums, n_nodes)
        nodes = self.nodes.detach().to(torch.float64)
        metrics = {"latent_spread": health["latent_spread"]}
        previous = self._previous_epoch_state
        if previous is not None:
            metrics["latent_drift"] = float((health["latent_mean"] - previous[0]).norm())
            metrics["node_movement"] = float((nodes - previous[1]).norm(dim=1).mean())
        self._previous_epoch_state = (health["latent_mean"], nodes.clone())
        if self.som_active():
            # "train_": the final evaluation logs som/occupied_nodes over every scan of the
            # store at the last step; one key must not carry two values at one step
            metrics.update(train_occupied_nodes=float(health["occupied_nodes"]),
                           quantisation_error=health["quantisation_error"],
                           topographic_error=health["topographic_error"],
                           centroid_gap=float((nodes.mean(0) - health["latent_mean"]).norm()))
            # While τ is broad (first half of the SOM phase) the whole grid is pulled towards
            # the latents' mean and occupancy may dip; it should recover as τ shrinks.
            late = epoch + 1 - self.warmup_epochs >= (self.epochs - self.warmup_epochs) / 2
            if late and health["occupied_nodes"] < n_nodes / 2:
                log.warning(
                    "SOM health after epoch %d: only %d of %d nodes are any training scan's "
                    "best-matching node (latents moved %.3g, nodes %.3g this epoch; τ %.3g). "
                    "The grid is collapsing: train without augmentation (data.augment.flip=false "
                    "data.augment.rotation_deg=0 data.augment.translation_vox=0), keep "
                    "lsor.init_bn_mode=batch, and let the nodes keep up: the paper has ~1,900 "
                    "SOM steps, so with fewer raise lsor.node_lr_scale (the demo: 10) or give "
                    "the SOM phase more steps; see docs/lsor-decisions.md",
                    epoch + 1, health["occupied_nodes"], n_nodes,
                    metrics.get("latent_drift", float("nan")),
                    metrics.get("node_movement", float("nan")), self._tau)
        return {f"som/{key}": value for key, value in metrics.items()}

    def forward(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        return self._losses(batch, update_ema=self.training)

    @torch.no_grad()
    def validation_step(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        was_training = self.training
        self.eval()  # BatchNorm running stats must not move either
        try:
            return self._losses(batch, update_ema=False)
        finally:
            self.train(was_training)

    def parameter_groups(self) -> list[dict[str, Any]]:
        """The SOM nodes G at ``lsor.node_lr_scale`` × train.lr, everything else at train.lr
        (docs/lsor-decisions.md: Adam moves a node by about lr per coordinate and step)."""
        others = [p for name, p in self.named_parameters() if name != "G"]
        return [{"params": others, "lr_scale": 1.0},
                {"params": [self.G], "lr_scale": self.node_lr_scale}]

    def registry_files(self, folder: Path) -> list[Path]:
        """``som.npz`` (G, ΔG, grid shape) beside the registered encoder: `hpcbrain embed` reads it
        to give each scan its best-matching node and similarity grid."""
        path = Path(folder) / SOM_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, nodes=self.nodes.detach().to("cpu", torch.float32).numpy(),
                 trajectories=self.dG.detach().to("cpu", torch.float32).numpy(),
                 grid=np.array(self.grid, dtype=np.int64))
        return [path]

    # --- evaluation helpers ---------------------------------------------------------------------
    @torch.no_grad()
    def bmu(self, z: Tensor) -> Tensor:
        """Row-major index [B] of the nearest SOM node of each latent."""
        nodes = self.nodes.detach()
        return squared_distances(z.to(nodes), nodes).argmin(dim=1)

    @torch.no_grad()
    def similarity(self, z: Tensor) -> Tensor:
        """Similarity grid [B, K] (`similarity_grid` against the nodes); reshape to (Nr, Nc)
        row-major."""
        nodes = self.nodes.detach()
        return similarity_grid(z.to(nodes), nodes)

    # --- internals --------------------------------------------------------------------------------
    def _unpack(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor]:
        ref = next(self.net.encoder.parameters())
        x_u = batch["x_u"].to(device=ref.device, dtype=ref.dtype, non_blocking=True)
        x_v = batch["x_v"].to(device=ref.device, dtype=ref.dtype, non_blocking=True)
        dt = torch.as_tensor(batch["dt"]).to(device=ref.device, dtype=torch.float32).reshape(-1)
        if x_u.shape[0] != x_v.shape[0] or dt.shape[0] != x_u.shape[0]:
            raise ValueError(f"pair batch sizes differ: x_u {x_u.shape[0]}, x_v {x_v.shape[0]}, "
                             f"dt {dt.shape[0]}")
        return x_u, x_v, dt

    def _losses(self, batch: dict[str, Any], update_ema: bool) -> dict[str, Tensor]:
        x_u, x_v, dt = self._unpack(batch)
        n = x_u.shape[0]
        z = self.net.encoder(torch.cat([x_u, x_v], dim=0))
        if not self.som_active():
            # Warm-up: reconstruction from z only; G and ΔG are not touched.
            recon = F.mse_loss(self.net.decoder(z), torch.cat([x_u, x_v], dim=0))
            zero = torch.zeros((), device=recon.device, dtype=recon.dtype)
            return {"loss": self.lambda_recon * recon, "recon": recon.detach(),
                    "commit": zero, "som": zero.clone(), "dir": zero.clone()}
        parts = lsor_losses(x_u, x_v, z[:n], z[n:], dt, self.net.decoder, self.nodes, self.dG,
                            self._tau, self.grid)
        # lsor.som_ramp_epochs: the SOM losses come in linearly instead of all at once
        ramp = self._som_weight
        loss = (self.lambda_recon * parts["recon"] + ramp * (
            self.lambda_commit * parts["commit"] + self.lambda_som * parts["som"]
            + self.lambda_dir * parts["dir"]))
        if update_ema:
            with torch.no_grad():
                self.dG.copy_(ema_update(self.dG, parts["dz"].detach(), parts["bmu_u"], self.ema_alpha))
                if self.centred_nodes:
                    # the loss above used the centre before this step; the next step sees it moved
                    self.latent_centre.copy_(centre_update(self.latent_centre, z,
                                                           self.centre_momentum))
        out = {"loss": loss}
        for key in ("recon", "commit", "som", "dir"):
            out[key] = parts[key].detach()
        return out

    @torch.no_grad()
    def _collect_rows(self, encode_batches: Callable[[], Iterable[dict]]) -> Tensor:
        """Rows [n, 2D+3] = [z_u | z_v | dt | index_u | index_v] (float32, so scan indices are exact
        below 2**24; −1 when the batch has no index keys)."""
        rows = []
        device = self.G.device
        for batch in encode_batches():
            x_u, x_v, dt = self._unpack(batch)
            n = x_u.shape[0]
            z = self.net.encoder(torch.cat([x_u, x_v], dim=0)).to(torch.float32)
            idx = []
            for key in SCAN_INDEX_KEYS:
                if key in batch:
                    idx.append(torch.as_tensor(batch[key]).to(device=device, dtype=torch.float32)
                               .reshape(-1, 1))
                else:
                    idx.append(torch.full((n, 1), -1.0, device=device))
            rows.append(torch.cat([z[:n], z[n:], dt.reshape(-1, 1), *idx], dim=1))
        if not rows:
            return torch.zeros(0, 2 * self.latent_dim + 3, device=device)
        return torch.cat(rows, dim=0)

    def _init_from_rows(self, rows: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Nodes, ΔG and the latent centre (the scans' mean; zero unless
        ``lsor.centred_nodes``) from the gathered rows (runs on one process)."""
        rows = rows.detach().to("cpu", torch.float64)
        d = self.latent_dim
        if rows.shape[0] == 0:
            raise ValueError("LSOR SOM initialisation: encode_batches() yielded no pairs")
        z_u, z_v, dt = rows[:, :d], rows[:, d:2 * d], rows[:, 2 * d]
        idx_u, idx_v = rows[:, 2 * d + 1].numpy(), rows[:, 2 * d + 2].numpy()
        if (idx_u >= 0).all() and (idx_v >= 0).all():
            # each scan once for k-means; each (u, v) pair once for ΔG (samplers may repeat)
            _, first = np.unique(np.concatenate([idx_u, idx_v]), return_index=True)
            scans = torch.cat([z_u, z_v], dim=0)[torch.from_numpy(np.sort(first))]
            _, pfirst = np.unique(np.stack([idx_u, idx_v], axis=1), axis=0, return_index=True)
            keep = torch.from_numpy(np.sort(pfirst))
            z_u, z_v, dt = z_u[keep], z_v[keep], dt[keep]
        else:
            scans = torch.cat([z_u, z_v], dim=0)
        dz = (z_v - z_u) / dt.unsqueeze(1)
        if self.init == "pca":
            G = pca_grid_init(scans, self.grid)
        elif self.init == "longitudinal":
            G = pca_grid_init(scans, self.grid, first_axis=dz.mean(0))
        else:
            G = kmeans_grid_init(scans, self.grid, seed=self.seed, max_iter=self.kmeans_max_iter,
                                 n_init=self.kmeans_n_init)
        dG = init_reference_trajectories(z_u, dz, G)
        centre = scans.mean(0) if self.centred_nodes else torch.zeros_like(scans[0])
        return G, dG, centre.unsqueeze(0)

    def initialise_som(self, encode_batches: Callable[[], Iterable[dict]]) -> None:
        """Encode all training pairs (no grad), k-means → G, ΔG; identical on every rank
        (gathered to rank 0, computed there, broadcast). Sets ``initialised``.

        ``lsor.init_bn_mode``: "batch" (default, as the official code) encodes with BatchNorm's
        batch statistics -- the latents the SOM phase's training steps see, which differ from
        the running-statistics latents by 74 % of their spread at this point -- without moving
        the running statistics; "running" encodes in eval mode."""
        with batch_norm_mode(self, use_batch_statistics=self.init_bn_mode == "batch"):
            rows = self._collect_rows(encode_batches)
        n_nodes = self.grid[0] * self.grid[1]
        gathered = dist.gather_rows_to_rank0(rows.to(self.G.device))

        def on_rank0() -> Tensor:
            return torch.cat(self._init_from_rows(gathered), dim=0)

        like = torch.zeros(2 * n_nodes + 1, self.latent_dim, dtype=torch.float32,
                           device=self.G.device)
        packed = dist.compute_on_rank0(on_rank0, like)
        nodes, dG, centre = packed[:n_nodes], packed[n_nodes:2 * n_nodes], packed[2 * n_nodes]
        self._assign_som(nodes, dG, centre)

    @torch.no_grad()
    def _assign_som(self, nodes: Tensor, dG: Tensor, centre: Optional[Tensor] = None) -> None:
        """Nodes [K, D] in latent space, ΔG [K, D], the latent centre [D] (None: zero)."""
        # G is a parameter written outside the optimizer: through the engine's writer, which
        # also updates a master copy and resets G's optimizer moments (`Method.write_parameter`)
        if centre is None:
            centre = torch.zeros_like(self.latent_centre)
        centre = centre.to(device=self.latent_centre.device, dtype=self.latent_centre.dtype)
        self.latent_centre.copy_(centre)
        self.write_parameter(self.G, nodes.to(centre) - centre)
        self.dG.copy_(dG.to(device=self.dG.device, dtype=self.dG.dtype))
        self.initialised.fill_(True)
        if self._previous_epoch_state is not None:
            # node movement is counted from the initialised grid, not from the random nodes
            self._previous_epoch_state = (self._previous_epoch_state[0],
                                          nodes.detach().to(self.G.device, torch.float64).clone())
