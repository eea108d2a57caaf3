"""Hand-crafted texture baseline for Task 1 (``model=texture``): the floor every learned encoder
must beat.

Per tile, from the raw uint8 intensities (the datamodule normalisation is undone with the
``input_norm`` buffer, so the features do not depend on it), with scikit-image:

* intensity: the ``quantiles`` of the intensities in [0, 1], mean, standard deviation, skewness
  and excess kurtosis;
* grey-level co-occurrence (``graycomatrix`` / ``graycoprops``, intensities quantised to
  ``glcm_levels`` levels, symmetric, normalised): contrast, dissimilarity, homogeneity, energy
  and correlation at each of ``glcm_distances``, each as mean and range over ``glcm_angles``
  evenly spaced angles in [0, pi);
* local binary patterns (``local_binary_pattern``, rotation-invariant ``uniform`` codes of
  ``lbp_points`` neighbours): the normalised code histogram (``lbp_points + 2`` bins) of the
  pixels at least that far from the border, at each of ``lbp_radii``;
* Gabor energies (``skimage.filters.gabor_kernel``, applied to the mean-subtracted tile with
  symmetric borders like ``skimage.filters.gabor``): RMS response at each of
  ``gabor_frequencies``, as mean and range over ``gabor_orientations`` orientations in [0, pi).

Each tile is first brought to a canonical orientation (of its 8 flips and 90-degree rotations,
the one with the smallest digest), so the features are exactly invariant to the datamodule's
flip/rot90 augmentation. They are standardised with training-split statistics and read out by
the same linear head as PCA/NMF (:class:`~mtneuro_lab.methods.fitted.FittedEmbeddingClassifier`).

scikit-image runs on numpy, so the features of a batch are computed on the CPU. They are
memoised in memory (per process, keyed by the canonical tile's digest, at most ``feature_cache``
tiles; never on disk, never in the checkpoint): the fit computes every training tile once and
later epochs mostly hit the memo. The memo never changes a value: the same tile bytes always
give the same features.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from scipy import fft as sp_fft
from skimage.feature import graycomatrix, graycoprops, local_binary_pattern
from skimage.filters import gabor_kernel

from mtneuro_lab.errors import ConfigError
from mtneuro_lab.methods.fitted import FittedEmbeddingClassifier

#: co-occurrence statistics, in feature order
GLCM_PROPS = ("contrast", "dissimilarity", "homogeneity", "energy", "correlation")


# -- the four feature families (numpy, one batch of uint8 tiles (B, H, W)) -----------------------
def intensity_features(tiles: np.ndarray, quantiles: Sequence[float]) -> np.ndarray:
    """Quantiles, mean, std, skewness and excess kurtosis of each tile's intensities in [0, 1]."""
    v = tiles.reshape(len(tiles), -1).astype(np.float64) / 255.0
    mean = v.mean(1, keepdims=True)
    std = v.std(1, keepdims=True)
    z = (v - mean) / np.maximum(std, 1e-12)  # a constant tile has skewness 0 and kurtosis -3
    cols = [np.quantile(v, list(quantiles), axis=1).T] if len(quantiles) else []
    cols += [mean, std, (z**3).mean(1, keepdims=True), (z**4).mean(1, keepdims=True) - 3.0]
    return np.concatenate(cols, axis=1)


def glcm_features(tiles: np.ndarray, distances: Sequence[int], angles: int, levels: int) -> np.ndarray:
    """Co-occurrence statistics per distance: mean and range over the angles."""
    if not len(distances):
        return np.zeros((len(tiles), 0))
    thetas = np.arange(angles) * np.pi / angles
    quantised = ((tiles.astype(np.uint16) * levels) >> 8).astype(np.uint8)  # 0..levels-1
    rows = []
    for tile in quantised:
        glcm = graycomatrix(tile, list(distances), thetas, levels=levels, symmetric=True, normed=True)
        props = np.stack([graycoprops(glcm, p) for p in GLCM_PROPS])  # (props, distances, angles)
        rows.append(np.concatenate([props.mean(2).ravel(), np.ptp(props, axis=2).ravel()]))
    return np.nan_to_num(np.asarray(rows, dtype=np.float64))


