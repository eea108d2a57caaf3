"""From network output to instances: sliding-window inference, waterz, seeded watershed.

* :func:`sliding_window_predict` runs a model over a whole volume in overlapping windows
  (MONAI ``sliding_window_inference``, Gaussian blending), so validation and test see complete
  volumes whatever the training crop.
* :func:`candidates` turns the predicted target (probabilities, see
  :func:`mtneuro_lab.data.targets.activate`) into instance segmentations, one per
  post-processing setting: affinities -> waterz (zwatershed fragments + agglomeration, every
  threshold of the grid from one pass); BC/BCD -> seeded watershed (scikit-image): seeds are
  connected components of confident foreground away from contours (and, for BCD, deep inside
  objects), flooded on the inverted foreground x (1 - contour) map where foreground exceeds
  ``flood_foreground``, then cut to the foreground mask (``mask_foreground``) after the flood.
  Each is then cleaned at segment level (:mod:`mtneuro_lab.decoding.segments`: small-segment
  merging, size filter). :func:`segment` is the one segmentation of the configured values.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from typing import Any, Literal, cast

import numpy as np
import torch

from mtneuro_lab.config.sections import SCORING, PostprocessConfig
from mtneuro_lab.decoding.segments import (
    RegionGraph,
    Segmentation,
    compact,
    drop_small,
    merge_small,
    relabel_consecutive,
    relabel_dense,
)
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
    keep_logits: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Predict a whole ``(B, 1, Z, Y, X)`` volume window by window with blended overlaps.

    ``predictor`` maps ``(n, 1, *roi_size)`` to ``(n, C, *roi_size)``; ``activation`` (e.g.
    ``lambda x: activate(x, kind)``) is applied per window before blending, so probabilities,
    not logits, are averaged. Volumes smaller than ``roi_size`` are padded (zeros = the
    normalised mean) and cropped back. Output ``(B, C, Z, Y, X)`` on ``output_device``
    (default: the image's device; pass "cpu" to keep large volumes off the GPU).
    ``keep_logits=True`` returns ``(blended logits, blended activations)`` from the same windows.
    """
    from monai.inferers import sliding_window_inference

    if image.ndim != 5:
        raise DataError(f"sliding_window_predict: expected (B, 1, Z, Y, X), got shape {tuple(image.shape)}")
    roi = tuple(int(r) for r in roi_size)

    def run(window: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        out = predictor(window)
        if activation is None:
            return out
        return (out, activation(out)) if keep_logits else activation(out)

    with torch.no_grad():
        return cast(Any, sliding_window_inference)(
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


def as_prediction(pred: np.ndarray | torch.Tensor) -> np.ndarray:
    """A ``(C, Z, Y, X)`` numpy prediction from a tensor or array (a leading batch of one dropped)."""
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


def waterz_passes(affs: np.ndarray, cfg: PostprocessConfig, thresholds: Sequence[float]) -> Iterator[np.ndarray]:
    """waterz on the nearest-neighbour affinities ``(>=3, Z, Y, X)``: one uint64 segmentation per
    threshold (ascending), all from ONE agglomeration pass. The yielded array is reused by waterz:
    copy what must outlive the next step."""
    import waterz

    nearest = np.ascontiguousarray(affs[:3], dtype=np.float32)
    passes = waterz.agglomerate(
        nearest,
        [float(t) for t in sorted(thresholds)],
        aff_threshold_low=cfg.aff_low,
        aff_threshold_high=cfg.aff_high,
        scoring_function=SCORING[cfg.scoring],
    )
    while True:  # silence waterz's progress lines during its own steps only, not between them
        with _quiet_stdout():
            seg = next(passes, None)
        if seg is None:
            return
        yield np.asarray(seg)


def agglomerate(affs: np.ndarray, cfg: PostprocessConfig) -> np.ndarray:
    """waterz at ``cfg.threshold`` alone -> uint64 segmentation (no merging or filtering)."""
    return np.array(next(iter(waterz_passes(affs, cfg, [cfg.threshold]))), copy=True)


def seed_markers(pred: np.ndarray, cfg: PostprocessConfig) -> np.ndarray:
    """Seeds of a BC/BCD prediction: connected components (6-neighbourhood) of confident
    foreground away from contours (and deep inside objects for BCD), specks dropped."""
    import cc3d

    seeds = (pred[0] > cfg.seed_foreground) & (pred[1] < cfg.seed_contour)
    if pred.shape[0] >= 3:
        seeds &= pred[2] > cfg.seed_distance
    markers = cc3d.connected_components(seeds, connectivity=6)
    if cfg.min_seed_size:  # what cc3d.dust does, without finding the components a second time
        flat = markers.reshape(-1)
        seeded = np.flatnonzero(flat)
        ids = flat[seeded]
        flat[seeded[np.bincount(ids)[ids] < cfg.min_seed_size]] = 0
    return markers


def flood_depth(pred: np.ndarray) -> np.ndarray:
    """What the seeded watershed floods (low first): minus foreground x (1 - contour)
    (x the distance channel, mapped to [0, 1], for BCD). It depends on no threshold."""
    height = pred[0] * (1.0 - pred[1])
    if pred.shape[0] >= 3:
        height = height * (pred[2] + 1.0) / 2.0
    return np.asarray(-height, dtype=np.float64)


def flood(depth: np.ndarray, markers: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """scikit-image's marker watershed of ``depth`` inside ``mask`` -> int64 instances."""
    from skimage.segmentation import watershed

    return np.asarray(watershed(depth, markers=markers, mask=mask), dtype=np.int64)


def seeded_watershed(pred: np.ndarray, cfg: PostprocessConfig) -> np.ndarray:
    """BC ``(2, ...)`` or BCD ``(3, ...)`` probabilities -> int64 instances (0 = background):
    the flood over foreground > ``flood_foreground``, cut to foreground > ``mask_foreground``."""
    flooded = flood(flood_depth(pred), seed_markers(pred, cfg), pred[0] > cfg.flood_foreground)
    flooded[pred[0] <= cfg.mask_foreground] = 0
    return flooded


def clean(
    seg: np.ndarray,
    cfg: PostprocessConfig,
    params: dict[str, float],
    affs: np.ndarray | None = None,
) -> Segmentation:
    """A raw segmentation (any integer ids, 0 = background) with small segments merged
    (``cfg.merge_size``; by mean affinity if ``affs`` are given, else by contact area) and then
    removed (``cfg.min_size``): a :class:`Segmentation` of consecutive ids."""
    base, sizes = relabel_dense(seg)
    graph = RegionGraph.build(base, affs) if cfg.merge_size else None
    return _finish(base, sizes, np.arange(sizes.size, dtype=np.int64), graph, cfg, params)


def _finish(
    base: np.ndarray,
    sizes: np.ndarray,
    mapping: np.ndarray,
    graph: RegionGraph | None,
    cfg: PostprocessConfig,
    params: dict[str, float],
    where: np.ndarray | None = None,
) -> Segmentation:
    mapping = merge_small(mapping, sizes, graph, cfg.merge_size)
    return Segmentation(base, drop_small(mapping, sizes, cfg.min_size), params, where)


def affinity_candidates(
    affs: np.ndarray, cfg: PostprocessConfig, thresholds: Sequence[float]
) -> Iterator[Segmentation]:
    """One :class:`Segmentation` per waterz threshold (ascending), sharing one base volume.

    The base is the segmentation of the lowest threshold; a higher threshold only merges its
    segments, so its mapping is read off at each base segment's first voxel. The region graph
    (mean affinity per contact) is built once on the base.
    """
    passes = waterz_passes(affs, cfg, thresholds)
    base, first, sizes = relabel_consecutive(next(passes))
    graph = RegionGraph.build(base, affs) if cfg.merge_size else None
    ordered = sorted(float(t) for t in thresholds)
    identity = np.arange(sizes.size, dtype=np.int64)
    yield _finish(base, sizes, identity, graph, cfg, {"threshold": ordered[0]})
    present = first >= 0
    for t, seg in zip(ordered[1:], passes):
        mapping = np.zeros(sizes.size, dtype=np.int64)
        mapping[present] = seg.reshape(-1)[first[present]]
        mapping[0] = 0
        yield _finish(base, sizes, compact(mapping), graph, cfg, {"threshold": t})


def bc_candidates(
    pred: np.ndarray, cfg: PostprocessConfig, settings: Sequence[dict[str, float]]
) -> Iterator[Segmentation]:
    """One seeded watershed per setting (``{"seed_foreground": .., "mask_foreground": ..}``).

    The mask is applied after the flood, so only the seed setting changes the flooding: the
    depth map is computed once, the seed markers and the flood once per seed setting (the grid
    is seed-major; candidates come grouped by seed setting), and the mask thresholds of that
    seed setting share one base volume
    (:func:`flood_levels`), each candidate a mapping of it. Each result equals
    :func:`seeded_watershed` with that setting, merged and filtered like :func:`clean`.
    """
    depth = flood_depth(pred)
    # seed setting -> its values and [(params, mask threshold)]
    groups: dict[tuple[float, ...], tuple[PostprocessConfig, list[tuple[dict[str, float], float]]]] = {}
    for params in settings:
        values = replace(cfg, **cast(dict[str, Any], params))
        key = (values.seed_foreground, values.seed_contour, values.seed_distance, float(values.min_seed_size))
        groups.setdefault(key, (values, []))[1].append((params, float(values.mask_foreground)))
    for values, group in groups.values():
        flooded = flood(depth, seed_markers(pred, values), pred[0] > cfg.flood_foreground)
        masks = sorted({mask for _, mask in group})
        base, sizes, instance, level, where = flood_levels(flooded, pred[0], masks)
        graph = RegionGraph.build(base) if cfg.merge_size else None
        for params, mask in group:
            mapping = compact(np.where(level >= masks.index(mask) + 1, instance, 0))
            yield _finish(base, sizes, mapping, graph, cfg, dict(params), where)


def flood_levels(
    flooded: np.ndarray, foreground: np.ndarray, masks: Sequence[float]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(base, sizes, instance, level, where)``: the flooded voxels split by how many of the ascending
    ``masks`` their foreground exceeds (level 1..L; level 0 = no mask keeps them, background).

    Base id k (consecutive, 0 = background) holds the voxels of instance ``instance[k]`` at
    level ``level[k]``; the candidate of mask ``masks[j - 1]`` maps each base id of level >= j
    to its instance, so one base volume serves every mask threshold. ``where``: the flat indices
    of the base's non-zero voxels. Only flooded voxels are touched."""
    where = np.flatnonzero(flooded)
    levels = len(masks)
    # compared in the foreground's own dtype, as ``foreground > mask`` compares (float32 ties)
    thresholds = np.asarray(masks, dtype=foreground.dtype)
    level = np.searchsorted(thresholds, foreground.reshape(-1)[where], side="left")
    kept = level > 0
    where, level = where[kept], level[kept]
    pair = (flooded.reshape(-1)[where] - 1) * levels + level  # 1.. : (instance, level)
    counts = np.bincount(pair, minlength=1)
    present = counts > 0
    present[0] = True
    new_id = np.cumsum(present) - 1
    base = np.zeros(flooded.size, dtype=np.int64)
    base[where] = new_id[pair]
    ids = np.flatnonzero(present)
    instance = np.where(ids > 0, (ids - 1) // levels + 1, 0)
    return (
        base.reshape(flooded.shape),
        counts[present].astype(np.int64),
        instance,
        np.where(ids > 0, (ids - 1) % levels + 1, 0),
        where,
    )


def search_settings(kind: str, cfg: PostprocessConfig) -> list[dict[str, float]]:
    """The candidate settings of ``cfg.grid`` for ``kind``, in the order they are produced."""
    if kind == "affinity":
        return [{"threshold": float(t)} for t in sorted(cfg.grid.threshold)]
    return [
        {"seed_foreground": float(s), "mask_foreground": float(m)}
        for s in cfg.grid.seed_foreground
        for m in cfg.grid.mask_foreground
    ]


def fixed_setting(kind: str, cfg: PostprocessConfig) -> dict[str, float]:
    """The configured values of the parameters :func:`search_settings` varies."""
    keys = ("threshold",) if kind == "affinity" else ("seed_foreground", "mask_foreground")
    return {k: float(getattr(cfg, k)) for k in keys}


def candidates(
    pred: np.ndarray | torch.Tensor,
    kind: str,
    cfg: PostprocessConfig | None = None,
    settings: Sequence[dict[str, float]] | None = None,
) -> Iterator[Segmentation]:
    """Segmentations of a ``(C, Z, Y, X)`` prediction of ``kind``, one per setting (default: the
    configured values only). Settings must all vary the same keys (:func:`search_settings`)."""
    cfg = cfg or PostprocessConfig()
    arr = as_prediction(pred)
    settings = list(settings) if settings is not None else [fixed_setting(kind, cfg)]
    if kind == "affinity":
        if arr.shape[0] < 3:
            raise DataError(f"segment: affinity predictions need >= 3 channels, got {arr.shape[0]}")
        if any(set(s) != {"threshold"} for s in settings):
            raise ConfigError(f"segment: affinity settings vary threshold only, got {settings}")
        yield from affinity_candidates(arr, cfg, [s["threshold"] for s in settings])
    elif kind in ("bc", "bcd"):
        need = 2 if kind == "bc" else 3
        if arr.shape[0] < need:
            raise DataError(f"segment: {kind} predictions need {need} channels, got {arr.shape[0]}")
        yield from bc_candidates(arr[:need], cfg, settings)
    else:
        raise ConfigError(f"task.target: must be one of affinity, bc, bcd, got {kind!r}")


def segment(pred: np.ndarray | torch.Tensor, kind: str, cfg: PostprocessConfig | None = None) -> np.ndarray:
    """Instance segmentation ``(Z, Y, X)`` int64 from a ``(C, Z, Y, X)`` prediction of ``kind``,
    with the configured values (merging and size filter included)."""
    return next(iter(candidates(pred, kind, cfg))).labels()


def instance_scores(seg: np.ndarray, prob: np.ndarray) -> dict[int, float]:
    """Mean of ``prob`` (a ``(Z, Y, X)`` confidence map) over each instance: the AP ranking."""
    ids, inverse = np.unique(seg.reshape(-1), return_inverse=True)
    sums = np.bincount(inverse, weights=np.asarray(prob, dtype=np.float64).reshape(-1))
    counts = np.bincount(inverse)
    return {int(i): float(s / c) for i, s, c in zip(ids, sums, counts) if i != 0}


def confidence_map(pred: np.ndarray | torch.Tensor, kind: str) -> np.ndarray:
    """Per-voxel confidence for :func:`instance_scores`: mean nearest affinity, or foreground."""
    arr = as_prediction(pred)
    return arr[:3].mean(axis=0) if kind == "affinity" else arr[0]
