"""Instance-segmentation metrics for serial EM: adapted Rand error, VOI split/merge, AP-50/75.

:func:`evaluate_instances` returns names without a stage prefix (``arand``, ``voi_split``,
``voi_merge``, ``ap50``, ``ap75`` ...); methods log them as ``test/<name>`` so they land in
``metrics.json`` as ``test/arand`` etc.

* **ARAND** and **VOI** come from scikit-image (``adapted_rand_error``,
  ``variation_of_information``), from one shared contingency table. With ``ignore_zero``
  (SNEMI3D/CREMI convention) ground-truth voxels labelled 0 (boundary/unlabelled) are left out;
  predicted 0 counts as one more segment. ``voi_split = H(pred | gt)`` grows when a true object
  is cut into pieces, ``voi_merge = H(gt | pred)`` when true objects are fused (nats).
* **AP at IoU t** (COCO / MitoEM style, 3D): IoU of every (prediction, ground-truth) instance
  pair from the contingency table (0 is background in both). Predictions are ranked by score
  (highest first; without scores all tie and keep label order) and each is matched greedily to
  the unmatched ground-truth instance of highest IoU >= t. AP is the area under the
  precision-recall curve with precision made monotone (all-point interpolation). With tied
  scores the curve has one point and AP = precision x recall.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from scipy import sparse

from mtneuro_lab.errors import DataError

AP_THRESHOLDS = (0.5, 0.75)


def _as_labels(seg: np.ndarray | torch.Tensor, name: str) -> np.ndarray:
    arr = seg.detach().cpu().numpy() if isinstance(seg, torch.Tensor) else np.asarray(seg)
    arr = np.squeeze(arr)
    if not np.issubdtype(arr.dtype, np.integer):
        raise DataError(f"{name}: expected integer instance labels, got dtype {arr.dtype}")
    if arr.size and arr.min() < 0:
        raise DataError(f"{name}: instance labels must be >= 0, got {arr.min()}")
    return arr


def relabel(seg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Consecutive ids (0 stays 0) and the original id of each new one, so tables stay small.

    Non-negative ids no larger than the volume are counted rather than sorted (same result)."""
    flat = seg.reshape(-1)
    if flat.size and np.issubdtype(flat.dtype, np.integer) and flat.min() >= 0 and flat.max() <= flat.size:
        present = np.bincount(flat) > 0
        present[0] = True
        if present.all():  # already consecutive: no pass over the voxels
            return seg.astype(np.int64, copy=False), np.arange(present.size)
        return (np.cumsum(present) - 1)[seg].astype(np.int64, copy=False), np.flatnonzero(present)
    ids, inverse = np.unique(flat, return_inverse=True)
    if ids[0] != 0:
        ids = np.concatenate([[0], ids])
        inverse = inverse + 1
    return inverse.reshape(seg.shape).astype(np.int64), ids


