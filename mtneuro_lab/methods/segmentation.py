"""Task 2: supervised microstructure segmentation, one LightningModule for 2D and 3D.

:class:`SegmentationMethod` holds everything but the network: loss (cross-entropy with optional
class weights, Dice, or both), pooled per-class F1/IoU (see :mod:`mtneuro_lab.metrics.segmentation`)
and the ``after_evaluate`` hook that writes overlays and the confusion matrix. The two config
entry points only build the net: :class:`SMPSegmentation` (2D, segmentation-models-pytorch) and
:class:`Volumetric3DSegmentation` (3D, MONAI / VNetLight).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mtneuro_lab.data import augment
from mtneuro_lab.errors import ConfigError
from mtneuro_lab.methods.base import ScoredMethod
from mtneuro_lab.metrics import overlays
from mtneuro_lab.metrics.segmentation import SegmentationMetrics
from mtneuro_lab.nets.segmentation import (
    SMP_MIN_SIZE,
    Net3DArch,
    SmpArch,
    check_divisible,
    net3d,
    net3d_reduction,
    smp_net,
    smp_reduction,
)

Loss = Literal["ce", "dice", "ce_dice"]


class SegmentationMethod(ScoredMethod):
    """Trains ``net`` (``(B, 1, *spatial)`` -> ``(B, C, *spatial)`` logits) on class masks."""

    metrics: SegmentationMetrics
    class_weight: torch.Tensor | None  # a buffer (None: unweighted cross-entropy)

    task_kinds = ("segmentation",)
    monitor = ("val/iou_mean", "max")

    def __init__(
        self,
        num_classes: int,
        class_names: Sequence[str],
        input_shape: Sequence[int],
        net: nn.Module,
        *,
        loss: Loss = "ce",
        class_weights: list[float] | None = None,
        overlay_samples: int = 3,
        **kwargs: Any,
    ) -> None:
        super().__init__(num_classes, class_names, input_shape, **kwargs)
        if loss not in ("ce", "dice", "ce_dice"):
            raise ConfigError(f"model.loss: must be one of ce, dice, ce_dice, got {loss!r}")
        if class_weights is not None:
            if len(class_weights) != self.num_classes or any(w < 0 for w in class_weights):
                raise ConfigError(
                    f"model.class_weights: need {self.num_classes} non-negative weights "
                    f"(one per class: {', '.join(self.class_names)}), got {list(class_weights)}"
                )
            if loss == "dice":
                raise ConfigError("model.class_weights: only used by loss=ce or ce_dice, not dice")
        if overlay_samples < 0:
            raise ConfigError(f"model.overlay_samples: must be >= 0, got {overlay_samples}")
        self.net = net
        self.loss_name = loss
        weight = torch.tensor(class_weights, dtype=torch.float32) if class_weights is not None else None
        self.register_buffer("class_weight", weight, persistent=False)
        self.dice = None
        if loss in ("dice", "ce_dice"):
            from monai.losses import DiceLoss

            self.dice = DiceLoss(include_background=True, to_onehot_y=True, softmax=True)
        self.overlay_samples = overlay_samples
        self.metrics = SegmentationMetrics(self.class_names)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        total = logits.new_zeros(())
        if self.loss_name in ("ce", "ce_dice"):
            total = total + F.cross_entropy(logits, target, weight=self.class_weight)
        if self.dice is not None:
            total = total + self.dice(logits, target.unsqueeze(1))
        return total

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        logits = self(batch["image"])
        loss = self.loss(logits, batch["target"])
        self.log("train/loss", loss, prog_bar=True, batch_size=len(logits))
        self.metrics.update("train", logits.detach(), batch["target"])
        return loss

    # -- evaluate.py: overlays and confusion matrix ---------------------------------------------
    @torch.no_grad()
    def predict_arrays(self, images: np.ndarray, mean: float, std: float, batch: int = 4) -> np.ndarray:
        """Class masks for uint8 samples ``(N, *spatial)``, in eval mode on this module's device."""
        was_training = self.training
        self.eval()
        out = []
        for s in range(0, len(images), batch):
            x = augment.to_float(torch.from_numpy(images[s : s + batch]).to(self.device), mean, std)
            out.append(self(x).argmax(dim=1).to(torch.uint8).cpu().numpy())
        self.train(was_training)
        return np.concatenate(out) if out else np.empty((0, *images.shape[1:]), np.uint8)

    def after_evaluate(self, datamodule: Any, run_dir: Path) -> dict[str, float]:
        """Write ``overlays/<region>.png`` and ``confusion_matrix.{csv,png}`` into ``run_dir``."""
        if self.trainer is not None and not self.trainer.is_global_zero:
            return {}
        if "test" in self.metrics.last_confusion:
            overlays.write_confusion(self.metrics.last_confusion["test"].numpy(), self.class_names, run_dir)
        arrays = datamodule.arrays.get("test")
        if arrays is None or self.overlay_samples == 0:
            return {}
        regions = list(datamodule.task.catalog.regions) if datamodule.task.catalog is not None else []
        for r in np.unique(arrays.regions):
            rows = np.flatnonzero(arrays.regions == r)
            pick = rows[np.linspace(0, len(rows) - 1, min(self.overlay_samples, len(rows))).round().astype(int)]
            preds = self.predict_arrays(arrays.images[pick], datamodule.mean, datamodule.std)
            name = regions[int(r)] if 0 <= int(r) < len(regions) else f"region{int(r)}"
            overlays.write_overlays(
                arrays.images[pick],
                arrays.targets[pick],
                preds,
                arrays.z[pick],
                self.class_names,
                run_dir / "overlays" / f"{name}.png",
                title=name,
            )
        return {}


