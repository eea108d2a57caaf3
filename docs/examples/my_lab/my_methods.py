"""A method class that lives outside the package (docs/user_configs.md): a small CNN for Task 1.

The conventions are those of a method inside the package (docs/contributing.md, "Add a method"):
the facts the run injects (``num_classes``, ``class_names``, ``input_shape``) positionally, its
own options keyword-only, the inherited ones (``optimizer``, ``scheduler``) passed up with
``**kwargs``; :class:`mtneuro_lab.methods.base.ScoredMethod` adds the validation/test steps and
the pooled ``val/acc`` the run's checkpointing selects by.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mtneuro_lab.errors import ConfigError
from mtneuro_lab.methods.base import ScoredMethod
from mtneuro_lab.metrics.classification import ClassificationMetrics


class SmallCNN(ScoredMethod):
    """``depth`` blocks of conv-BN-ReLU-pool, global average pooling, a linear head."""

    monitor = ("val/acc", "max")

    def __init__(
        self,
        num_classes: int,
        class_names: Sequence[str],
        input_shape: Sequence[int],
        *,
        width: int = 16,
        depth: int = 3,
        **kwargs: Any,  # optimizer, scheduler: BaseMethod's options
    ) -> None:
        super().__init__(num_classes, class_names, input_shape, **kwargs)
        if width < 1 or depth < 1:
            raise ConfigError(f"model.width/model.depth: must be >= 1, got {width}/{depth}")
        layers: list[nn.Module] = []
        channels = 1
        for i in range(depth):
            out = width * 2**i
            layers += [nn.Conv2d(channels, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU(), nn.MaxPool2d(2)]
            channels = out
        self.encoder = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(channels, self.num_classes)
        self.metrics = ClassificationMetrics(self.class_names)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, target)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        logits = self(batch["image"])
        loss = self.loss(logits, batch["target"])
        self.metrics.update("train", logits.detach(), batch["target"])
        self.log("train/loss", loss, prog_bar=True, batch_size=len(logits))
        return loss
