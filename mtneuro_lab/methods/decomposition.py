"""PCA / NMF baselines for Task 1 (``model=pca``, ``model=nmf``): a 256-d linear (PCA) or
non-negative (NMF) embedding of flattened tiles, fitted with scikit-learn on the training split
only, then a linear read-out trained by the usual loop.

Fitting, standardisation, checkpointed buffers and the read-out come from
:class:`~mtneuro_lab.methods.fitted.FittedEmbeddingClassifier`: validation and test tiles are
never passed to scikit-learn, and components and pixel mean are buffers, so a checkpoint
reproduces the embedding exactly (``evaluate.py``) without sklearn.

NMF embeds a batch by the same multiplicative updates with fixed components that scikit-learn's
``NMF(solver="mu").transform`` runs (tested against it), started per tile so a tile's embedding
does not depend on its batch-mates.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.decomposition import NMF, PCA

from mtneuro_lab.errors import ConfigError, DataError
from mtneuro_lab.methods.fitted import FittedEmbeddingClassifier

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


class DecompositionClassifier(FittedEmbeddingClassifier):
    """PCA / NMF components of the flattened (optionally pooled) tiles + a linear read-out."""

    # buffers (passed up as ``embedding_buffers``), declared for the type checker
    pixel_mean: torch.Tensor
    components: torch.Tensor

    def __init__(
        self,
        num_classes: int,
        class_names: Sequence[str],
        input_shape: Sequence[int],
        *,
        kind: Literal["pca", "nmf"] = "pca",
        n_components: int = 256,
        pool: int = 1,
        max_fit_samples: int = 4096,
        max_iter: int = 200,
        fit_seed: int = 0,
        **kwargs: Any,
    ) -> None:
        if kind not in ("pca", "nmf"):
            raise ConfigError(f"model.kind: must be one of pca, nmf, got {kind!r}")
        h, w = tuple(int(s) for s in input_shape)[-2:]
        if pool < 1 or h % pool or w % pool:
            raise ConfigError(f"model.pool: must be >= 1 and divide the {h}x{w} tiles, got {pool}")
        dim = (h // pool) * (w // pool)
        if not 1 <= n_components <= dim:
            raise ConfigError(f"model.n_components: must be in [1, {dim}] (pixels per pooled tile), got {n_components}")
        if max_fit_samples < n_components:
            raise ConfigError(f"model.max_fit_samples: must be >= n_components ({n_components}), got {max_fit_samples}")
        if max_iter < 1:
            raise ConfigError(f"model.max_iter: must be >= 1, got {max_iter}")
        buffers = {"pixel_mean": torch.zeros(dim), "components": torch.zeros(n_components, dim)}
        super().__init__(num_classes, class_names, input_shape, n_components, buffers, **kwargs)
        self.model_name = self.decomposition = kind  # model=pca / model=nmf
        self.n_components, self.pool_factor = n_components, pool
        self.max_fit_samples, self.max_iter, self.fit_seed = max_fit_samples, max_iter, fit_seed

    # -- the embedding --------------------------------------------------------------------------
    def _pixels(self, raw: torch.Tensor) -> torch.Tensor:
        """Intensities in [0, 1] ``(B, 1, H, W)`` -> pooled, flattened rows ``(B, dim)``."""
        if self.pool_factor > 1:
            raw = F.avg_pool2d(raw, self.pool_factor)
        return raw.flatten(1)

    def _code(self, rows: torch.Tensor) -> torch.Tensor:
        if self.decomposition == "pca":
            return (rows - self.pixel_mean) @ self.components.T
        return nmf_transform(rows.clamp_min(0), self.components, self.max_iter)

    def raw_code(self, raw: torch.Tensor) -> torch.Tensor:
        return self._code(self._pixels(raw))

    # -- fitting on the training split only -----------------------------------------------------
    @torch.no_grad()
    def fit_code(self, train_images: np.ndarray) -> None:
        """scikit-learn fit on (at most ``max_fit_samples``) uint8 training tiles ``(N, H, W)``."""
        n = len(train_images)
        if n < self.n_components:
            raise DataError(
                f"model.n_components: {self.n_components} components need at least as many "
                f"training tiles, the training split has {n}"
            )
        rng = np.random.default_rng(self.fit_seed)
        chosen = np.sort(rng.choice(n, self.max_fit_samples, replace=False)) if n > self.max_fit_samples else None
        imgs = train_images if chosen is None else train_images[chosen]
        rows = self._pixels(self.raw_tiles(imgs)).cpu().numpy()
        model: PCA | NMF
        if self.decomposition == "pca":
            model = PCA(self.n_components, random_state=self.fit_seed).fit(rows)
            self.pixel_mean.copy_(torch.from_numpy(model.mean_).float())
        else:
            model = NMF(
                self.n_components, init="nndsvda", solver="mu", max_iter=self.max_iter, random_state=self.fit_seed
            ).fit(rows)
        self.components.copy_(torch.from_numpy(model.components_).float())
        log.info(
            "%s: %d components fitted on %d training tiles of %d pixels",
            self.decomposition.upper(),
            self.n_components,
            len(rows),
            rows.shape[1],
        )

    def fit_decomposition(self, train_images: np.ndarray, mean: float, std: float) -> None:
        """Components, normalisation and standardisation from uint8 training tiles (Task 3 calls it too)."""
        self.fit_embedding(train_images, mean, std)