def lbp_features(tiles: np.ndarray, points: int, radii: Sequence[int]) -> np.ndarray:
    """Normalised histograms of uniform LBP codes (``points + 2`` bins) at each radius.

    Only pixels at least ``radius`` from the border count: scikit-image reads zeros outside the
    tile, so border codes would depend on the brightness rather than the texture.
    """
    rows = []
    for tile in tiles:
        hists = []
        for r in radii:
            codes = local_binary_pattern(tile, points, r, method="uniform")[r:-r, r:-r]
            hists.append(np.bincount(codes.astype(np.int64).ravel(), minlength=points + 2) / codes.size)
        rows.append(np.concatenate(hists) if hists else np.zeros(0))
    return np.asarray(rows, dtype=np.float64).reshape(len(tiles), -1)


def gabor_bank(frequencies: Sequence[float], orientations: int) -> list[list[np.ndarray]]:
    """Complex Gabor kernels ``[frequency][orientation]`` (scikit-image's, bandwidth 1)."""
    thetas = np.arange(orientations) * np.pi / orientations
    return [[gabor_kernel(f, theta=t) for t in thetas] for f in frequencies]


def gabor_features(tiles: np.ndarray, bank: Sequence[Sequence[np.ndarray]]) -> np.ndarray:
    """RMS Gabor response per frequency: mean and range over orientations.

    Same responses as ``skimage.filters.gabor`` (convolution with symmetric borders) on the
    mean-subtracted tile, computed for the whole batch with one FFT of the padded tiles.
    """
    if not len(bank):
        return np.zeros((len(tiles), 0))
    x = tiles.astype(np.float32) / np.float32(255.0)
    x -= x.mean(axis=(1, 2), keepdims=True)
    h, w = x.shape[1:]
    pad = max(k.shape[0] // 2 for row in bank for k in row)
    padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad)), mode="symmetric")
    shape = tuple(sp_fft.next_fast_len(s + 2 * pad) for s in (h, w))  # zeros beyond: no wrap-around
    spectrum = sp_fft.fft2(padded, s=shape, axes=(1, 2), workers=1)
    cols = []
    for row in bank:
        rms = []
        for kernel in row:
            n = kernel.shape[0] // 2
            out = sp_fft.ifft2(spectrum * sp_fft.fft2(kernel.astype(np.complex64), s=shape), axes=(1, 2), workers=1)
            valid = out[:, pad + n : pad + n + h, pad + n : pad + n + w]
            rms.append(np.sqrt((np.abs(valid) ** 2).mean(axis=(1, 2))))
        rms_arr = np.stack(rms, axis=1)
        cols += [rms_arr.mean(1), np.ptp(rms_arr, axis=1)]
    return np.stack(cols, axis=1)


def canonical_orientation(tile: np.ndarray) -> tuple[bytes, np.ndarray]:
    """The tile's flip/rotation variant with the smallest digest, and that digest.

    Features are computed on this variant, so they are exactly the same for every flip and
    90-degree rotation of a tile (the datamodule's augmentation), and one memo entry serves all 8.
    Non-square tiles use the 4 variants that keep their shape.
    """
    if tile.shape[0] == tile.shape[1]:
        variants = [np.rot90(t, k) for t in (tile, tile.T) for k in range(4)]
    else:
        variants = [tile, tile[::-1], tile[:, ::-1], tile[::-1, ::-1]]
    best = min(
        (hashlib.blake2b(np.ascontiguousarray(v).tobytes(), digest_size=16).digest(), i) for i, v in enumerate(variants)
    )
    return best[0], np.ascontiguousarray(variants[best[1]])


# -- the method ------------------------------------------------------------------------------------
def _int_list(value: Sequence[int], key: str, low: int, high: int) -> list[int]:
    values = list(value)
    if any(isinstance(v, bool) or not isinstance(v, int) or not low <= v <= high for v in values):
        raise ConfigError(f"{key}: must be a list of integers in [{low}, {high}], got {values}")
    return values


def _float_list(value: Sequence[float], key: str, low: float, high: float, open_low: bool = False) -> list[float]:
    values = list(value)
    ok = all(
        not isinstance(v, bool) and isinstance(v, (int, float)) and (low < v if open_low else low <= v) and v <= high
        for v in values
    )
    if not ok:
        bracket = "(" if open_low else "["
        raise ConfigError(f"{key}: must be a list of numbers in {bracket}{low}, {high}], got {values}")
    return [float(v) for v in values]


