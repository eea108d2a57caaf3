"""From network output to instances: sliding-window inference, waterz, seeded watershed.

* :func:`sliding_window_predict` runs a model over a whole volume in overlapping windows
  (MONAI ``sliding_window_inference``, Gaussian blending), so validation and test see complete
  volumes whatever the training crop.
* :func:`segment` turns the predicted target (probabilities, see
  :func:`mtneuro_lab.data.targets.activate`) into an instance segmentation:
  affinities -> waterz (zwatershed fragments + agglomeration at ``threshold``);
  BC/BCD -> seeded watershed (scikit-image): seeds are connected components of confident
  foreground away from contours (and, for BCD, deep inside objects), flooded over the
  foreground mask on the inverted foreground x (1 - contour) map.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Literal

import numpy as np
import torch

from mtneuro_lab.config.sections import SCORING, PostprocessConfig
from mtneuro_lab.errors import ConfigError, DataError


def sliding_window_predict(
    predictor: Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    roi_size: Sequence[int],
    overlap: float | Sequence[float] = 0.5,
    sw_batch_size: int = 4,
    mode: Literal["gaussian", "constant"] = "gaussian",
    sigma_scale: float = 0.125,
    activation: Callable[[torch.Tensor], torch.Tensor] | None = None,
    output_device: torch.device | str | None = None,
) -> torch.Tensor:
    """Predict a whole ``(B, 1, Z, Y, X)`` volume window by window with blended overlaps.

    ``predictor`` maps ``(n, 1, *roi_size)`` to ``(n, C, *roi_size)``; ``activation`` (e.g.
    ``lambda x: activate(x, kind)``) is applied per window before blending, so probabilities,
    not logits, are averaged. Volumes smaller than ``roi_size`` are padded (zeros = the
    normalised mean) and cropped back. Output ``(B, C, Z, Y, X)`` on ``output_device``
    (default: the image's device; pass "cpu" to keep large volumes off the GPU).
    """
    from monai.inferers import sliding_window_inference

    if image.ndim != 5:
        raise DataError(f"sliding_window_predict: expected (B, 1, Z, Y, X), got shape {tuple(image.shape)}")
    roi = tuple(int(r) for r in roi_size)

    def run(window: torch.Tensor) -> torch.Tensor:
        out = predictor(window)
        return activation(out) if activation is not None else out

    with torch.no_grad():
        stitched = sliding_window_inference(
            image,
            roi,
            sw_batch_size,
            run,
            overlap=overlap,
            mode=mode,
            sigma_scale=sigma_scale,
            padding_mode="constant",
            cval=0.0,
            sw_device=image.device,
            device=output_device or image.device,
        )
    assert isinstance(stitched, torch.Tensor)  # one tensor per window in, one volume out
    return stitched


def _as_numpy(pred: np.ndarray | torch.Tensor) -> np.ndarray:
    arr = pred.detach().float().cpu().numpy() if isinstance(pred, torch.Tensor) else np.asarray(pred)
    if arr.ndim == 5 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 4:
        raise DataError(f"segment: expected a (C, Z, Y, X) prediction, got shape {arr.shape}")
    return arr


@contextlib.contextmanager
def _quiet_stdout() -> Iterator[None]:
    """Silence the C++ progress lines waterz prints to file descriptor 1."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # captured stdout without a descriptor
        yield
        return
    sys.stdout.flush()
    saved = os.dup(fd)
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), fd)
            yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)


def agglomerate(affs: np.ndarray, cfg: PostprocessConfig) -> np.ndarray:
    """waterz on the nearest-neighbour affinities ``(>=3, Z, Y, X)`` -> uint64 segmentation."""
    import waterz

    nearest = np.ascontiguousarray(affs[:3], dtype=np.float32)
    with _quiet_stdout():
        segmentations = waterz.agglomerate(
            nearest,
            [float(cfg.threshold)],
            aff_threshold_low=cfg.aff_low,
            aff_threshold_high=cfg.aff_high,
            scoring_function=SCORING[cfg.scoring],
        )
        return np.array(next(iter(segmentations)), copy=True)


def seeded_watershed(pred: np.ndarray, cfg: PostprocessConfig) -> np.ndarray:
    """BC ``(2, ...)`` or BCD ``(3, ...)`` probabilities -> int64 instances (0 = background)."""
    import cc3d
    from skimage.segmentation import watershed

    fg, ct = pred[0], pred[1]
    seeds = (fg > cfg.seed_foreground) & (ct < cfg.seed_contour)
    if pred.shape[0] >= 3:
        seeds &= pred[2] > cfg.seed_distance
    markers = cc3d.connected_components(seeds, connectivity=6)
    if cfg.min_seed_size:
        markers = cc3d.dust(markers, threshold=cfg.min_seed_size, connectivity=6, in_place=True)
    height = fg * (1.0 - ct)
    if pred.shape[0] >= 3:
        height = height * (pred[2] + 1.0) / 2.0
    seg = watershed(-height, markers=markers, mask=fg > cfg.mask_foreground)
    return seg.astype(np.int64)


def segment(pred: np.ndarray | torch.Tensor, kind: str, cfg: PostprocessConfig | None = None) -> np.ndarray:
    """Instance segmentation ``(Z, Y, X)`` int64 from a ``(C, Z, Y, X)`` prediction of ``kind``."""
    cfg = cfg or PostprocessConfig()
    arr = _as_numpy(pred)
    if kind == "affinity":
        if arr.shape[0] < 3:
            raise DataError(f"segment: affinity predictions need >= 3 channels, got {arr.shape[0]}")
        seg = agglomerate(arr, cfg).astype(np.int64)
    elif kind in ("bc", "bcd"):
        need = 2 if kind == "bc" else 3
        if arr.shape[0] < need:
            raise DataError(f"segment: {kind} predictions need {need} channels, got {arr.shape[0]}")
        seg = seeded_watershed(arr[:need], cfg)
    else:
        raise ConfigError(f"task.target: must be one of affinity, bc, bcd, got {kind!r}")
    if cfg.min_size:
        import cc3d

        seg = cc3d.dust(seg, threshold=cfg.min_size, connectivity=6, in_place=True)
    return seg


def instance_scores(seg: np.ndarray, prob: np.ndarray) -> dict[int, float]:
    """Mean of ``prob`` (a ``(Z, Y, X)`` confidence map) over each instance: the AP ranking."""
    ids, inverse = np.unique(seg.reshape(-1), return_inverse=True)
    sums = np.bincount(inverse, weights=np.asarray(prob, dtype=np.float64).reshape(-1))
    counts = np.bincount(inverse)
    return {int(i): float(s / c) for i, s, c in zip(ids, sums, counts) if i != 0}


def confidence_map(pred: np.ndarray | torch.Tensor, kind: str) -> np.ndarray:
    """Per-voxel confidence for :func:`instance_scores`: mean nearest affinity, or foreground."""
    arr = _as_numpy(pred)
    return arr[:3].mean(axis=0) if kind == "affinity" else arr[0]
