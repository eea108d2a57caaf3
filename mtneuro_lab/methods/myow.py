"""MYOW, "Mine Your Own vieW" (Azabou et al. 2021): BYOL plus views mined from the data.

For every sample, the nearest neighbours (cosine, ``k`` of them, one picked at random) in the
target network's 512-d representation space are searched among a candidate pool: the other
samples of the batch (``pool=batch``) or a queue of recent target representations
(``pool=queue``); the sample itself (same tile index) is never a candidate. The online
network's prediction for a sample regresses the target projection of its mined neighbour
through a second projector/predictor pair; the mined loss weight ramps linearly from 0 to
``mined_weight`` over ``ramp_epochs``. ``model=myow_m`` (:mod:`.myow_m`) shares one
projector/predictor between augmented and mined views.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightly.models.modules.heads import BYOLPredictionHead, BYOLProjectionHead
from torch import nn

from mtneuro_lab.errors import ConfigError
from mtneuro_lab.methods.byol import BYOL, ViewOutputs
from mtneuro_lab.methods.ssl import make_target, regression_loss


def mine_neighbours(
    query: torch.Tensor,
    keys: torch.Tensor,
    k: int = 1,
    query_ids: torch.Tensor | None = None,
    key_ids: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Index into ``keys`` of one of the ``k`` cosine-nearest keys of every query row.

    Keys whose id equals the query's id (the same tile) are excluded. With ``k > 1`` one of the
    ``k`` neighbours is picked uniformly at random per query, as in MYOW.
    """
    sim = F.normalize(query, dim=1) @ F.normalize(keys, dim=1).T
    if query_ids is not None and key_ids is not None:
        sim = sim.masked_fill(query_ids[:, None] == key_ids[None, :], float("-inf"))
    k = min(k, keys.shape[0])
    top = sim.topk(k, dim=1).indices
    if k == 1:
        return top[:, 0]
    pick = torch.randint(0, k, (query.shape[0],), device=query.device, generator=generator)
    return top.gather(1, pick[:, None])[:, 0]


class RepresentationQueue(nn.Module):
    """FIFO of recent target representations and their tile ids (buffers: in checkpoints)."""

    keys: torch.Tensor
    ids: torch.Tensor
    ptr: torch.Tensor

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("keys", torch.zeros(size, dim))
        self.register_buffer("ids", torch.full((size,), -1, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    def filled(self) -> tuple[torch.Tensor, torch.Tensor]:
        valid = self.ids >= 0
        return self.keys[valid], self.ids[valid]

    @torch.no_grad()
    def push(self, keys: torch.Tensor, ids: torch.Tensor) -> None:
        size = self.keys.shape[0]
        keys, ids = keys[-size:], ids[-size:]
        slots = (self.ptr + torch.arange(len(ids), device=ids.device)) % size
        self.keys[slots] = keys.detach().to(self.keys.dtype)
        self.ids[slots] = ids
        self.ptr.copy_((self.ptr + len(ids)) % size)


class MYOW(BYOL):
    #: True: mined views use the same projector/predictor as augmented views (MYOW-merged)
    shares_heads = False

    def __init__(
        self,
        num_classes: int,
        class_names: Sequence[str],
        input_shape: Sequence[int],
        *,
        k: int = 1,
        pool: Literal["batch", "queue"] = "batch",
        queue_size: int = 4096,
        mined_weight: float = 0.1,
        ramp_epochs: float = 10.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(num_classes, class_names, input_shape, **kwargs)
        if k < 1:
            raise ConfigError(f"model.k: must be >= 1, got {k}")
        if pool not in ("batch", "queue"):
            raise ConfigError(f"model.pool: must be one of batch, queue, got {pool!r}")
        if queue_size < 1:
            raise ConfigError(f"model.queue_size: must be >= 1, got {queue_size}")
        if mined_weight < 0:
            raise ConfigError(f"model.mined_weight: must be >= 0, got {mined_weight}")
        if ramp_epochs < 0:
            raise ConfigError(f"model.ramp_epochs: must be >= 0, got {ramp_epochs}")
        self.k, self.candidate_pool = k, pool
        self.mined_weight, self.ramp_epochs = float(mined_weight), float(ramp_epochs)
        if not self.shares_heads:
            dim = self.encoder.out_dim
            self.projector_m = BYOLProjectionHead(dim, self.hidden_dim, self.proj_dim)
            self.predictor_m = BYOLPredictionHead(self.proj_dim, self.hidden_dim, self.proj_dim)
            self.target_projector_m = make_target(self.projector_m)
        self.queue = RepresentationQueue(queue_size, self.encoder.out_dim) if pool == "queue" else None

    def ema_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        pairs = super().ema_pairs()
        if not self.shares_heads:
            pairs.append((self.projector_m, self.target_projector_m))
        return pairs

    def mined_weight_at(self, step: int) -> float:
        """Linear ramp 0 -> ``mined_weight`` over ``ramp_epochs`` (in optimiser steps)."""
        if self.ramp_epochs == 0:
            return self.mined_weight
        return self.mined_weight * min(1.0, step / (self.ramp_epochs * self._steps_per_epoch))

    def _candidates(self, keys: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The pool searched for neighbours: this batch's keys, or the queue once it holds > k."""
        if self.queue is not None:
            qkeys, qids = self.queue.filled()
            if len(qids) > self.k:
                return qkeys, qids
        return keys, ids

    def mined_prediction(self, y: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        return p if self.shares_heads else self.predictor_m(self.projector_m(y))

    def mined_target(self, rep: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return (self.target_projector if self.shares_heads else self.target_projector_m)(rep)

    def mined_loss(self, out: ViewOutputs, ids: torch.Tensor) -> torch.Tensor:
        """Each view's online prediction vs the target projection of its neighbour (other view)."""
        losses = []
        for y, p, query, keys in ((out.y1, out.p1, out.ty1, out.ty2), (out.y2, out.p2, out.ty2, out.ty1)):
            pool_keys, pool_ids = self._candidates(keys, ids)
            nn_idx = mine_neighbours(query, pool_keys, self.k, ids, pool_ids)
            losses.append(regression_loss(self.mined_prediction(y, p), self.mined_target(pool_keys[nn_idx])))
        return 0.5 * (losses[0] + losses[1])

    def ssl_step(
        self, v1: torch.Tensor, v2: torch.Tensor, batch: dict[str, Any]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        out = self.forward_views(v1, v2)
        ids = batch["index"]
        byol = self.byol_loss(out)
        mined = self.mined_loss(out, ids)
        weight = self.mined_weight_at(self.global_step)
        if self.queue is not None:
            self.queue.push(out.ty2, ids)
        loss = byol + weight * mined
        return (
            loss,
            {
                "train/byol_loss": byol.detach(),
                "train/mined_loss": mined.detach(),
                "train/mined_weight": torch.tensor(weight),
            },
            out.y1,
        )