def _spatial(input_shape: Sequence[int], dims: int, model: str) -> tuple[int, ...]:
    shape = tuple(int(s) for s in input_shape)
    if len(shape) != dims:
        other = "seg3d_3class/seg3d_4class" if dims == 3 else "seg2d_3class/seg2d_4class/isbi2012"
        raise ConfigError(
            f"model={model}: is a {dims}D model but the task's samples are {'x'.join(map(str, shape))} "
            f"({len(shape)}D); use a {dims}D task ({other})"
        )
    return shape


class SMPSegmentation(SegmentationMethod):
    """2D segmentation with a segmentation-models-pytorch architecture (1 input channel)."""

    def __init__(
        self,
        num_classes: int,
        class_names: Sequence[str],
        input_shape: Sequence[int],
        *,
        arch: SmpArch = "unet",
        encoder_name: str = "efficientnet-b7",
        encoder_weights: Literal["imagenet"] | None = None,
        encoder_depth: int | None = None,
        **kwargs: Any,
    ) -> None:
        shape = _spatial(input_shape, 2, arch)
        if encoder_depth is not None and not 3 <= encoder_depth <= 5:
            raise ConfigError(f"model.encoder_depth: must be 3, 4, 5 or null, got {encoder_depth}")
        if min(shape) < SMP_MIN_SIZE.get(arch, 0):
            raise ConfigError(
                f"task.downsample: model {arch} needs samples of at least {SMP_MIN_SIZE[arch]}x"
                f"{SMP_MIN_SIZE[arch]}, got {shape[0]}x{shape[1]}; use a smaller task.downsample"
            )
        factor = smp_reduction(arch, encoder_depth)
        check_divisible(
            shape,
            (factor, factor),
            "task.downsample",
            f"model {arch} reduces by {factor}: use a smaller task.downsample or model.encoder_depth",
        )
        net = smp_net(arch, encoder_name, encoder_weights, num_classes, encoder_depth)
        super().__init__(num_classes, class_names, input_shape, net, **kwargs)


class Volumetric3DSegmentation(SegmentationMethod):
    """3D segmentation of ``task.volume_z``-slice stacks: MONAI UNet / HighResNet or VNetLight.

    ``levels`` (how often the net halves every axis) applies to unet3d and vnet_light; HighResNet
    keeps full resolution and gets its receptive field from dilated convolutions.
    """

    def __init__(
        self,
        num_classes: int,
        class_names: Sequence[str],
        input_shape: Sequence[int],
        *,
        arch: Net3DArch = "unet3d",
        base_channels: int = 16,
        levels: int | None = None,
        **kwargs: Any,
    ) -> None:
        shape = _spatial(input_shape, 3, arch)
        if base_channels < 1:
            raise ConfigError(f"model.base_channels: must be >= 1, got {base_channels}")
        if arch == "highresnet" and levels is not None:
            raise ConfigError("model.levels: highresnet does not downsample; leave model.levels=null")
        levels = 3 if levels is None else levels
        if not 1 <= levels <= 5:
            raise ConfigError(f"model.levels: must be in 1..5, got {levels}")
        factor = net3d_reduction(arch, levels)
        check_divisible(
            shape,
            (factor,) * 3,
            "task.volume_z/task.downsample",
            f"model {arch} with model.levels={levels} halves every axis {levels} times: "
            f"use task.volume_z a multiple of {factor} or fewer model.levels",
        )
        net = net3d(arch, num_classes, base_channels, levels)
        super().__init__(num_classes, class_names, input_shape, net, **kwargs)
