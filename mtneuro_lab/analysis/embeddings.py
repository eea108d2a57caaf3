"""Embeddings of image samples from a frozen method, and UMAP pictures of them.

A method exposes either ``embed(x) -> (B, D)`` (decompositions such as PCA/NMF) or an
``encoder`` module (every Task 1 network: supervised, mixup, BYOL, MYOW, MYOW-m) taking the
normalised float batch ``(B, 1, H, W)`` the datamodule would produce.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mtneuro_lab.data import augment
from mtneuro_lab.errors import ConfigError
from mtneuro_lab.media import MediaItem, save_pngs
from mtneuro_lab.metrics import figures

log = logging.getLogger(__name__)


def embedding_fn(method: Any, model_name: str = "model") -> Callable[[torch.Tensor], torch.Tensor]:
    """The method's frozen feature map; ConfigError if it has none."""
    embed = getattr(method, "embed", None)
    if callable(embed):
        return embed
    encoder = getattr(method, "encoder", None)
    if isinstance(encoder, torch.nn.Module):
        return encoder
    raise ConfigError(
        f"model={model_name}: has neither an `encoder` module nor an `embed()` method, "
        f"so there is nothing to read semantic features from"
    )


def split_tiles(images: np.ndarray, grid: int) -> np.ndarray:
    """``(N, H, W)`` -> ``(N * grid**2, H/grid, W/grid)``, sub-tiles row-major (TL, TR, BL, BR)."""
    if grid == 1:
        return images
    n, h, w = images.shape
    if h % grid or w % grid:
        raise ConfigError(f"task.sample_unit: {h}x{w} images do not split into a {grid}x{grid} grid")
    blocks = images.reshape(n, grid, h // grid, grid, w // grid).transpose(0, 1, 3, 2, 4)
    return np.ascontiguousarray(blocks.reshape(n * grid * grid, h // grid, w // grid))


@torch.inference_mode()
def embed_images(
    method: Any, images: np.ndarray, mean: float, std: float, batch_size: int = 256, model_name: str = "model"
) -> np.ndarray:
    """Embeddings ``(N, D)`` float64 of uint8 ``images`` ``(N, H, W)``, method in eval mode."""
    fn = embedding_fn(method, model_name)
    if isinstance(method, torch.nn.Module):
        method.eval()
    device = (
        next((p.device for p in method.parameters()), torch.device("cpu"))
        if isinstance(method, torch.nn.Module)
        else torch.device("cpu")
    )
    chunks = []
    for start in range(0, len(images), batch_size):
        batch = torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size])).to(device)
        out = fn(augment.to_float(batch, mean, std))
        chunks.append(out.reshape(out.shape[0], -1).double().cpu().numpy())
    return np.concatenate(chunks) if chunks else np.empty((0, 0))


def umap_coordinates(embeddings: np.ndarray, seed: int, n_neighbors: int = 15) -> np.ndarray:
    """2D UMAP of standardised embeddings (deterministic for a given seed)."""
    import umap
    from sklearn.preprocessing import StandardScaler

    x = StandardScaler().fit_transform(embeddings)
    n_neighbors = min(n_neighbors, max(len(x) - 1, 2))
    reducer = umap.UMAP(n_neighbors=n_neighbors, random_state=seed, n_jobs=1)
    return reducer.fit_transform(x)


def umap_images(coords: np.ndarray, values: np.ndarray, names: Sequence[str], title: str = "") -> list[MediaItem]:
    """One figure per feature: UMAP points coloured by the feature (NaN samples in grey)."""
    return [
        MediaItem(
            f"umap_{name}",
            figures.scatter_image(
                coords[:, 0],
                coords[:, 1],
                "UMAP 1",
                "UMAP 2",
                f"{title} UMAP coloured by {name}".strip(),
                colour=values[:, j],
                colour_label=name,
            ),
        )
        for j, name in enumerate(names)
    ]


def plot_umaps(
    coords: np.ndarray, values: np.ndarray, names: Sequence[str], out_dir: Path, title: str = ""
) -> list[Path]:
    """``umap_<feature>.png`` in ``out_dir``, one per feature (:func:`umap_images`)."""
    return save_pngs(umap_images(coords, values, names, title), out_dir)
