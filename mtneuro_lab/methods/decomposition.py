"""PCA / NMF baselines for Task 1 (``model=pca``, ``model=nmf``): a 256-d linear (PCA) or
non-negative (NMF) embedding of flattened tiles, fitted with scikit-learn on the training split
only, then a linear read-out trained by the usual loop.

The fit happens once at the start of ``trainer.fit`` (``on_fit_start``, after any checkpoint
restore) from ``datamodule.arrays["train"]``: validation and test tiles are never passed to
scikit-learn. Components, the pixel mean and the per-component standardisation are stored as
buffers, so a checkpoint reproduces the embedding exactly (``evaluate.py``) without sklearn.

NMF embeds a batch by the same multiplicative updates with fixed components that scikit-learn's
``NMF(solver="mu").transform`` runs (tested against it), started per tile so a tile's embedding
does not depend on its batch-mates.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.decomposition import NMF, PCA
from torch import nn

from mtneuro_lab.errors import ConfigError, DataError
from mtneuro_lab.methods.base import ScoredMethod
from mtneuro_lab.methods.optim import OptimizerConfig, SchedulerConfig
from mtneuro_lab.metrics.classification import ClassificationMetrics

log = logging.getLogger(__name__)

#: scikit-learn's guard against division by zero in the multiplicative updates
_EPS = float(np.finfo(np.float32).eps)


def nmf_transform(x: torch.Tensor, components: torch.Tensor, iterations: int) -> torch.Tensor:
    """Non-negative codes ``W`` of rows ``x`` for fixed ``components`` H (Frobenius loss, "mu")."""
    k = components.shape[0]
    w = torch.sqrt(x.mean(dim=1, keepdim=True).clamp_min(0) / k).expand(-1, k).clone()
    xht = x @ components.T
    hht = components @ components.T
    for _ in range(iterations):
        denom = w @ hht
        denom = torch.where(denom == 0, torch.full_like(denom, _EPS), denom)
        w = w * (xht / denom)
    return w


class DecompositionClassifier(ScoredMethod):
    monitor = ("val/acc", "max")
    task_kinds = ("classification",)

    def __init__(self, num_classes: int, class_names: Sequence[str], input_shape: Sequence[int],
                 optimizer: OptimizerConfig | Mapping | None = None,
                 scheduler: SchedulerConfig | Mapping | None = None,
                 kind: Literal["pca", "nmf"] = "pca", n_components: int = 256, pool: int = 1,
                 max_fit_samples: int = 4096, max_iter: int = 200, fit_seed: int = 0) -> None:
        super().__init__(num_classes, class_names, input_shape, optimizer, scheduler)
        if kind not in ("pca", "nmf"):
            raise ConfigError(f"model.kind: must be one of pca, nmf, got {kind!r}")
        h, w = self.input_shape[-2:]
        if pool < 1 or h % pool or w % pool:
            raise ConfigError(f"model.pool: must be >= 1 and divide the {h}x{w} tiles, got {pool}")
        dim = (h // pool) * (w // pool)
        if not 1 <= n_components <= dim:
            raise ConfigError(f"model.n_components: must be in [1, {dim}] (pixels per pooled tile), "
                              f"got {n_components}")
        if max_fit_samples < n_components:
            raise ConfigError(f"model.max_fit_samples: must be >= n_components ({n_components}), "
                              f"got {max_fit_samples}")
        if max_iter < 1:
            raise ConfigError(f"model.max_iter: must be >= 1, got {max_iter}")
        self.kind, self.n_components, self.pool = kind, n_components, pool
        self.max_fit_samples, self.max_iter, self.fit_seed = max_fit_samples, max_iter, fit_seed
        self.register_buffer("pixel_mean", torch.zeros(dim))
        self.register_buffer("components", torch.zeros(n_components, dim))
        self.register_buffer("feat_mean", torch.zeros(n_components))
        self.register_buffer("feat_std", torch.ones(n_components))
        self.register_buffer("input_norm", torch.tensor([0.0, 1.0]))  # datamodule mean/std at fit time
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))
        self.readout = nn.Linear(n_components, self.num_classes)
        self.metrics = ClassificationMetrics(self.class_names)

    # -- the embedding --------------------------------------------------------------------------
    def _pixels(self, raw: torch.Tensor) -> torch.Tensor:
        """Intensities in [0, 1] ``(B, 1, H, W)`` -> pooled, flattened rows ``(B, dim)``."""
        if self.pool > 1:
            raw = F.avg_pool2d(raw, self.pool)
        return raw.flatten(1)

    def _code(self, rows: torch.Tensor) -> torch.Tensor:
        if self.kind == "pca":
            return (rows - self.pixel_mean) @ self.components.T
        return nmf_transform(rows.clamp_min(0), self.components, self.max_iter)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised batch (as the datamodule hands it out) -> standardised 256-d embedding."""
        mean, std = self.input_norm[0], self.input_norm[1]
        code = self._code(self._pixels(x * std + mean))
        return (code - self.feat_mean) / self.feat_std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.readout(self.embed(x))

    # -- fitting on the training split only -----------------------------------------------------
    def on_fit_start(self) -> None:
        if bool(self.fitted):
            return  # restored from a checkpoint
        dm = getattr(self.trainer, "datamodule", None)
        if dm is None or not hasattr(dm, "arrays"):
            raise DataError(f"model={self.kind}: needs the run's datamodule to fit on the training split")
        self.fit_decomposition(dm.arrays["train"].images, float(dm.mean), float(dm.std))

    @torch.no_grad()
    def fit_decomposition(self, train_images: np.ndarray, mean: float, std: float) -> None:
        """Fit on uint8 training tiles ``(N, H, W)``; store everything the embedding needs."""
        n = len(train_images)
        if n < self.n_components:
            raise DataError(f"model.n_components: {self.n_components} components need at least as many "
                            f"training tiles, the training split has {n}")
        rng = np.random.default_rng(self.fit_seed)
        chosen = np.sort(rng.choice(n, self.max_fit_samples, replace=False)) if n > self.max_fit_samples else None
        device = self.components.device

        def to_rows(imgs: np.ndarray) -> torch.Tensor:
            return self._pixels(torch.from_numpy(np.asarray(imgs)).to(device).float().div(255).unsqueeze(1))

        rows = to_rows(train_images if chosen is None else train_images[chosen]).cpu().numpy()
        if self.kind == "pca":
            model = PCA(self.n_components, random_state=self.fit_seed).fit(rows)
            self.pixel_mean.copy_(torch.from_numpy(model.mean_).float())
        else:
            model = NMF(self.n_components, init="nndsvda", solver="mu", max_iter=self.max_iter,
                        random_state=self.fit_seed).fit(rows)
        self.components.copy_(torch.from_numpy(model.components_).float())
        self.input_norm.copy_(torch.tensor([mean, std]))
        codes = torch.cat([self._code(to_rows(train_images[s : s + 512])) for s in range(0, n, 512)])
        self.feat_mean.copy_(codes.mean(0))
        self.feat_std.copy_(codes.std(0).clamp_min(1e-6))
        self.fitted.fill_(True)
        log.info("%s: %d components fitted on %d training tiles of %d pixels", self.kind.upper(),
                 self.n_components, len(rows), rows.shape[1])

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
            raise DataError(f"model={self.kind}: the decomposition is not fitted (train first, or pass a "
                            "checkpoint of a trained run)")
        super()._eval_step(stage, batch)
