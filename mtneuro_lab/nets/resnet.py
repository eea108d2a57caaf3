"""ResNet-18 encoder for single-channel tiles, with a stem chosen for the tile size.

The ImageNet stem (7x7 stride 2 + max-pool) divides the input by 4 before the first block,
which leaves a 2x2 map at the end for 64x64 tiles; smaller stems keep enough resolution.
``stem="auto"`` picks: >=128 px -> ``imagenet``; 64-127 px -> ``small`` (3x3 stride 2, no
pool); <64 px -> ``tiny`` (3x3 stride 1, no pool, the CIFAR stem).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from torchvision.models import resnet18

Stem = Literal["auto", "imagenet", "small", "tiny"]


def resolve_stem(stem: Stem, tile_size: int) -> str:
    if stem != "auto":
        return stem
    if tile_size >= 128:
        return "imagenet"
    return "small" if tile_size >= 64 else "tiny"


class ResNet18Encoder(nn.Module):
    """torchvision ResNet-18 trunk returning the 512-d pooled representation."""

    out_dim = 512

    def __init__(self, in_channels: int = 1, stem: Stem = "auto", tile_size: int = 128) -> None:
        super().__init__()
        self.stem = resolve_stem(stem, tile_size)
        net = resnet18(weights=None)
        if self.stem == "imagenet":
            net.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        else:
            net.conv1 = nn.Conv2d(in_channels, 64, 3, stride=2 if self.stem == "small" else 1, padding=1, bias=False)
            net.maxpool = nn.Identity()
        net.fc = nn.Identity()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
