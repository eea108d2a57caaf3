"""BYOL (Grill et al. 2020) on ResNet-18 for Task 1: online encoder + projector + predictor
regress the EMA target's projection of the other view, symmetric ``2 - 2 cos`` loss.

Heads are lightly's ``BYOLProjectionHead`` / ``BYOLPredictionHead`` (Linear-BN-ReLU-Linear);
views, EMA schedule, online probe and linear evaluation come from :class:`SSLMethod`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from lightly.models.modules.heads import BYOLPredictionHead, BYOLProjectionHead
from torch import nn

from mtneuro_lab.errors import ConfigError
from mtneuro_lab.methods.ssl import SSLMethod, make_target, regression_loss


@dataclass
class ViewOutputs:
    """Everything one BYOL forward computes for the two views (``t*`` = target, no gradient)."""

    y1: torch.Tensor  # online representations (512-d)
    y2: torch.Tensor
    p1: torch.Tensor  # online predictions
    p2: torch.Tensor
    ty1: torch.Tensor  # target representations
    ty2: torch.Tensor
    tz1: torch.Tensor  # target projections
    tz2: torch.Tensor


class BYOL(SSLMethod):
    def __init__(
        self,
        num_classes: int,
        class_names: Sequence[str],
        input_shape: Sequence[int],
        *,
        hidden_dim: int = 4096,
        proj_dim: int = 256,
        **kwargs: Any,
    ) -> None:
        super().__init__(num_classes, class_names, input_shape, **kwargs)
        if hidden_dim < 1 or proj_dim < 1:
            raise ConfigError(f"model.hidden_dim/proj_dim: must be >= 1, got {hidden_dim} and {proj_dim}")
        self.hidden_dim, self.proj_dim = hidden_dim, proj_dim  # MYOW's mined-view heads have the same widths
        dim = self.encoder.out_dim
        self.projector = BYOLProjectionHead(dim, hidden_dim, proj_dim)
        self.predictor = BYOLPredictionHead(proj_dim, hidden_dim, proj_dim)
        self.target_encoder = make_target(self.encoder)
        self.target_projector = make_target(self.projector)

    def ema_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.encoder, self.target_encoder), (self.projector, self.target_projector)]

    def forward_views(self, v1: torch.Tensor, v2: torch.Tensor) -> ViewOutputs:
        y1, y2 = self.encoder(v1), self.encoder(v2)
        p1, p2 = self.predictor(self.projector(y1)), self.predictor(self.projector(y2))
        with torch.no_grad():
            ty1, ty2 = self.target_encoder(v1), self.target_encoder(v2)
            tz1, tz2 = self.target_projector(ty1), self.target_projector(ty2)
        return ViewOutputs(y1, y2, p1, p2, ty1, ty2, tz1, tz2)

    @staticmethod
    def byol_loss(out: ViewOutputs) -> torch.Tensor:
        return 0.5 * (regression_loss(out.p1, out.tz2) + regression_loss(out.p2, out.tz1))

    def ssl_step(
        self, v1: torch.Tensor, v2: torch.Tensor, batch: dict[str, Any]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        out = self.forward_views(v1, v2)
        loss = self.byol_loss(out)
        return loss, {"train/byol_loss": loss.detach()}, out.y1
