"""The LSOR 3D convolutional autoencoder (Ouyang et al., MICCAI 2023, "Implementation details").

Paper: ``C16-C32-C64-C16-Conv16-CD64-CD32-CD16-CD16-Conv1`` where

* ``Ck``  = Conv3d(k, 3×3×3, padding 1) → BatchNorm3d → LeakyReLU(0.2) → MaxPool3d(2)
* ``CDk`` = Conv3d(k, 3×3×3, padding 1) → BatchNorm3d → LeakyReLU(0.2) → Upsample(×2)
* ``Convk`` = a plain Conv3d(k, 3×3×3, padding 1) (no BatchNorm, no activation).

We place ``Conv16`` at the end of the encoder, as the official code does: the latent is then a
linear function of the last block's features and not restricted to max-pooled LeakyReLU outputs.
A 64³ volume becomes 16×4×4×4, flattened into a 1024-d latent z (an 80 × 96 × 80 MNI box:
16×5×6×5, 2400-d). The decoder mirrors the encoder: it reshapes z back to
``widths[-1]×d×h×w`` and runs ``len(widths)`` CD blocks whose
widths are the encoder's in reverse (``CD64-CD32-CD16`` for the default) followed by one more of
``widths[0]`` channels, then ``Conv1`` (no BatchNorm, no activation).

``widths`` and ``input_size`` are configurable; ``input_size`` is S (an S³ cube) or the
sides (D, H, W) of a box, each divisible by ``2 ** len(widths)`` (one max-pool per block).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

from hpcbrain.models.checkpointing import ActivationCheckpointing
from hpcbrain.models.conv_weight_grad import SwappedWeightGradConv3d
from hpcbrain.volume_grid import as_shape

__all__ = ["LSOREncoder", "LSORDecoder", "ConvAutoencoder", "at_full_precision", "latent_shape"]


def latent_shape(widths: Sequence[int], input_size: int | Sequence[int]
                 ) -> tuple[int, int, int, int]:
    """(channels, d, h, w) of the encoder output before flattening, for inputs of S³ or
    D × H × W voxels; validates the sizes."""
    widths = [int(w) for w in widths]
    if len(widths) == 0:
        raise ValueError("widths must hold at least one block width")
    if any(w <= 0 for w in widths):
        raise ValueError(f"widths must be positive, got {widths}")
    factor = 2 ** len(widths)
    sides = as_shape(input_size)
    if any(side % factor != 0 for side in sides):
        raise ValueError(
            f"input_size={input_size}: every side must be a positive multiple of "
            f"2**len(widths)={factor} (widths={widths}: one 2× max-pool per block)"
        )
    return (widths[-1], *(side // factor for side in sides))  # type: ignore[return-value]


def _init_conv(conv: nn.Conv3d) -> None:
    nn.init.xavier_normal_(conv.weight)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


def at_full_precision(module: nn.Module, x: Tensor) -> Tensor:
    """`module(x)` outside any autocast region, in its parameters' dtype (float32 unless an
    engine made the weights bf16 itself).

    Why: LSOR's latents sit far from the origin and close together (measured: nodes' mean norm
    ~12, spread ~0.4) and a pair's Δz is smaller still. bf16 keeps 8 bits of mantissa, so a
    coordinate near 12 is rounded by up to 0.03 — the size of the differences the SOM, the
    direction loss and recon(g) depend on. The layers on either side of the latent (the
    encoder's last convolution, the decoder's first block) are small, so they run at full
    precision while the convolutions around them take bf16's speed.
    """
    weight = next(module.parameters(), None)
    with torch.autocast(device_type=x.device.type, enabled=False):
        return module(x.to(torch.float32 if weight is None else weight.dtype))


class _EncoderBlock(nn.Sequential):
    def __init__(self, in_ch: int, out_ch: int) -> None:
        conv = SwappedWeightGradConv3d(in_ch, out_ch, kernel_size=3, padding=1)
        _init_conv(conv)
        super().__init__(conv, nn.BatchNorm3d(out_ch), nn.LeakyReLU(0.2), nn.MaxPool3d(2))


class _DecoderBlock(nn.Sequential):
    def __init__(self, in_ch: int, out_ch: int) -> None:
        conv = SwappedWeightGradConv3d(in_ch, out_ch, kernel_size=3, padding=1)
        _init_conv(conv)
        super().__init__(
            conv,
            nn.BatchNorm3d(out_ch),
            nn.LeakyReLU(0.2),
            nn.Upsample(scale_factor=2, mode="trilinear", align_corners=True),
        )


class LSOREncoder(ActivationCheckpointing, nn.Module):
    """Volumes [B, C, D, H, W] → latents [B, widths[-1]·(D·H·W) / 8**len(widths)].

    Standalone: it needs nothing from the decoder or the method, so it can be logged/registered
    on its own and called on batches of volumes.
    """

    def __init__(
        self,
        widths: Sequence[int] = (16, 32, 64, 16),
        input_size: int | Sequence[int] = 64,
        in_channels: int = 1,
        final_conv: bool = True,
    ) -> None:
        super().__init__()
        self.widths = [int(w) for w in widths]
        self.input_shape = as_shape(input_size)
        self.in_channels = int(in_channels)
        self.latent_shape = latent_shape(self.widths, self.input_shape)
        self.latent_dim = math.prod(self.latent_shape)
        blocks: list[nn.Module] = []
        prev = self.in_channels
        for w in self.widths:
            blocks.append(_EncoderBlock(prev, w))
            prev = w
        self.blocks = nn.Sequential(*blocks)
        if final_conv:
            self.head: nn.Module = SwappedWeightGradConv3d(prev, prev, kernel_size=3, padding=1)
            _init_conv(self.head)
        else:
            self.head = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.latent(self.features(x))

    def features(self, x: Tensor) -> Tensor:
        """Volumes [B, C, D, H, W] → the last block's feature maps, what `head` reads (a VAE
        reads them with a second head)."""
        expected = (self.in_channels, *self.input_shape)
        if x.dim() != 5 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"expected volumes of shape [B, {', '.join(map(str, expected))}], "
                             f"got {list(x.shape)}")
        for block in self.blocks:
            x = self.segment(block, x)
        return x

    def latent(self, features: Tensor) -> Tensor:
        """Feature maps → latents [B, D]: the head, at full precision (`at_full_precision`)."""
        return at_full_precision(self.head, features).flatten(1)


class LSORDecoder(ActivationCheckpointing, nn.Module):
    """Latents [B, latent_dim] → volumes [B, C, D, H, W]; mirrors `LSOREncoder`."""

    def __init__(
        self,
        widths: Sequence[int] = (16, 32, 64, 16),
        input_size: int | Sequence[int] = 64,
        out_channels: int = 1,
    ) -> None:
        super().__init__()
        self.widths = [int(w) for w in widths]
        self.input_shape = as_shape(input_size)
        self.latent_shape = latent_shape(self.widths, self.input_shape)
        self.latent_dim = math.prod(self.latent_shape)
        outs = list(reversed(self.widths[:-1])) + [self.widths[0]]
        blocks: list[nn.Module] = []
        prev = self.widths[-1]
        for w in outs:
            blocks.append(_DecoderBlock(prev, w))
            prev = w
        self.blocks = nn.Sequential(*blocks)
        self.out = SwappedWeightGradConv3d(prev, int(out_channels), kernel_size=3, padding=1)
        _init_conv(self.out)

    def forward(self, z: Tensor) -> Tensor:
        if z.dim() != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(f"expected latents of shape [B, {self.latent_dim}], got {list(z.shape)}")
        h = at_full_precision(self.blocks[0], z.reshape(z.shape[0], *self.latent_shape))
        for block in self.blocks[1:]:
            h = self.segment(block, h)
        return self.out(h)


class ConvAutoencoder(nn.Module):
    """`LSOREncoder` + `LSORDecoder`; ``forward(x)`` returns ``(z, reconstruction)``."""

    def __init__(
        self,
        widths: Sequence[int] = (16, 32, 64, 16),
        input_size: int | Sequence[int] = 64,
        channels: int = 1,
    ) -> None:
        super().__init__()
        self.encoder = LSOREncoder(widths, input_size, in_channels=channels)
        self.decoder = LSORDecoder(widths, input_size, out_channels=channels)
        self.latent_dim = self.encoder.latent_dim

    def encode(self, x: Tensor) -> Tensor:
        return self.encoder(x)

    def decode(self, z: Tensor) -> Tensor:
        return self.decoder(z)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        z = self.encoder(x)
        return z, self.decoder(z)
