"""UNETR-style segmentation network on the 3D ViT encoder (Hatamizadeh et al. 2022).

Generalised to anisotropic patches: a patch of ``(pd, ph, pw) = (2^a, 2^b, 2^c)`` needs
``n = max(a, b, c)`` 2x up-sampling stages to return to full resolution, and stage ``j``
(level ``j+1 -> j``) doubles only the axes whose exponent is larger than ``j``. So the paper's
``1x16x16`` patch gets four ``(1, 2, 2)`` stages and z is never resampled. Skip connections
come from ``n - 1`` evenly spaced encoder blocks (blocks 3, 6, 9 of 12 for a 16-voxel patch),
the bottleneck is the encoder's final, normalised output, and the first skip is a conv block
on the image itself. Building blocks are MONAI's (``UnetrBasicBlock``, ``UnetrUpBlock``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.blocks import UnetrBasicBlock, UnetrUpBlock
from monai.networks.blocks.dynunet_block import UnetOutBlock, UnetResBlock, get_conv_layer
from torch import nn

from mtneuro_lab.errors import ConfigError
from mtneuro_lab.nets.vit3d import ViTEncoder


def upsampling_stages(patch_size: Sequence[int]) -> list[tuple[int, int, int]]:
    """Per-stage scale factors, finest stage first; patch sides must be powers of two."""
    exps = []
    for p in patch_size:
        if p < 1 or p & (p - 1):
            raise ConfigError(f"model.patch_size: UNETR needs power-of-two patch sides, got {list(patch_size)}")
        exps.append(int(p).bit_length() - 1)
    n = max(exps)
    if n == 0:
        raise ConfigError(f"model.patch_size: UNETR needs a patch larger than one voxel, got {list(patch_size)}")
    return [tuple(2 if j < e else 1 for e in exps) for j in range(n)]  # type: ignore[misc]


def skip_blocks(depth: int, levels: int) -> list[int]:
    """0-based indices of the ``levels - 1`` evenly spaced blocks whose outputs feed the skips."""
    return [depth * k // levels - 1 for k in range(1, levels)]


def _tokens_to_volume(tokens: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *grid)


class UNETR(nn.Module):
    """ViT encoder + convolutional decoder with skip connections -> ``out_channels`` logits."""

    def __init__(self, encoder: ViTEncoder, out_channels: int, feature_size: int = 16, norm: str = "instance") -> None:
        super().__init__()
        if out_channels < 1:
            raise ConfigError(f"model: the task must predict at least one channel, got {out_channels}")
        if feature_size < 1:
            raise ConfigError(f"model.feature_size: must be >= 1, got {feature_size}")
        self.encoder = encoder
        spec = encoder.spec
        self.stages = upsampling_stages(spec.patch_size)
        n = len(self.stages)
        self.skip_ids = skip_blocks(spec.depth, n)
        ch = [feature_size * 2**k for k in range(n)]
        self.stem = UnetrBasicBlock(3, spec.in_channels, ch[0], kernel_size=3, stride=1, norm_name=norm, res_block=True)
        self.projections = nn.ModuleList(self._projection(spec.dim, ch[k], k, norm) for k in range(1, n))
        self.decoders = nn.ModuleList(
            UnetrUpBlock(
                3,
                spec.dim if j == n - 1 else ch[j + 1],
                ch[j],
                kernel_size=3,
                upsample_kernel_size=self.stages[j],
                norm_name=norm,
                res_block=True,
            )
            for j in range(n)
        )
        self.head = UnetOutBlock(3, ch[0], out_channels)

    def _projection(self, dim: int, out: int, level: int, norm: str) -> nn.Sequential:
        """Token grid -> resolution of ``level`` (transposed convs, conv blocks between them)."""
        n = len(self.stages)
        layers: list[nn.Module] = [
            get_conv_layer(
                3,
                dim,
                out,
                kernel_size=self.stages[n - 1],
                stride=self.stages[n - 1],
                conv_only=True,
                is_transposed=True,
            )
        ]
        for j in range(n - 2, level - 1, -1):
            layers += [
                UnetResBlock(3, out, out, kernel_size=3, stride=1, norm_name=norm),
                get_conv_layer(
                    3, out, out, kernel_size=self.stages[j], stride=self.stages[j], conv_only=True, is_transposed=True
                ),
            ]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grid = self.encoder.grid
        tokens, hidden = self.encoder(x, collect=self.skip_ids)
        skips = [self.stem(x)] + [proj(_tokens_to_volume(h, grid)) for proj, h in zip(self.projections, hidden)]
        y = _tokens_to_volume(tokens, grid)
        for j in range(len(self.stages) - 1, -1, -1):
            y = self.decoders[j](y, skips[j])
        return self.head(y)
