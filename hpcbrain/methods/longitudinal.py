"""LSOR's baselines (its Table 1), on LSOR's own autoencoder and pair batches.

All four encode both scans of each pair with `ConvAutoencoder` (the LSOR paper's architecture,
``model.widths``), reconstruct them, and differ in what they add:

* ``ae``: nothing — recon = mean over voxels of (x − H(z))², averaged over the two scans (the
  same reduction as LSOR's recon term).
* ``vae`` (Kingma & Welling 2014): the encoder gives a mean (its usual output, also what the
  registered encoder returns) and, from a second head on the same features, a log-variance;
  the decoder sees z = μ + σ·ε while training, μ in evaluation; loss = recon + β·KL with
  KL = mean over batch and latent dims of −½(1 + log σ² − μ² − σ²) (per-dimension, so β keeps
  the scale of the per-voxel recon; ``baselines.vae_beta``).
* ``lssl`` (Zhao et al., MedIA 2021): one learnable direction τ shared by all subjects;
  loss = recon + λ_dir·mean(1 − cos(Δz, τ)), Δz = (z_v − z_u)/Δt (as the official LSOR code's
  LSSL: τ = Linear(1 → D) of a constant 1, i.e. weight + bias).
* ``lne`` (Ouyang et al., MedIA 2022): Δh_i = Σ_j w_ij Δz_j / Σ_j w_ij over the
  ``baselines.lne_neighbours`` nearest pairs j ≠ i by ‖z_u,i − z_u,j‖² in the **global** batch
  (all ranks), w_ij = exp(−‖z_u,i − z_u,j‖² / σ²) (σ² = ``baselines.lne_sigma2``, the official
  code's 100); loss = recon + λ_dir·mean(1 − cos(Δz_i, Δh_i)), gradients through Δz_j and the
  weights as in the official code.
λ_dir: ``baselines.lambda_dir`` (default 1.0; the official LSOR comparison config used 0.5 for
LSSL). docs/lsor-baselines.md holds the sources and the choices.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hpcbrain.config import MethodSections
from hpcbrain.methods.base import Method, register_method
from hpcbrain.methods.contrastive import global_batch_loss
from hpcbrain.models.autoencoder import ConvAutoencoder, at_full_precision

__all__ = ["AE", "VAE", "LSSL", "LNE", "direction_loss", "lne_neighbourhood_trajectories"]


def direction_loss(delta_z: Tensor, direction: Tensor) -> Tensor:
    """Per-pair 1 − cos(Δz_i, d_i) (norms + 1e-12, as the official code); direction [D] or
    [B, D]."""
    direction = direction.expand_as(delta_z)
    cos = (delta_z * direction).sum(1) / ((delta_z.norm(dim=1) + 1e-12)
                                         * (direction.norm(dim=1) + 1e-12))
    return 1.0 - cos


def lne_neighbourhood_trajectories(z_u: Tensor, delta_z: Tensor, anchors: Tensor,
                                   neighbours: int, sigma2: float) -> Tensor:
    """Δh of the `anchors` rows [A, D]: the Gaussian-weighted mean Δz of each anchor's
    `neighbours` nearest other pairs (by squared distance of z_u) in the whole batch."""
    d2 = torch.cdist(z_u[anchors], z_u).pow(2)                           # [A, N]
    d2 = d2.masked_fill(F.one_hot(anchors, z_u.shape[0]).bool(), float("inf"))  # not itself
    k = min(int(neighbours), z_u.shape[0] - 1)
    nearest = d2.topk(k, dim=1, largest=False).indices                    # [A, k]
    w = torch.exp(-d2.gather(1, nearest) / float(sigma2))                 # [A, k]
    return (w.unsqueeze(2) * delta_z[nearest]).sum(1) / w.sum(1, keepdim=True).clamp_min(1e-30)


class PairAutoencoderMethod(Method):
    """Pairs in, LSOR's autoencoder, recon on both scans; subclasses add `extra_losses`."""

    batch_kind = "pairs"
    config_section = "baselines"

    def __init__(self, sections: MethodSections) -> None:
        super().__init__()
        self.input_size = sections.input_size
        self.net = ConvAutoencoder([int(w) for w in sections.model.widths], self.input_size)
        self.latent_dim = self.net.latent_dim
        c = sections.own
        self.lambda_recon = float(c.lambda_recon)
        self.lambda_dir = float(c.lambda_dir)

    def encoder(self) -> nn.Module:
        return self.net.encoder

    def latents(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """(what the decoder sees, extra loss terms). AE: z itself, nothing extra."""
        return self.net.encode(x), {}

    def extra_losses(self, z_u: Tensor, z_v: Tensor, dt: Tensor) -> dict[str, Tensor]:
        return {}

    def forward(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        x_u, x_v = batch["x_u"], batch["x_v"]
        b = x_u.shape[0]
        z, terms = self.latents(torch.cat([x_u, x_v]))
        recon = self.net.decode(z)
        losses = {"recon": 0.5 * (F.mse_loss(recon[:b].float(), x_u.float())
                                  + F.mse_loss(recon[b:].float(), x_v.float()))}
        dt = batch["dt"].to(z.device, torch.float32).reshape(-1)
        with torch.autocast(device_type=z.device.type, enabled=False):
            losses.update(terms)
            losses.update(self.extra_losses(z[:b].float(), z[b:].float(), dt))
        total = self.lambda_recon * losses["recon"]
        for name, value in losses.items():
            if name != "recon":
                total = total + self.weight(name) * value
        return {"loss": total, **losses}

    def weight(self, name: str) -> float:
        return self.lambda_dir


@register_method("ae")
class AE(PairAutoencoderMethod):
    """LSOR's autoencoder alone."""


@register_method("vae")
class VAE(PairAutoencoderMethod):
    def __init__(self, sections: MethodSections) -> None:
        super().__init__(sections)
        self.beta = float(sections.own.vae_beta)
        channels = self.net.encoder.widths[-1]
        self.logvar_head = nn.Conv3d(channels, channels, kernel_size=3, padding=1)
        nn.init.zeros_(self.logvar_head.weight)       # start at σ = 1 everywhere
        nn.init.zeros_(self.logvar_head.bias)

    def latents(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        features = self.net.encoder.features(x)
        mu = self.net.encoder.latent(features)
        # log σ² beside μ at full precision: both sit on the latent's side of the boundary
        # (models/autoencoder.py, `at_full_precision`)
        logvar = at_full_precision(self.logvar_head, features).flatten(1).float()
        logvar = logvar.clamp(-30.0, 20.0)
        kl = (-0.5 * (1 + logvar - mu.float().pow(2) - logvar.exp())).mean()
        if not self.training:
            return mu, {"kl": kl}
        eps = torch.randn_like(mu)
        return mu + eps * torch.exp(0.5 * logvar).to(mu.dtype), {"kl": kl}

    def weight(self, name: str) -> float:
        return self.beta


@register_method("lssl")
class LSSL(PairAutoencoderMethod):
    def __init__(self, sections: MethodSections) -> None:
        super().__init__(sections)
        self.direction = nn.Linear(1, self.latent_dim)   # τ = weight + bias, as official

    def extra_losses(self, z_u: Tensor, z_v: Tensor, dt: Tensor) -> dict[str, Tensor]:
        tau = self.direction(torch.ones(1, 1, device=z_u.device)).float()[0]
        return {"dir": direction_loss((z_v - z_u) / dt.unsqueeze(1), tau).mean()}


@register_method("lne")
class LNE(PairAutoencoderMethod):
    def __init__(self, sections: MethodSections) -> None:
        super().__init__(sections)
        self.neighbours = int(sections.own.lne_neighbours)
        self.sigma2 = float(sections.own.lne_sigma2)

    def extra_losses(self, z_u: Tensor, z_v: Tensor, dt: Tensor) -> dict[str, Tensor]:
        d = z_u.shape[1]
        delta_z = (z_v - z_u) / dt.unsqueeze(1)

        def loss_sum(rows: Tensor, _labels: Tensor, anchors: Tensor) -> Tensor:
            zu_all, dz_all = rows[:, :d], rows[:, d:]
            dh = lne_neighbourhood_trajectories(zu_all, dz_all, anchors, self.neighbours,
                                                self.sigma2)
            return direction_loss(dz_all[anchors], dh).sum()

        labels = torch.zeros(z_u.shape[0], 1, dtype=torch.float64, device=z_u.device)
        return {"dir": global_batch_loss(loss_sum, torch.cat([z_u, delta_z], 1), labels)}