def contingency(gt: np.ndarray, pred: np.ndarray) -> sparse.csr_array:
    """Voxel counts ``table[g, p]`` of consecutive-id volumes (no label ignored).

    While the dense table is no larger than the volume it is counted directly (one pass, no
    sort: a search scores one table per candidate); otherwise the occupied cells are found by
    one sort of their flat index. Both give the same canonical table.
    """
    shape = (int(gt.max()) + 1, int(pred.max()) + 1)
    cells = gt.reshape(-1).astype(np.int64, copy=False) * shape[1] + pred.reshape(-1)
    if shape[0] * shape[1] <= gt.size:
        dense = np.bincount(cells, minlength=shape[0] * shape[1]).astype(np.float64)
        return sparse.csr_array(dense.reshape(shape))
    occupied, counts = np.unique(cells, return_counts=True)
    return sparse.csr_array((counts.astype(np.float64), (occupied // shape[1], occupied % shape[1])), shape=shape)


def rand_voi(table: sparse.csr_array, ignore_zero: bool = True, voi: bool = True) -> dict[str, float]:
    """ARAND (+ its precision/recall) and VOI split/merge from a contingency table
    (``voi=False``: ARAND alone, what a search by ARAND reads of every candidate)."""
    from skimage.metrics import adapted_rand_error, variation_of_information

    if ignore_zero:  # drop the ground-truth-0 row
        keep = np.ones(table.shape[0])
        keep[0] = 0.0
        table = sparse.csr_array(sparse.dia_array((keep, 0), shape=(table.shape[0],) * 2) @ table)
        table.eliminate_zeros()
    total = float(table.sum())
    if total == 0:
        raise DataError("ground truth has no labelled voxels to score (all 0 with ignore_zero)")
    are, precision, recall = adapted_rand_error(table=table)
    rand = {"arand": float(are), "arand_precision": float(precision), "arand_recall": float(recall)}
    if not voi:
        return rand
    # returns (H(image1 | image0), H(image0 | image1)) with image0 = the table's rows (gt);
    # skimage 0.26 checks image shapes even when a table is given: pass two dummies
    dummy = np.zeros(1, dtype=np.int64)
    h_pred_given_gt, h_gt_given_pred = variation_of_information(dummy, dummy, table=table / total)
    return {
        **rand,
        "voi_split": float(h_pred_given_gt),
        "voi_merge": float(h_gt_given_pred),
        "voi": float(h_pred_given_gt + h_gt_given_pred),
    }


def iou_matrix(table: sparse.csr_array) -> sparse.csr_array:
    """Sparse IoU ``[g, p]`` of foreground instances (row/column 0, background, dropped)."""
    gt_size = np.asarray(table.sum(axis=1)).ravel()
    pred_size = np.asarray(table.sum(axis=0)).ravel()
    inter = sparse.coo_array(table[1:, 1:])
    union = gt_size[inter.row + 1] + pred_size[inter.col + 1] - inter.data
    return sparse.csr_array((inter.data / union, (inter.row, inter.col)), shape=inter.shape)


def average_precision(
    iou: sparse.csr_array, threshold: float, scores: Sequence[float] | np.ndarray | None = None
) -> float:
    """AP at one IoU threshold from ``iou[g, p]`` (see the module docstring)."""
    n_gt, n_pred = iou.shape
    if n_gt == 0:
        return 1.0 if n_pred == 0 else 0.0
    if n_pred == 0:
        return 0.0
    order = np.arange(n_pred) if scores is None else np.argsort(-np.asarray(scores, dtype=float), kind="stable")
    by_pred = sparse.csc_array(iou)
    matched_gt = np.zeros(n_gt, dtype=bool)
    tp = np.zeros(n_pred, dtype=bool)
    for rank, p in enumerate(order):
        start, stop = by_pred.indptr[p], by_pred.indptr[p + 1]
        rows, values = by_pred.indices[start:stop], by_pred.data[start:stop]
        ok = (values >= threshold) & ~matched_gt[rows]
        if ok.any():
            best = rows[ok][np.argmax(values[ok])]
            matched_gt[best] = True
            tp[rank] = True
    if scores is None:  # one operating point: every prediction is kept
        precision, recall = tp.sum() / n_pred, tp.sum() / n_gt
        return float(precision * recall)
    cum_tp = np.cumsum(tp)
    precision = cum_tp / np.arange(1, n_pred + 1)
    recall = cum_tp / n_gt
    precision = np.maximum.accumulate(precision[::-1])[::-1]  # monotone envelope
    recall_steps = np.diff(np.concatenate([[0.0], recall]))
    return float((precision * recall_steps).sum())


def merge_columns(table: sparse.csr_array, mapping: np.ndarray) -> sparse.csr_array:
    """The contingency table of a coarser prediction: column ``p`` is added into ``mapping[p]``.

    ``table[g, p]`` counts a prediction whose segment ``p`` becomes segment ``mapping[p]``
    (0 = background) when fragments are merged or removed, so a candidate segmentation built
    from shared fragments is scored without touching its voxels again.
    """
    mapping = np.asarray(mapping, dtype=np.int64)
    if mapping.shape != (table.shape[1],):
        raise DataError(f"merge_columns: mapping has {mapping.shape} entries for {table.shape[1]} columns")
    n_out = int(mapping.max()) + 1 if mapping.size else 1
    merge = sparse.csr_array((np.ones(mapping.size), (np.arange(mapping.size), mapping)), shape=(mapping.size, n_out))
    return sparse.csr_array(table @ merge)


def ranked_scores(scores: Mapping[int, float] | np.ndarray | None, pred_ids: np.ndarray) -> np.ndarray | None:
    """AP ranking of the table's columns 1..n: ``scores`` keyed by original id, or already by column."""
    if scores is None:
        return None
    if isinstance(scores, np.ndarray):
        return scores[1:].astype(float)
    return np.array([float(scores.get(int(i), 0.0)) for i in pred_ids[1:]])


def evaluate_table(
    table: sparse.csr_array,
    ignore_zero: bool = True,
    ranked: np.ndarray | None = None,
    ap_thresholds: Sequence[float] = AP_THRESHOLDS,
    only: str | None = None,
) -> dict[str, float]:
    """Every EM metric from a contingency table ``table[gt, pred]`` (0 = background on both sides).

    ``ranked[k]`` is the confidence of prediction column ``k + 1`` (AP ranking). ``only`` names
    one metric (``arand``, ``ap75`` ...) when a search needs just that one: the rest are skipped.
    """
    out: dict[str, float] = {}
    if only is None or not only.startswith("ap"):
        out.update(rand_voi(table, ignore_zero, voi=only is None or only.startswith("voi")))
    if only is None or only.startswith("ap"):
        iou = iou_matrix(table)
        for t in ap_thresholds:
            name = f"ap{int(round(100 * t))}"
            if only is None or only == name:
                out[name] = average_precision(iou, t, ranked)
        out["n_pred"] = float(iou.shape[1])
        out["n_gt"] = float(iou.shape[0])
    if only is not None and only not in out:
        raise DataError(f"evaluate_table: unknown metric {only!r}")
    return out


def instance_table(
    pred: np.ndarray | torch.Tensor, gt: np.ndarray | torch.Tensor
) -> tuple[sparse.csr_array, np.ndarray]:
    """``(table[gt, pred], original id of each pred column)`` of two same-shape label volumes."""
    pred_arr, gt_arr = _as_labels(pred, "pred"), _as_labels(gt, "gt")
    if pred_arr.shape != gt_arr.shape:
        raise DataError(f"pred shape {pred_arr.shape} differs from gt shape {gt_arr.shape}")
    gt_c, _ = relabel(gt_arr)
    pred_c, pred_ids = relabel(pred_arr)
    return contingency(gt_c, pred_c), pred_ids


def evaluate_instances(
    pred: np.ndarray | torch.Tensor,
    gt: np.ndarray | torch.Tensor,
    ignore_zero: bool = True,
    scores: Mapping[int, float] | None = None,
    ap_thresholds: Sequence[float] = AP_THRESHOLDS,
) -> dict[str, float]:
    """All EM metrics of a predicted instance segmentation against ground truth (same shape).

    ``scores`` maps predicted ids to a confidence (e.g. mean foreground probability, see
    :func:`mtneuro_lab.decoding.postprocess.instance_scores`) used to rank predictions for AP.
    Returns ``arand``, ``arand_precision``, ``arand_recall``, ``voi_split``, ``voi_merge``,
    ``voi``, ``ap50``, ``ap75`` (``ap<100 t>`` for other thresholds), ``n_pred``, ``n_gt``.
    """
    table, pred_ids = instance_table(pred, gt)
    return evaluate_table(table, ignore_zero, ranked_scores(scores, pred_ids), ap_thresholds)
