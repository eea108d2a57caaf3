"""Residual symmetric U-Net for anisotropic serial EM (Lee et al. 2017, "superhuman" SNEMI3D).

What makes it the field's workhorse for affinities, kept here:

* **anisotropic sampling**: each level halves y/x; z is halved only at the deepest levels
  (``downsample``, default :func:`inplane_first_factors`: in-plane at the first levels, 3D
  at the last ones, as many as the crop depth allows), and the stem/head use 1x5x5 kernels;
* **residual modules**: a 1x3x3 conv, then two 3x3x3 convs with a skip around them;
* **symmetric sums**: decoder levels *add* the up-sampled features to the skip (no
  concatenation), so widths mirror the encoder.

Built from MONAI blocks (``Convolution`` for conv/norm/activation, ``UpSample`` with transposed
convolutions). Batch norm and ELU as in the paper; widths are smaller than its 28-36-48-64-80
by default so that it trains on a CPU.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from mtneuro_lab.errors import ConfigError
from mtneuro_lab.nets.segmentation import Factor, check_divisible, inplane_first_factors, total_factor


def check_factors(factors: Sequence[Sequence[int]], key: str) -> list[Factor]:
    out = []
    for i, f in enumerate(factors):
        t = tuple(int(v) for v in f)
        if len(t) != 3 or any(v not in (1, 2) for v in t):
            raise ConfigError(f"{key}[{i}]: expected [dz, dy, dx] with each 1 or 2, got {list(f)}")
        out.append(t)
    return out


class ResModule(nn.Module):
    """1x3x3 conv, then two 3x3x3 convs with a residual skip, then norm + activation."""

    def __init__(self, in_channels: int, out_channels: int, norm: str, act: str) -> None:
        super().__init__()
        from monai.networks.blocks import Convolution

        def conv(cin: int, kernel: Sequence[int], conv_only: bool = False) -> nn.Module:
            return Convolution(
                3, cin, out_channels, kernel_size=kernel, norm=norm, act=act, conv_only=conv_only, bias=False
            )

        self.pre = conv(in_channels, (1, 3, 3))
        self.a = conv(out_channels, (3, 3, 3))
        self.b = conv(out_channels, (3, 3, 3), conv_only=True)
        from monai.networks.layers.factories import Act, Norm

        self.norm = Norm[norm, 3](out_channels)
        self.act = Act[act]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pre(x)
        return self.act(self.norm(x + self.b(self.a(x))))


class RSUNet(nn.Module):
    """Residual symmetric U-Net: ``(B, in, Z, Y, X)`` -> ``(B, out, Z, Y, X)`` logits.

    ``widths`` per level (``len(widths) - 1`` down-samplings); ``downsample`` the factor of each
    down-sampling, ``[dz, dy, dx]`` with values 1 or 2 (null: :func:`inplane_first_factors` of
    ``input_shape``). Inputs must be divisible by the product of the factors (:attr:`divisor`).
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 3,
        input_shape: Sequence[int] | None = None,
        widths: Sequence[int] = (16, 32, 48, 64),
        downsample: Sequence[Sequence[int]] | None = None,
        norm: str = "batch",
        act: str = "elu",
    ) -> None:
        super().__init__()
        from monai.networks.blocks import Convolution, UpSample

        widths = [int(w) for w in widths]
        if len(widths) < 2 or min(widths) < 1:
            raise ConfigError(f"model.net.widths: need at least two positive widths, got {widths}")
        levels = len(widths) - 1
        if downsample is None:
            if input_shape is None:
                raise ConfigError("model.net.downsample: null needs the crop (input_shape) to choose factors")
            factors = inplane_first_factors(input_shape, levels)
        else:
            factors = check_factors(downsample, "model.net.downsample")
            if len(factors) != levels:
                raise ConfigError(
                    f"model.net.downsample: {len(factors)} factors for {levels} down-samplings "
                    f"(len(model.net.widths) - 1)"
                )
        self.factors = factors
        self.divisor = total_factor(factors)
        if input_shape is not None:
            check_divisible(
                input_shape,
                self.divisor,
                "task.crop",
                f"RSUNet with downsample {[list(f) for f in factors]} halves the axes that often: "
                "change task.crop or model.net.downsample/widths",
            )
        self.stem = Convolution(3, in_channels, widths[0], kernel_size=(1, 5, 5), norm=norm, act=act)
        # level i widens from the previous level's width in its first (1x3x3) conv
        self.enc = nn.ModuleList(ResModule(widths[max(i - 1, 0)], widths[i], norm, act) for i in range(levels))
        self.down = nn.ModuleList(nn.MaxPool3d(f, f) for f in factors)
        self.bottom = ResModule(widths[-2], widths[-1], norm, act)
        self.up = nn.ModuleList(
            UpSample(3, widths[i + 1], widths[i], scale_factor=factors[i], kernel_size=factors[i], mode="deconv")
            for i in range(levels)
        )
        self.dec = nn.ModuleList(ResModule(widths[i], widths[i], norm, act) for i in range(levels))
        self.head = Convolution(3, widths[0], out_channels, kernel_size=(1, 5, 5), conv_only=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        skips = []
        for enc, down in zip(self.enc, self.down):
            x = enc(x)  # (B, w[i], ...)
            skips.append(x)
            x = down(x)  # (B, w[i], Z/dz, Y/2, X/2)
        x = self.bottom(x)
        for i in reversed(range(len(skips))):
            x = self.dec[i](self.up[i](x) + skips[i])  # symmetric: sum, not concatenation
        return self.head(x)
