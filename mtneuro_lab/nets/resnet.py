"""ResNet-18 encoder for single-channel tiles, with a stem chosen for the tile size.

The ImageNet stem (7x7 stride 2 + max-pool) divides the input by 4 before the first block,
which leaves a 2x2 map at the end for 64x64 tiles; smaller stems keep enough resolution.
``stem="auto"`` picks: >=128 px -> ``imagenet``; 64-127 px -> ``small`` (3x3 stride 2, no
pool); <64 px -> ``tiny`` (3x3 stride 1, no pool, the CIFAR stem).

``width`` is the first stage's channel count (64: torchvision's ResNet-18 itself; the stages are
``width``, 2x, 4x and 8x wide, so the representation has ``8 * width`` dimensions). Narrower
encoders are for CPU budgets and the tiny ``+debug`` runs of the tests (width 16: 1/16 of the
multiply-adds and a 16th of the checkpoint bytes).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from torchvision.models import resnet18
from torchvision.models.resnet import BasicBlock, ResNet

from mtneuro_lab.errors import ConfigError

Stem = Literal["auto", "imagenet", "small", "tiny"]


def resolve_stem(stem: Stem, tile_size: int) -> str:
    if stem != "auto":
        return stem
    if tile_size >= 128:
        return "imagenet"
    return "small" if tile_size >= 64 else "tiny"


def resnet18_of_width(width: int) -> ResNet:
    """torchvision's ResNet-18 with stages ``width``, 2x, 4x, 8x wide (same module names, so the
    same checkpoint keys; ``width=64`` is ``resnet18()`` unchanged)."""
    net = resnet18(weights=None)
    if width == 64:
        return net
    net.inplanes = width  # what torchvision's _make_layer builds the next stage from
    net.bn1 = nn.BatchNorm2d(width)
    for i, name in enumerate(("layer1", "layer2", "layer3", "layer4")):
        setattr(net, name, net._make_layer(BasicBlock, width * 2**i, 2, stride=1 if i == 0 else 2))
    net.fc = nn.Linear(8 * width, net.fc.out_features)
    for m in net.modules():  # torchvision's initialisation of the stages just rebuilt
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)
    return net


class ResNet18Encoder(nn.Module):
    """ResNet-18 trunk returning the pooled representation (``out_dim = 8 * width``: 512 at the
    default width 64)."""

    def __init__(self, in_channels: int = 1, stem: Stem = "auto", tile_size: int = 128, width: int = 64) -> None:
        super().__init__()
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise ConfigError(f"model.width: must be a positive integer (ResNet-18: 64), got {width!r}")
        self.stem = resolve_stem(stem, tile_size)
        self.out_dim = 8 * width
        net = resnet18_of_width(width)
        if self.stem == "imagenet":
            net.conv1 = nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False)
        else:
            net.conv1 = nn.Conv2d(in_channels, width, 3, stride=2 if self.stem == "small" else 1, padding=1, bias=False)
            net.maxpool = nn.Identity()
        net.fc = nn.Identity()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
