"""What the fitted Task 1 baselines share (PCA / NMF in ``decomposition.py``, texture in ``texture.py``):
a fixed embedding fitted once on the training split only, standardised with training statistics,
then a linear read-out trained by the usual Lightning loop.

The fit happens once at the start of ``trainer.fit`` (``on_fit_start``, after any checkpoint
restore) from ``datamodule.arrays["train"]``: validation and test tiles are never used for it.
Everything the embedding needs (the subclass's own buffers, the datamodule normalisation
``input_norm`` and the per-feature standardisation) is a buffer, so a checkpoint reproduces the
embedding exactly (``evaluate.py``) without a refit.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mtneuro_lab.errors import DataError
from mtneuro_lab.methods.base import ScoredMethod
from mtneuro_lab.metrics.classification import ClassificationMetrics

log = logging.getLogger(__name__)

#: training tiles embedded per chunk when computing the standardisation statistics
FIT_CHUNK = 512


class FittedEmbeddingClassifier(ScoredMethod):
    """Fixed embedding (fitted on training tiles) + standardisation + linear read-out.

    Subclasses set ``model_name`` (the ``model=`` name used in messages), pass ``embed_dim`` (and
    any buffers their embedding needs) positionally after the run's facts, and implement
    :meth:`raw_code`; those that learn something from the training tiles (PCA components) also
    override :meth:`fit_code`.
    """

    monitor = ("val/acc", "max")
    task_kinds = ("classification",)
    model_name = "embedding"
    # buffers (register_buffer): declared so that the type checker sees tensors, not Module attributes
    feat_mean: torch.Tensor
    feat_std: torch.Tensor
    input_norm: torch.Tensor
    fitted: torch.Tensor

    def __init__(
        self,
        num_classes: int,
        class_names: Sequence[str],
        input_shape: Sequence[int],
        embed_dim: int,
        embedding_buffers: Mapping[str, torch.Tensor] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(num_classes, class_names, input_shape, **kwargs)
        # the embedding's own buffers first: PCA/NMF checkpoints keep their key order
        for name, value in (embedding_buffers or {}).items():
            self.register_buffer(name, value)
        self.embed_dim = int(embed_dim)
        self.register_buffer("feat_mean", torch.zeros(embed_dim))
        self.register_buffer("feat_std", torch.ones(embed_dim))
        self.register_buffer("input_norm", torch.tensor([0.0, 1.0]))  # datamodule mean/std at fit time
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))
        self.readout = nn.Linear(embed_dim, self.num_classes)
        self.metrics = ClassificationMetrics(self.class_names)

    # -- the embedding --------------------------------------------------------------------------
    def raw_code(self, raw: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """Intensities in [0, 1] ``(B, 1, H, W)`` -> unstandardised features ``(B, embed_dim)``."""
        raise NotImplementedError

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised batch (as the datamodule hands it out) -> standardised embedding."""
        mean, std = self.input_norm[0], self.input_norm[1]
        code = self.raw_code(x * std + mean)
        return (code - self.feat_mean) / self.feat_std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.readout(self.embed(x))

    # -- fitting on the training split only -----------------------------------------------------
    def on_fit_start(self) -> None:
        if bool(self.fitted):
            return  # restored from a checkpoint
        dm = getattr(self.trainer, "datamodule", None)
        if dm is None or not hasattr(dm, "arrays"):
            raise DataError(f"model={self.model_name}: needs the run's datamodule to fit on the training split")
        self.fit_embedding(dm.arrays["train"].images, float(dm.mean), float(dm.std))

    def raw_tiles(self, images: np.ndarray) -> torch.Tensor:
        """uint8 tiles ``(N, H, W)`` -> intensities in [0, 1] ``(N, 1, H, W)`` on the model's device."""
        return torch.from_numpy(np.asarray(images)).to(self.feat_mean.device).float().div(255).unsqueeze(1)

    def fit_code(self, train_images: np.ndarray) -> None:
        """Learn what :meth:`raw_code` needs from uint8 training tiles (nothing by default)."""

    @torch.no_grad()
    def fit_embedding(self, train_images: np.ndarray, mean: float, std: float) -> None:
        """Fit on uint8 training tiles ``(N, H, W)``; store everything the embedding needs."""
        self.fit_code(train_images)
        self.input_norm.copy_(torch.tensor([mean, std]))
        n = len(train_images)
        codes = torch.cat(
            [self.raw_code(self.raw_tiles(train_images[s : s + FIT_CHUNK])) for s in range(0, n, FIT_CHUNK)]
        )
        self.feat_mean.copy_(codes.mean(0))
        self.feat_std.copy_(codes.std(0).clamp_min(1e-6))
        self.fitted.fill_(True)
        log.info("%s: %d-d embedding standardised on %d training tiles", self.model_name, self.embed_dim, n)

    # -- the read-out ---------------------------------------------------------------------------
    def optimizer_parameters(self) -> Any:
        return list(self.readout.parameters())

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        logits = self(batch["image"])
        loss = self.loss(logits, batch["target"])
        self.metrics.update("train", logits.detach(), batch["target"])
        self.log("train/loss", loss, prog_bar=True, batch_size=len(logits))
        return loss

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, target)

    def _eval_step(self, stage: str, batch: dict[str, Any]) -> None:
        if not bool(self.fitted):
            raise DataError(
                f"model={self.model_name}: the embedding is not fitted "
                "(train first, or pass a checkpoint of a trained run)"
            )
        super()._eval_step(stage, batch)
