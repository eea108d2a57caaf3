"""Non-learned floors for EM instance segmentation: what a learned model has to beat.

* :func:`one_segment`: every voxel in one segment. Its ARAND/VOI merge say what merging
  everything costs on a volume (a model that outputs one segment has learned nothing usable).
* :func:`intensity_watershed_candidates`: the classic pre-deep-learning pipeline. Membranes are
  dark, so the image is Gaussian-smoothed (``sigma`` in in-plane voxels; in z scaled by the
  voxel-size ratio, 0 for section-wise instances), seeds are the connected components of the
  brightest voxels (above the ``seed_level`` quantile of the smoothed volume), and a watershed
  of the inverted smoothed image floods from them over the whole volume. Then the task's
  small-segment merging and size filter, as for the learned models. ``(sigma, seed_level)``
  is what the validation volume chooses (:func:`mtneuro_lab.methods.em_eval.choose`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Literal

import numpy as np

from mtneuro_lab.config.sections import PostprocessConfig
from mtneuro_lab.decoding.postprocess import clean
from mtneuro_lab.decoding.segments import Segmentation

SIGMAS = (1.0, 2.0, 4.0)
SEED_LEVELS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)


def one_segment(shape: Sequence[int]) -> Segmentation:
    """Everything is segment 1."""
    base = np.ones(tuple(shape), dtype=np.int64)
    return Segmentation(base, np.array([0, 1], dtype=np.int64), {})


def _watershed(smoothed: np.ndarray, seed_level: float, connectivity: Literal[4, 6, 26]) -> np.ndarray:
    import cc3d
    from skimage.segmentation import watershed

    seeds = smoothed > np.quantile(smoothed, seed_level)
    markers = cc3d.connected_components(seeds, connectivity=connectivity)
    return watershed(-smoothed, markers=markers)


def intensity_watershed(
    image: np.ndarray, sigma: float, seed_level: float, z_ratio: float = 1.0, sections: bool = False
) -> np.ndarray:
    """int64 segmentation of a uint8 ``(Z, Y, X)`` image (bright interiors, dark membranes).

    ``z_ratio`` = in-plane voxel size / section thickness (the z smoothing is ``sigma * z_ratio``);
    ``sections``: every section on its own (2D smoothing, seeds and flooding), ids unique.
    """
    from scipy.ndimage import gaussian_filter

    img = np.asarray(image, dtype=np.float32)
    if not sections:
        smoothed = gaussian_filter(img, sigma=(sigma * z_ratio, sigma, sigma))
        return _watershed(smoothed, seed_level, 6).astype(np.int64)
    out = np.zeros(img.shape, dtype=np.int64)
    offset = 0
    for z in range(img.shape[0]):
        seg = _watershed(gaussian_filter(img[z], sigma=sigma), seed_level, 4).astype(np.int64)
        out[z] = np.where(seg > 0, seg + offset, 0)
        offset += int(seg.max())
    return out


def intensity_watershed_candidates(
    image: np.ndarray,
    cfg: PostprocessConfig,
    sigmas: Sequence[float] = SIGMAS,
    seed_levels: Sequence[float] = SEED_LEVELS,
    z_ratio: float = 1.0,
    sections: bool = False,
) -> Iterator[Segmentation]:
    """One cleaned segmentation per ``(sigma, seed_level)``, for a search on validation."""
    for sigma in sigmas:
        for level in seed_levels:
            seg = intensity_watershed(image, sigma, level, z_ratio, sections)
            yield clean(seg, cfg, {"sigma": float(sigma), "seed_level": float(level)})
