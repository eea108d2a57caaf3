"""EM evaluation: post-processing (:mod:`mtneuro_lab.decoding`) joined with scores (:mod:`mtneuro_lab.metrics.em`).

The task describes the data, decoding turns probabilities into candidate segmentations, metrics
score contingency tables; this module is where they meet:

* :func:`choose` scores every candidate segmentation against the ground truth by one metric
  and returns the best, with all metrics of it. Candidates that share a base volume
  (:class:`~mtneuro_lab.decoding.segments.Segmentation`) share one contingency table: each is
  scored by merging table columns (:func:`~mtneuro_lab.metrics.em.merge_columns`), never by
  relabelling its voxels. That is what keeps a search over the waterz thresholds of one
  agglomeration pass close to the cost of one post-processing.
* :func:`search_postprocess` is the search of ``task.postprocess.grid`` on a validation volume;
  :func:`evaluate_volume` segments and scores one volume with given values (the test step).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from scipy import sparse

from mtneuro_lab.config.sections import PostprocessConfig
from mtneuro_lab.decoding import postprocess as pp
from mtneuro_lab.decoding.segments import Segmentation, mean_per_segment
from mtneuro_lab.errors import ConfigError
from mtneuro_lab.metrics.em import contingency, evaluate_table, merge_columns, relabel

#: selection metrics and whether lower is better
METRIC_LOWER_IS_BETTER = {"arand": True, "voi": True, "ap50": False, "ap75": False}


@dataclass
class Choice:
    """The chosen candidate: its settings, every metric of it, and what the search saw."""

    params: dict[str, float]
    metrics: dict[str, float]
    segmentation: Segmentation
    #: (settings, selection metric) of every candidate, in the order they were produced
    tried: list[tuple[dict[str, float], float]] = field(default_factory=list)
    seconds: float = 0.0


def _numpy(x: np.ndarray | torch.Tensor) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def better(metric: str, a: float, b: float) -> bool:
    """Is score ``a`` strictly better than ``b`` for ``metric``?"""
    if metric not in METRIC_LOWER_IS_BETTER:
        raise ConfigError(f"task.metric: must be one of {', '.join(METRIC_LOWER_IS_BETTER)}, got {metric!r}")
    return a < b if METRIC_LOWER_IS_BETTER[metric] else a > b


def choose(
    candidates: Iterable[Segmentation],
    gt: np.ndarray | torch.Tensor,
    metric: str,
    ignore_zero: bool = True,
    confidence: np.ndarray | None = None,
) -> Choice:
    """The candidate with the best ``metric`` against ``gt`` (ties: the first), fully scored.

    ``confidence`` ``(Z, Y, X)`` ranks instances for AP (mean over each segment).
    """
    start = time.perf_counter()
    gt_c, _ = relabel(_numpy(gt).astype(np.int64, copy=False))
    gt_sizes = np.bincount(gt_c.reshape(-1), minlength=1)
    if confidence is not None:  # converted once, summed per base volume
        confidence = np.asarray(confidence, dtype=np.float64)
    base: np.ndarray | None = None  # the base volume whose table is held (one at a time)
    base_table: Any = None
    sums = counts = None
    best: tuple[float, Segmentation, Any, np.ndarray | None] | None = None
    tried: list[tuple[dict[str, float], float]] = []
    for cand in candidates:
        if cand.base is not base:
            base, n_base = cand.base, cand.mapping.size
            where = cand.where
            base_table = contingency_of(gt_c, base, n_base, gt_sizes, where)
            if confidence is not None:
                sums, counts = mean_per_segment(base, confidence, n_base, base_table.sum(axis=0), where)
        table = merge_columns(base_table, cand.mapping)
        ranked = None
        if sums is not None:
            seg_sums = np.bincount(cand.mapping, weights=sums, minlength=table.shape[1])
            seg_counts = np.bincount(cand.mapping, weights=counts, minlength=table.shape[1])
            ranked = (seg_sums / np.maximum(seg_counts, 1))[1:]
        score = evaluate_table(table, ignore_zero, ranked, only=metric)[metric]
        tried.append((dict(cand.params), score))
        if best is None or better(metric, score, best[0]):
            best = (score, cand, table, ranked)
    if best is None:
        raise ConfigError("task.postprocess.grid: no candidate to choose from")
    _, cand, table, ranked = best
    metrics = evaluate_table(table, ignore_zero, ranked)
    return Choice(dict(cand.params), metrics, cand, tried, time.perf_counter() - start)


def contingency_of(
    gt_c: np.ndarray,
    base: np.ndarray,
    n_base: int,
    gt_sizes: np.ndarray | None = None,
    where: np.ndarray | None = None,
) -> Any:
    """``table[gt, base]`` with exactly ``n_base`` columns (ids absent at the end included).

    With ``where`` (flat indices of every non-zero voxel of ``base``) and ``gt_sizes`` (voxels
    per ground-truth id), only those voxels are counted; background column 0 is what the
    ground-truth sizes leave over (the same table)."""
    if where is None or gt_sizes is None:
        table: Any = contingency(gt_c, base)  # scipy.sparse (its stubs reject resize)
    else:
        table = contingency(gt_c.reshape(-1)[where], base.reshape(-1)[where]).tocoo()
        rows = gt_sizes.size
        left = gt_sizes - np.bincount(table.row, weights=table.data, minlength=rows)[:rows]
        row = np.flatnonzero(left)
        table = sparse.csr_array(
            (
                np.concatenate([table.data, left[row].astype(np.float64)]),
                (np.concatenate([table.row, row]), np.concatenate([table.col, np.zeros(row.size, dtype=np.int64)])),
            ),
            shape=(rows, max(n_base, table.shape[1])),
        )
        table.sum_duplicates()
    if table.shape[1] < n_base:
        table.resize((table.shape[0], n_base))
    return table


def in_plane_only(pred: np.ndarray, kind: str) -> np.ndarray:
    """Affinities with the z channel zeroed: instances never cross sections (task.instances)."""
    if kind != "affinity":
        return pred
    out = pred.copy()
    out[0] = 0.0
    return out


def search_postprocess(
    prob: np.ndarray | torch.Tensor,
    gt: np.ndarray | torch.Tensor,
    kind: str,
    cfg: PostprocessConfig,
    metric: str,
    ignore_zero: bool = True,
    sections: bool = False,
    search: bool = True,
) -> Choice:
    """Choose ``cfg.grid`` values on a validation volume (``search=False``: score the fixed values).

    ``prob`` ``(C, Z, Y, X)`` probabilities of ``kind``; ``sections``: instances live in one
    section each (the task's ``instances: section_components``).
    """
    arr = pp.as_prediction(prob)
    if sections:
        arr = in_plane_only(arr, kind)
    settings = pp.search_settings(kind, cfg) if search else [pp.fixed_setting(kind, cfg)]
    confidence = pp.confidence_map(arr, kind) if metric.startswith("ap") else None
    return choose(pp.candidates(arr, kind, cfg, settings), gt, metric, ignore_zero, confidence)


def with_params(cfg: PostprocessConfig, params: Mapping[str, float]) -> PostprocessConfig:
    """``cfg`` with the searched values replaced by ``params`` (what the test step applies)."""
    values: dict[str, Any] = {k: float(v) for k, v in params.items()}
    return replace(cfg, **values)


def evaluate_volume(
    prob: np.ndarray | torch.Tensor,
    gt: np.ndarray | torch.Tensor,
    kind: str,
    cfg: PostprocessConfig,
    ignore_zero: bool = True,
    sections: bool = False,
) -> tuple[dict[str, float], np.ndarray]:
    """Segment ``prob`` with ``cfg``'s values and score it: ``(every metric, segmentation)``.

    AP ranks instances by their mean confidence (mean nearest affinity, or foreground).
    """
    arr = pp.as_prediction(prob)
    if sections:
        arr = in_plane_only(arr, kind)
    choice = choose(pp.candidates(arr, kind, cfg), gt, "arand", ignore_zero, confidence=pp.confidence_map(arr, kind))
    return choice.metrics, choice.segmentation.labels()
