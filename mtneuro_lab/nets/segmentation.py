"""Segmentation networks: 2D ones from segmentation-models-pytorch, 3D ones from MONAI, VNetLight.

All take one input channel and return per-class logits of the input's spatial shape. Shape
requirements (how often a net halves each axis) are checked here so that a mismatch with the
task's sample shape is one ConfigError naming the keys to change, before any data is read.

ImageNet encoder weights are optional (``model.encoder_weights=imagenet``). They are looked up in
the local Hugging Face cache first; only if missing is the hub contacted, after a 5-second
reachability probe, so an offline machine gets one clear error instead of minutes of retries.
"""

from __future__ import annotations

import contextlib
import difflib
import socket
from collections.abc import Iterator, Sequence
from typing import Literal, cast
from urllib.parse import urlparse

import torch
from torch import nn

from mtneuro_lab.errors import ConfigError

SmpArch = Literal[
    "unet", "unetplusplus", "manet", "linknet", "fpn", "pspnet", "pan", "deeplabv3", "deeplabv3plus", "upernet"
]
Net3DArch = Literal["unet3d", "vnet_light", "highresnet"]

#: how many times each smp architecture halves the input by default (encoder_depth)
_SMP_DEFAULT_DEPTH = {"pspnet": 3}
#: output strides where the architecture fixes it regardless of depth
_SMP_MIN_FACTOR = {"pan": 32, "deeplabv3": 8, "deeplabv3plus": 16}
#: smallest input side: PAN's feature pyramid attention pools its 1/32 map three more times
SMP_MIN_SIZE = {"pan": 128}


def unet_levels(levels: int | None) -> int:
    """``model.levels`` of a U-Net: 3 when unset, else checked to lie in 1..5."""
    levels = 3 if levels is None else levels
    if not 1 <= levels <= 5:
        raise ConfigError(f"model.levels: must be in 1..5, got {levels}")
    return levels


def check_divisible(shape: Sequence[int], factors: Sequence[int], what: str, fix: str) -> None:
    """Raise a ConfigError if any spatial axis is not divisible by its factor."""
    bad = [(s, f) for s, f in zip(shape, factors) if s % f]
    if bad:
        dims = "x".join(str(s) for s in shape)
        need = "x".join(str(f) for f in factors)
        raise ConfigError(f"{what}: samples of {dims} must be divisible by {need}; {fix}")


# -- 2D: segmentation-models-pytorch ---------------------------------------------------------
def smp_reduction(arch: str, encoder_depth: int | None) -> int:
    depth = encoder_depth if encoder_depth is not None else _SMP_DEFAULT_DEPTH.get(arch, 5)
    return max(2**depth, _SMP_MIN_FACTOR.get(arch, 1))


def check_encoder_name(encoder_name: str) -> None:
    import segmentation_models_pytorch as smp

    if encoder_name.startswith("tu-"):
        import timm

        if not timm.list_models(encoder_name[3:]):
            raise ConfigError(f"model.encoder_name: unknown timm encoder {encoder_name!r}")
        return
    names = smp.encoders.get_encoder_names()
    if encoder_name not in names:
        close = difflib.get_close_matches(encoder_name, names, n=5)
        hint = f"; close matches: {', '.join(close)}" if close else "; e.g. resnet18, efficientnet-b0, efficientnet-b7"
        raise ConfigError(f"model.encoder_name: unknown encoder {encoder_name!r}{hint}")


@contextlib.contextmanager
def _hf_offline(enabled: bool) -> Iterator[None]:
    """Make huggingface_hub serve from the local cache only (no HTTP, no retries)."""
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = enabled or saved
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved


def hub_reachable(timeout: float = 5.0) -> str | None:
    """None if the Hugging Face endpoint accepts a TCP connection, else the reason it does not."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "", port), timeout=timeout):
            return None
    except OSError as err:
        return f"{url.hostname} unreachable: {err}"


def smp_net(
    arch: str,
    encoder_name: str,
    encoder_weights: str | None,
    classes: int,
    encoder_depth: int | None = None,
    in_channels: int = 1,
) -> nn.Module:
    """An smp model; with weights, cache first, then one fast-failing online attempt."""
    import segmentation_models_pytorch as smp

    check_encoder_name(encoder_name)
    kwargs = {"encoder_depth": encoder_depth} if encoder_depth is not None else {}

    def build(weights: str | None) -> nn.Module:
        return smp.create_model(
            arch, encoder_name=encoder_name, encoder_weights=weights, in_channels=in_channels, classes=classes, **kwargs
        )

    if encoder_weights is None:
        return build(None)
    try:
        with _hf_offline(True):
            return build(encoder_weights)
    except KeyError as err:  # smp: no such weights for this encoder
        raise ConfigError(f"model.encoder_weights: {' '.join(str(err).split())}") from None
    except Exception:  # noqa: BLE001 - not in the local cache: try the hub once, below
        pass
    reason = hub_reachable()
    if reason is None:
        try:
            return build(encoder_weights)
        except Exception as err:  # noqa: BLE001 - any download failure is reported in one line
            reason = str(err).splitlines()[0]
    raise ConfigError(
        f"model.encoder_weights={encoder_weights}: cannot fetch weights for encoder {encoder_name!r} "
        f"({reason}); run with model.encoder_weights=null, or fetch them once on a machine with "
        f"internet access into the Hugging Face cache (~/.cache/huggingface)"
    )


# -- 3D: MONAI and VNetLight -------------------------------------------------------------------
class _ResStage(nn.Module):
    """V-Net stage: ``n`` conv-norm-PReLU layers with a residual connection around them."""

    def __init__(self, channels: int, n: int, kernel: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for _ in range(n):
            layers += [
                nn.Conv3d(channels, channels, kernel, padding=kernel // 2, bias=False),
                nn.BatchNorm3d(channels),
                nn.PReLU(channels),
            ]
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class VNetLight(nn.Module):
    """A light V-Net (Milletari et al. 2016): residual stages, strided-conv down, transposed-conv up.

    Lighter than the original (3x3x3 kernels instead of 5x5x5, ``base_channels`` 8 and ``levels``
    3 by default instead of 16 and 4) so that 8-slice stacks fit and it trains on a CPU; every
    level halves all three axes, so inputs must be divisible by ``2**levels``.
    """

    def __init__(
        self, in_channels: int, classes: int, base_channels: int = 8, levels: int = 3, kernel: int = 3
    ) -> None:
        super().__init__()
        chans = [base_channels * 2**i for i in range(levels + 1)]
        self.stem = nn.Sequential(
            nn.Conv3d(in_channels, chans[0], kernel, padding=kernel // 2, bias=False),
            nn.BatchNorm3d(chans[0]),
            nn.PReLU(chans[0]),
        )
        self.enc = nn.ModuleList(_ResStage(chans[i], min(i + 1, 3), kernel) for i in range(levels))
        self.down = nn.ModuleList(
            nn.Sequential(
                nn.Conv3d(chans[i], chans[i + 1], 2, stride=2, bias=False),
                nn.BatchNorm3d(chans[i + 1]),
                nn.PReLU(chans[i + 1]),
            )
            for i in range(levels)
        )
        self.bottom = _ResStage(chans[levels], 3, kernel)
        # decoder level i: up from (2*chans[i+1] or chans[levels]) to chans[i], concat skip -> 2*chans[i]
        ups, decs = [], []
        for i in reversed(range(levels)):
            c_in = chans[levels] if i == levels - 1 else 2 * chans[i + 1]
            ups.append(
                nn.Sequential(
                    nn.ConvTranspose3d(c_in, chans[i], 2, stride=2, bias=False),
                    nn.BatchNorm3d(chans[i]),
                    nn.PReLU(chans[i]),
                )
            )
            decs.append(_ResStage(2 * chans[i], min(i + 1, 3), kernel))
        self.up = nn.ModuleList(ups)
        self.dec = nn.ModuleList(decs)
        self.head = nn.Conv3d(2 * chans[0], classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        skips = []
        for enc, down in zip(self.enc, self.down):
            x = enc(x)
            skips.append(x)
            x = down(x)
        x = self.bottom(x)
        for up, dec, skip in zip(self.up, self.dec, reversed(skips)):
            x = dec(torch.cat([up(x), skip], dim=1))
        return self.head(x)


def net3d_reduction(arch: str, levels: int) -> int:
    return 1 if arch == "highresnet" else 2**levels


def net3d(arch: str, classes: int, base_channels: int, levels: int, in_channels: int = 1) -> nn.Module:
    """MONAI UNet / HighResNet or VNetLight, all sized by ``base_channels`` (and ``levels``)."""
    chans = [base_channels * 2**i for i in range(levels + 1)]
    if arch == "unet3d":
        from monai.networks.nets import UNet

        return UNet(
            spatial_dims=3,
            in_channels=in_channels,
            out_channels=classes,
            channels=chans,
            strides=[2] * levels,
            num_res_units=2,
        )
    if arch == "highresnet":
        from monai.networks.nets import HighResNet

        b = base_channels
        layers = (
            {"name": "conv_0", "n_features": b, "kernel_size": 3},
            {"name": "res_1", "n_features": b, "kernels": (3, 3), "repeat": 3},
            {"name": "res_2", "n_features": 2 * b, "kernels": (3, 3), "repeat": 3},
            {"name": "res_3", "n_features": 4 * b, "kernels": (3, 3), "repeat": 3},
            {"name": "conv_1", "n_features": 5 * b, "kernel_size": 1},
            {"name": "conv_2", "kernel_size": 1},
        )
        return HighResNet(spatial_dims=3, in_channels=in_channels, out_channels=classes, layer_params=layers)
    if arch == "vnet_light":
        return VNetLight(in_channels, classes, base_channels=base_channels, levels=levels)
    raise ConfigError(f"model.arch: must be one of unet3d, vnet_light, highresnet, got {arch!r}")


# -- 3D U-Nets for serial EM (anisotropic crops) ----------------------------------------------
Factor = tuple[int, int, int]


def inplane_first_factors(input_shape: Sequence[int], levels: int) -> list[Factor]:
    """Down-sampling factors of ``levels`` levels: ``(1, 2, 2)`` first, ``(2, 2, 2)`` at the last ``k``.

    ``k`` is the largest number of z halvings that leaves at least 2 sections and divides the
    crop depth: 16 sections and 3 levels -> all 3D; 6 sections -> one 3D level; 4 -> one.
    """
    depth = int(input_shape[0])
    k = 0
    while k < levels and depth % 2 ** (k + 1) == 0 and depth // 2 ** (k + 1) >= 2:
        k += 1
    return [(1, 2, 2)] * (levels - k) + [(2, 2, 2)] * k


def total_factor(factors: Sequence[Sequence[int]]) -> Factor:
    """Product of the per-level factors: what every input side must be divisible by."""
    out = [1, 1, 1]
    for f in factors:
        out = [a * int(b) for a, b in zip(out, f)]
    return (out[0], out[1], out[2])


def em_unet(
    arch: str, classes: int, base_channels: int, levels: int | None, input_shape: Sequence[int], in_channels: int = 1
) -> nn.Module:
    """MONAI ``UNet`` (residual units, y/x halved at every level, z only at the last levels the
    crop depth allows) or ``BasicUNet`` (4 levels, all axes halved) for EM crops ``input_shape``."""
    if base_channels < 1:
        raise ConfigError(f"model.base_channels: must be >= 1, got {base_channels}")
    if arch == "basic_unet":
        if levels not in (None, 4):
            raise ConfigError(f"model.levels: basic_unet always has 4 levels; leave model.levels=null, got {levels}")
        from monai.networks.nets import BasicUNet

        check_divisible(input_shape, (16, 16, 16), "task.crop", "basic_unet halves every axis 4 times")
        b = base_channels
        return BasicUNet(
            spatial_dims=3, in_channels=in_channels, out_channels=classes, features=(b, b, 2 * b, 4 * b, 8 * b, b)
        )
    if arch != "unet3d":
        raise ConfigError(f"model.arch: on EM tasks must be unet3d or basic_unet, got {arch!r}")
    levels = unet_levels(levels)
    from monai.networks.nets import UNet

    factors = inplane_first_factors(input_shape, levels)
    check_divisible(
        input_shape,
        total_factor(factors),
        "task.crop",
        f"unet3d with model.levels={levels} halves the axes that often: change task.crop or model.levels",
    )
    return UNet(
        spatial_dims=3,
        in_channels=in_channels,
        out_channels=classes,
        channels=[base_channels * 2**i for i in range(levels + 1)],
        strides=cast(Sequence[int], factors),  # MONAI takes a (dz, dy, dx) per level; its hint says int
        num_res_units=2,
    )
