"""Segmentation metrics pooled over a whole stage (split), not averaged per image.

One torchmetrics ``MulticlassConfusionMatrix`` per stage accumulates pixel (voxel) counts over
every batch of the split (and over DDP ranks, which torchmetrics syncs). Per-class F1 (Dice) and
IoU (Jaccard) are both derived from that one pooled matrix, so ``IoU = F1 / (2 - F1)`` holds
exactly per class. Averaging IoU per image instead (the trap in the original code) gives a
different, image-size- and class-presence-dependent number.

A class with no pixel in the truth and none in the prediction has undefined F1/IoU: it is
reported as NaN and left out of the unweighted class means (``f1_mean``/``iou_mean``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
from torch import nn
from torchmetrics.classification import MulticlassConfusionMatrix


def scores_from_confusion(confusion: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-class ``f1``, ``iou`` and overall pixel ``acc`` from a (truth x prediction) count matrix."""
    cm = confusion.to(torch.float64)
    tp = cm.diagonal()
    fp = cm.sum(dim=0) - tp
    fn = cm.sum(dim=1) - tp
    union = tp + fp + fn
    nan = torch.full_like(tp, float("nan"))
    defined = union > 0
    f1 = torch.where(defined, 2 * tp / (2 * tp + fp + fn).clamp_min(1), nan)
    iou = torch.where(defined, tp / union.clamp_min(1), nan)
    acc = tp.sum() / cm.sum().clamp_min(1)
    return {"f1": f1, "iou": iou, "acc": acc}


def nanmean(values: torch.Tensor) -> torch.Tensor:
    """Mean over defined (non-NaN) entries; NaN if none is defined."""
    ok = ~torch.isnan(values)
    return values[ok].mean() if ok.any() else values.new_tensor(float("nan"))


class SegmentationMetrics(nn.Module):
    """Pooled confusion matrix per stage; ``compute`` logs ``<stage>/{f1,iou}_<class>`` and means."""

    def __init__(self, class_names: Sequence[str]) -> None:
        super().__init__()
        self.class_names = list(class_names)
        n = len(self.class_names)
        # keys are "<stage>_" because nn.Module already has an attribute named "train"
        self.stages = nn.ModuleDict(
            {f"{s}_": MulticlassConfusionMatrix(num_classes=n, validate_args=False) for s in ("train", "val", "test")}
        )
        #: the last computed (truth x prediction) count matrix per stage, for reports and plots
        self.last_confusion: dict[str, torch.Tensor] = {}

    def __getitem__(self, stage: str) -> MulticlassConfusionMatrix:
        # nn.ModuleDict is typed as holding any Module; this one holds only confusion matrices
        return cast(MulticlassConfusionMatrix, self.stages[f"{stage}_"])

    def update(self, stage: str, logits: torch.Tensor, target: torch.Tensor) -> None:
        """``logits`` ``(B, C, *spatial)``, ``target`` ``(B, *spatial)`` class indices."""
        preds = logits.argmax(dim=1)
        self[stage].update(preds.reshape(-1), target.reshape(-1))

    def has_data(self, stage: str) -> bool:
        return bool(self[stage].update_called)

    def names(self, stage: str) -> list[str]:
        """The keys :meth:`compute` returns for ``stage`` (known before any data is seen)."""
        return [f"{stage}/acc", *(f"{stage}/{kind}_{n}" for kind in ("f1", "iou") for n in (*self.class_names, "mean"))]

    def compute(self, stage: str) -> dict[str, torch.Tensor]:
        confusion = self[stage].compute()
        self[stage].reset()
        self.last_confusion[stage] = confusion.detach().cpu()
        scores = scores_from_confusion(confusion)
        out = {f"{stage}/acc": scores["acc"]}
        for kind in ("f1", "iou"):
            for name, value in zip(self.class_names, scores[kind]):
                out[f"{stage}/{kind}_{name}"] = value
            out[f"{stage}/{kind}_mean"] = nanmean(scores[kind])
        return {k: v.to(torch.float32) for k, v in out.items()}
