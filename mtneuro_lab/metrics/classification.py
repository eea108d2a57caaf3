"""Classification metrics per stage, logged as ``<stage>/acc`` and ``<stage>/acc_<class>``.

The stage's pooled confusion matrix is kept after each ``compute`` (``last_confusion``) for
figures (the media callback), not logged as a metric.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
from torch import nn
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix


class ClassificationMetrics(nn.Module):
    """Overall accuracy (micro) and per-class accuracy (recall), pooled over the whole stage."""

    def __init__(self, class_names: Sequence[str], prefix: str = "") -> None:
        super().__init__()
        n = len(class_names)
        self.class_names = list(class_names)
        self.prefix = prefix
        # keys are "<stage>_" because nn.Module already has an attribute named "train"
        self.stages = nn.ModuleDict(
            {
                f"{stage}_": nn.ModuleDict(
                    {
                        "acc": MulticlassAccuracy(num_classes=n, average="micro"),
                        "per_class": MulticlassAccuracy(num_classes=n, average="none"),
                        "confusion": MulticlassConfusionMatrix(num_classes=n),
                    }
                )
                for stage in ("train", "val", "test")
            }
        )
        #: the last computed (truth x prediction) count matrix per stage, for figures
        self.last_confusion: dict[str, torch.Tensor] = {}

    def __getitem__(self, stage: str) -> dict[str, MulticlassAccuracy]:
        # nn.ModuleDict is typed as holding any Module; this one holds only the two accuracies
        return cast(dict[str, MulticlassAccuracy], self.stages[f"{stage}_"])

    def has_data(self, stage: str) -> bool:
        return bool(self[stage]["acc"].update_called)

    def update(self, stage: str, logits: torch.Tensor, target: torch.Tensor) -> None:
        preds = logits.argmax(dim=1)
        for metric in self[stage].values():
            metric.update(preds, target)

    def names(self, stage: str) -> list[str]:
        """The keys :meth:`compute` returns for ``stage`` (known before any data is seen)."""
        return [f"{stage}/{self.prefix}acc", *(f"{stage}/{self.prefix}acc_{n}" for n in self.class_names)]

    def compute(self, stage: str) -> dict[str, torch.Tensor]:
        metrics = self[stage]
        out = {f"{stage}/{self.prefix}acc": metrics["acc"].compute()}
        per_class = metrics["per_class"].compute()
        for name, value in zip(self.class_names, per_class):
            out[f"{stage}/{self.prefix}acc_{name}"] = value
        self.last_confusion[stage] = metrics["confusion"].compute().detach().cpu()
        for metric in metrics.values():
            metric.reset()
        return out
