"""3D ResNets for volumes [B, C, S, S, S] (AdapN's encoder: ResNet-18, 512-d features).

The layout of the 3D ResNet used by the OpenBHB / contrastive brain-age line of work (and thus by
AdapN's official code): a 7³ stride-2 stem convolution, a 3³ stride-2 max-pool, four stages of
BasicBlocks (stride 1, 2, 2, 2) of widths w, 2w, 4w, 8w, global average pooling. With the
default base width w = 64 and [2, 2, 2, 2] blocks this is ResNet-18 with 512-d features
(33.2 M parameters). A smaller `width` gives the same architecture at a fraction of the cost
(tests and CPU runs use 4 or 8).

Any input size ≥ 1 voxel works (the stages pad; global pooling makes the output size-free).
"""
from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn

from hpcbrain.models.checkpointing import ActivationCheckpointing
from hpcbrain.models.conv_weight_grad import SwappedWeightGradConv3d

__all__ = ["BasicBlock3D", "ResNet3D", "resnet18_3d", "resnet34_3d", "build_resnet3d"]


def _conv3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv3d:
    return SwappedWeightGradConv3d(in_ch, out_ch, kernel_size=3, stride=stride, padding=1,
                                   bias=False)


class BasicBlock3D(nn.Module):
    """conv3³-BN-ReLU-conv3³-BN + shortcut (1³ conv + BN when the shape changes), ReLU."""

    expansion = 1

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3(in_ch, out_ch, stride)
        self.bn1 = nn.BatchNorm3d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3(out_ch, out_ch)
        self.bn2 = nn.BatchNorm3d(out_ch)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                nn.Conv3d(in_ch, out_ch, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm3d(out_ch))

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet3D(ActivationCheckpointing, nn.Module):
    """Volumes [B, in_channels, D, H, W] → features [B, feature_dim] (feature_dim = 8·width)."""

    def __init__(self, layers: Sequence[int] = (2, 2, 2, 2), width: int = 64,
                 in_channels: int = 1) -> None:
        super().__init__()
        layers = [int(n) for n in layers]
        if len(layers) != 4 or min(layers) < 1:
            raise ValueError(f"ResNet3D: layers must be 4 positive block counts, got {layers}")
        if int(width) < 1:
            raise ValueError(f"ResNet3D: width must be >= 1, got {width}")
        self.width = int(width)
        self.in_channels = int(in_channels)
        widths = [self.width * m for m in (1, 2, 4, 8)]
        self.stem = nn.Sequential(
            nn.Conv3d(self.in_channels, widths[0], kernel_size=7, stride=2, padding=3,
                      bias=False),
            nn.BatchNorm3d(widths[0]),
            nn.ReLU(inplace=True),
            nn.MaxPool3d(kernel_size=3, stride=2, padding=1),
        )
        stages = []
        prev = widths[0]
        for i, (n_blocks, w) in enumerate(zip(layers, widths)):
            blocks = [BasicBlock3D(prev, w, stride=1 if i == 0 else 2)]
            blocks += [BasicBlock3D(w, w) for _ in range(n_blocks - 1)]
            stages.append(nn.Sequential(*blocks))
            prev = w
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.feature_dim = prev
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm3d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"ResNet3D expects volumes [B, {self.in_channels}, D, H, W], got "
                             f"{list(x.shape)}")
        # the stem is not checkpointed: its output (64 channels at half resolution) is the
        # largest activation, and recomputing it at the end of the backward pass would bring it
        # back beside the input's gradient buffers — measured a higher peak than no checkpointing
        x = self.stem(x)
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in stage:
                x = self.segment(block, x)
        return self.pool(x).flatten(1)


def resnet18_3d(width: int = 64, in_channels: int = 1) -> ResNet3D:
    return ResNet3D((2, 2, 2, 2), width, in_channels)


def resnet34_3d(width: int = 64, in_channels: int = 1) -> ResNet3D:
    return ResNet3D((3, 4, 6, 3), width, in_channels)


def build_resnet3d(name: str, width: int = 64, in_channels: int = 1) -> ResNet3D:
    builders = {"resnet18": resnet18_3d, "resnet34": resnet34_3d}
    if name not in builders:
        raise ValueError(f"unknown ResNet {name!r}; choose one of {sorted(builders)}")
    return builders[name](width, in_channels)
