"""Pooled segmentation metrics checked against hand-computed confusion counts and torchmetrics."""

from __future__ import annotations

import math

import pytest
import torch
from torchmetrics.classification import MulticlassF1Score, MulticlassJaccardIndex

from mtneuro_lab.metrics.segmentation import SegmentationMetrics, nanmean, scores_from_confusion

NAMES = ["bg_axon", "vessel", "cell"]


def one_hot_logits(pred: torch.Tensor, k: int) -> torch.Tensor:
    """Logits ``(B, k, *spatial)`` whose argmax is ``pred``."""
    return torch.nn.functional.one_hot(pred, k).movedim(-1, 1).float()


def test_scores_from_hand_counted_confusion() -> None:
    # truth (rows) x prediction (columns), counted by hand for the case below
    truth = torch.tensor([[0, 0, 0, 1], [1, 2, 2, 0]])
    pred = torch.tensor([[0, 0, 1, 1], [2, 2, 0, 0]])
    # class 0: TP 3 (0,0),(0,1),(1,3); FN 1 (0,2)->1; FP 1 (1,2) true 2 -> 0
    # class 1: TP 1 (0,3); FN 1 (1,0)->2; FP 1 (0,2)
    # class 2: TP 1 (1,1); FN 1 (1,2)->0; FP 1 (1,0)
    metrics = SegmentationMetrics(NAMES)
    metrics.update("test", one_hot_logits(pred, 3), truth)
    out = metrics.compute("test")
    expected_f1 = {"bg_axon": 2 * 3 / (2 * 3 + 1 + 1), "vessel": 2 / 4, "cell": 2 / 4}
    expected_iou = {"bg_axon": 3 / 5, "vessel": 1 / 3, "cell": 1 / 3}
    for name in NAMES:
        assert out[f"test/f1_{name}"].item() == pytest.approx(expected_f1[name])
        assert out[f"test/iou_{name}"].item() == pytest.approx(expected_iou[name])
    assert out["test/f1_mean"].item() == pytest.approx(sum(expected_f1.values()) / 3)
    assert out["test/iou_mean"].item() == pytest.approx(sum(expected_iou.values()) / 3)
    assert out["test/acc"].item() == pytest.approx(5 / 8)
    assert metrics.last_confusion["test"].tolist() == [[3, 1, 0], [0, 1, 1], [1, 0, 1]]


def test_pooled_over_batches_not_averaged_per_image() -> None:
    """Two images: pooled IoU differs from the mean of per-image IoUs, and we report pooled."""
    metrics = SegmentationMetrics(["a", "b"])
    big_truth = torch.zeros(1, 10, 10, dtype=torch.long)
    big_truth[0, :5] = 1
    big_pred = big_truth.clone()  # perfect on the first image
    small_truth = torch.ones(1, 2, 2, dtype=torch.long)
    small_pred = torch.zeros(1, 2, 2, dtype=torch.long)  # all wrong on the second
    metrics.update("val", one_hot_logits(big_pred, 2), big_truth)
    metrics.update("val", one_hot_logits(small_pred, 2), small_truth)
    out = metrics.compute("val")
    # pooled: class a TP 50 FP 4 FN 0 -> 50/54; class b TP 50 FP 0 FN 4 -> 50/54
    assert out["val/iou_a"].item() == pytest.approx(50 / 54)
    assert out["val/iou_b"].item() == pytest.approx(50 / 54)
    per_image_mean = (1.0 + 0.0) / 2  # image 1 mean IoU 1, image 2: a 0/4, b 0/4 -> 0
    assert out["val/iou_mean"].item() != pytest.approx(per_image_mean)


def test_iou_equals_f1_over_two_minus_f1_and_matches_torchmetrics() -> None:
    g = torch.Generator().manual_seed(0)
    truth = torch.randint(0, 4, (6, 16, 16), generator=g)
    logits = torch.randn(6, 4, 16, 16, generator=g) + 2 * one_hot_logits(truth, 4) * (
        torch.rand(6, 1, 16, 16, generator=g) > 0.5
    )
    metrics = SegmentationMetrics(["bg", "vessel", "cell", "axon"])
    for s in range(0, 6, 2):  # three batches, pooled
        metrics.update("test", logits[s : s + 2], truth[s : s + 2])
    out = metrics.compute("test")
    f1_ref = MulticlassF1Score(num_classes=4, average=None)(logits.argmax(1), truth)
    iou_ref = MulticlassJaccardIndex(num_classes=4, average=None)(logits.argmax(1), truth)
    for i, name in enumerate(["bg", "vessel", "cell", "axon"]):
        f1, iou = out[f"test/f1_{name}"].item(), out[f"test/iou_{name}"].item()
        assert iou == pytest.approx(f1 / (2 - f1), abs=1e-6)
        assert f1 == pytest.approx(f1_ref[i].item(), abs=1e-6)
        assert iou == pytest.approx(iou_ref[i].item(), abs=1e-6)
    assert 0 < out["test/iou_mean"].item() < out["test/f1_mean"].item() < 1


def test_absent_class_is_nan_and_left_out_of_the_mean() -> None:
    confusion = torch.tensor([[4, 1, 0], [1, 2, 0], [0, 0, 0]])
    scores = scores_from_confusion(confusion)
    assert math.isnan(scores["iou"][2].item()) and math.isnan(scores["f1"][2].item())
    assert nanmean(scores["iou"]).item() == pytest.approx((4 / 6 + 2 / 4) / 2)


def test_compute_resets_the_stage() -> None:
    metrics = SegmentationMetrics(["a", "b"])
    truth = torch.tensor([[0, 1]])
    metrics.update("train", one_hot_logits(torch.tensor([[1, 0]]), 2), truth)
    assert metrics.compute("train")["train/iou_mean"].item() == 0.0
    assert not metrics.has_data("train")
    metrics.update("train", one_hot_logits(truth, 2), truth)
    assert metrics.compute("train")["train/iou_mean"].item() == 1.0