def _at_least(value: int, key: str, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ConfigError(f"{key}: must be an integer {bound}, got {value!r}")
    return value


class TextureClassifier(FittedEmbeddingClassifier):
    """Intensity, co-occurrence, LBP and Gabor statistics per tile + a linear read-out (see module)."""

    model_name = "texture"

    def __init__(
        self,
        num_classes: int,
        class_names: Sequence[str],
        input_shape: Sequence[int],
        *,
        quantiles: Sequence[float] = (0.05, 0.25, 0.5, 0.75, 0.95),
        glcm_distances: Sequence[int] = (1, 2, 4),
        glcm_angles: int = 4,
        glcm_levels: int = 32,
        lbp_points: int = 8,
        lbp_radii: Sequence[int] = (1, 2),
        gabor_frequencies: Sequence[float] = (0.1, 0.2, 0.4),
        gabor_orientations: int = 4,
        feature_cache: int = 100_000,
        **kwargs: Any,
    ) -> None:
        shape = tuple(int(s) for s in input_shape)
        if len(shape) != 2:
            raise ConfigError(f"model=texture: needs 2D tiles, the task gives samples of shape {shape}")
        side = min(shape)
        # checked before nn.Module.__init__, which must run before any attribute is set
        quantiles = _float_list(quantiles, "model.quantiles", 0.0, 1.0)
        glcm_distances = _int_list(glcm_distances, "model.glcm_distances", 1, side - 1)
        glcm_angles = _at_least(glcm_angles, "model.glcm_angles", 1)
        glcm_levels = _at_least(glcm_levels, "model.glcm_levels", 2, 256)
        lbp_points = _at_least(lbp_points, "model.lbp_points", 4)
        lbp_radii = _int_list(lbp_radii, "model.lbp_radii", 1, (side - 1) // 2)
        gabor_frequencies = _float_list(gabor_frequencies, "model.gabor_frequencies", 0.0, 0.5, open_low=True)
        gabor_orientations = _at_least(gabor_orientations, "model.gabor_orientations", 1)
        feature_cache = _at_least(feature_cache, "model.feature_cache", 0)
        dim = (
            len(quantiles)
            + 4
            + 2 * len(GLCM_PROPS) * len(glcm_distances)
            + (lbp_points + 2) * len(lbp_radii)
            + 2 * len(gabor_frequencies)
        )
        super().__init__(num_classes, class_names, shape, dim, **kwargs)
        self.quantiles = list(quantiles)
        self.glcm_distances = list(glcm_distances)
        self.glcm_angles = glcm_angles
        self.glcm_levels = glcm_levels
        self.lbp_points = lbp_points
        self.lbp_radii = list(lbp_radii)
        self.gabor_frequencies = list(gabor_frequencies)
        self.gabor_orientations = gabor_orientations
        self.feature_cache = feature_cache
        self._bank = gabor_bank(self.gabor_frequencies, self.gabor_orientations)
        self._memo: dict[bytes, np.ndarray] = {}

    def tile_features(self, tiles: np.ndarray) -> np.ndarray:
        """uint8 tiles ``(B, H, W)`` -> features ``(B, embed_dim)`` (float64, no memo)."""
        return np.concatenate(
            [
                intensity_features(tiles, self.quantiles),
                glcm_features(tiles, self.glcm_distances, self.glcm_angles, self.glcm_levels),
                lbp_features(tiles, self.lbp_points, self.lbp_radii),
                gabor_features(tiles, self._bank),
            ],
            axis=1,
        )

    def _memoised_features(self, tiles: np.ndarray) -> np.ndarray:
        canonical = [canonical_orientation(t) for t in tiles]
        missing = [i for i, (key, _) in enumerate(canonical) if key not in self._memo]
        fresh: dict[int, np.ndarray] = {}
        if missing:
            batch = np.stack([canonical[i][1] for i in missing])
            fresh = dict(zip(missing, self.tile_features(batch), strict=True))
        for i, feats in fresh.items():
            if len(self._memo) < self.feature_cache:
                self._memo[canonical[i][0]] = feats
        return np.stack([fresh[i] if i in fresh else self._memo[key] for i, (key, _) in enumerate(canonical)])

    def raw_code(self, raw: torch.Tensor) -> torch.Tensor:
        tiles = (raw.detach()[:, 0] * 255).round().clamp(0, 255).to(torch.uint8).cpu().numpy()
        feats = self._memoised_features(np.ascontiguousarray(tiles)) if len(tiles) else np.zeros((0, self.embed_dim))
        return torch.from_numpy(feats).to(device=raw.device, dtype=torch.float32)
