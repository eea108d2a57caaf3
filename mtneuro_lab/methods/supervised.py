"""Supervised ResNet-18 region classifier (Task 1), optionally trained with mixup.

``mixup_prob`` is the probability that a training batch is mixed (the paper sweeps 0.01, 0.1,
0.3, 0.5, 0.7); 0 is plain supervised training.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mtneuro_lab.data import augment
from mtneuro_lab.errors import ConfigError
from mtneuro_lab.methods.base import ScoredMethod
from mtneuro_lab.metrics.classification import ClassificationMetrics
from mtneuro_lab.nets.resnet import ResNet18Encoder, Stem


class SupervisedClassifier(ScoredMethod):
    monitor = ("val/acc", "max")

    def __init__(
        self,
        num_classes: int,
        class_names: Sequence[str],
        input_shape: Sequence[int],
        *,
        stem: Stem = "auto",
        width: int = 64,
        dropout: float = 0.2,
        mixup_prob: float = 0.0,
        mixup_alpha: float = 1.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(num_classes, class_names, input_shape, **kwargs)
        if not 0 <= dropout < 1:
            raise ConfigError(f"model.dropout: must be in [0, 1), got {dropout}")
        if not 0 <= mixup_prob <= 1:
            raise ConfigError(f"model.mixup_prob: must be in [0, 1], got {mixup_prob}")
        if mixup_alpha <= 0:
            raise ConfigError(f"model.mixup_alpha: must be > 0, got {mixup_alpha}")
        self.encoder = ResNet18Encoder(in_channels=1, stem=stem, tile_size=min(self.input_shape[-2:]), width=width)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.encoder.out_dim, self.num_classes))
        self.mixup_prob = mixup_prob
        self.mixup_alpha = mixup_alpha
        self.metrics = ClassificationMetrics(self.class_names)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        x, y = batch["image"], batch["target"]
        if self.mixup_prob > 0 and torch.rand(()) < self.mixup_prob:
            onehot = F.one_hot(y, self.num_classes).float()
            x, soft = augment.mixup(x, onehot, self.mixup_alpha)
            logits = self(x)
            loss = torch.sum(-soft * F.log_softmax(logits, dim=1), dim=1).mean()
        else:
            logits = self(x)
            loss = self.loss(logits, y)
            self.metrics.update("train", logits.detach(), y)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(y))
        return loss

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, target)
