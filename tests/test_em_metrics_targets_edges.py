"""Edges of the EM scores (:mod:`mtneuro_lab.metrics.em`) and targets
(:mod:`mtneuro_lab.data.targets`) computed by hand on tiny volumes: ids beyond the volume size,
empty predictions or ground truth, bad inputs, offsets whose axis has no voxel pair, BCD."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import sparse

from mtneuro_lab.data import targets
from mtneuro_lab.errors import ConfigError, DataError
from mtneuro_lab.metrics import em


def test_relabel_of_large_ids_keeps_background_zero() -> None:
    seg = np.array([[10**9, 7], [7, 10**9]])
    new, ids = em.relabel(seg)
    assert ids.tolist() == [0, 7, 10**9]  # no background in seg: 0 is added as id 0
    assert new.tolist() == [[2, 1], [1, 2]]
    new, ids = em.relabel(np.array([0, 50, 50, 3]))  # 50 > size: sorted path, background kept
    assert ids.tolist() == [0, 3, 50] and new.tolist() == [0, 2, 2, 1]


def test_large_ids_score_like_small_ones() -> None:
    gt = np.array([[1, 1, 2, 2]])
    small = em.evaluate_instances(np.array([[1, 1, 2, 2]]), gt)
    large = em.evaluate_instances(np.array([[10**12, 10**12, 5 * 10**11, 5 * 10**11]]), gt)
    assert small == large and small["arand"] == 0.0 and small["ap50"] == 1.0


def test_bad_labels_are_data_errors() -> None:
    with pytest.raises(DataError, match=r"^pred: instance labels must be >= 0, got -1$"):
        em.instance_table(np.array([0, -1]), np.array([0, 1]))
    with pytest.raises(DataError, match=r"^ground truth has no labelled voxels to score \(all 0 with ignore_zero\)$"):
        em.evaluate_instances(np.array([1, 2]), np.array([0, 0]))
    table, _ = em.instance_table(np.array([1, 2]), np.array([1, 1]))
    with pytest.raises(DataError, match=r"^merge_columns: mapping has \(2,\) entries for 3 columns$"):
        em.merge_columns(table, np.array([0, 1]))
    with pytest.raises(DataError, match=r"^evaluate_table: unknown metric 'ap90'$"):
        em.evaluate_table(table, only="ap90")


def test_average_precision_without_ground_truth_or_predictions() -> None:
    assert em.average_precision(sparse.csr_array((0, 0)), 0.5) == 1.0  # nothing to find, nothing found
    assert em.average_precision(sparse.csr_array((0, 2)), 0.5) == 0.0  # only false positives
    assert em.average_precision(sparse.csr_array((2, 0)), 0.5) == 0.0  # nothing found


def test_scores_by_column_rank_the_predictions() -> None:
    gt = np.array([1, 1, 1, 0, 2, 2])
    pred = np.array([1, 1, 1, 2, 2, 0])  # column 1 matches gt 1 exactly; column 2 overlaps gt 2 by 1/3
    table, ids = em.instance_table(pred, gt)
    ranked = em.ranked_scores(np.array([0.0, 0.9, 0.1]), ids)
    assert ranked is not None and ranked.tolist() == [0.9, 0.1]
    out = em.evaluate_table(table, ranked=ranked, only="ap50")
    assert out == {"ap50": 0.5, "n_pred": 2.0, "n_gt": 2.0}


def test_offsets_are_validated() -> None:
    with pytest.raises(ConfigError) as err:
        targets.parse_offsets([[0, "a", 1]])
    assert str(err.value) == "task.offsets[0]: expected [dz, dy, dx] integers, got [0, 'a', 1]"
    with pytest.raises(ConfigError) as err:
        targets.parse_offsets([[0, 3, 0], [0, 3, 0]])
    assert str(err.value) == "task.offsets[1]: offset [0, 3, 0] is listed twice (nearest neighbours are implicit)"
    with pytest.raises(ConfigError) as err:
        targets.target_channels("mask")
    assert str(err.value) == "task.target: must be one of affinity, bc, bcd, got 'mask'"
    with pytest.raises(ConfigError) as err:
        targets.compute_targets("mask", torch.ones(1, 2, 3, 3, dtype=torch.long))
    assert str(err.value) == "task.target: must be one of affinity, bc, bcd, got 'mask'"


def test_an_offset_longer_than_the_crop_is_masked_out() -> None:
    labels = torch.ones(1, 2, 4, 4, dtype=torch.long)
    aff, mask = targets.affinities(labels, targets.parse_offsets([[0, 0, 5], [0, -5, 0]]))
    assert aff.shape == mask.shape == (1, 5, 2, 4, 4)
    assert mask[:, 3:].sum() == 0 and aff[:, 3:].sum() == 0  # no voxel pair 5 apart in x or y
    assert mask[0, 1].sum() == 2 * 3 * 4 and aff[0, 1].sum() == 2 * 3 * 4  # y neighbours: all one object


def test_bcd_targets_and_activation() -> None:
    labels = torch.zeros(1, 1, 6, 6, dtype=torch.long)
    labels[..., 1:5, 1:5] = 1
    with pytest.raises(ValueError, match="bcd targets need the precomputed signed distance"):
        targets.compute_targets("bcd", labels)
    distance = torch.from_numpy(targets.signed_distance(labels[0].numpy(), (1.0, 1.0, 1.0), 2.0))[None]
    target, mask = targets.compute_targets("bcd", labels, distance=distance)
    assert target.shape == (1, 3, 1, 6, 6) and bool(mask.all())
    assert torch.equal(target[:, 2], distance.float())
    full = targets.signed_distance(np.ones((1, 4, 4), np.int64), (1.0, 1.0, 1.0), 2.0)  # no background
    assert full.dtype == np.float16 and (full > 0).all()  # the interior's distance to a (missing) contour
    logits = torch.tensor([[[-20.0], [0.0], [20.0], [0.0]]])
    out = targets.activate(logits, "bcd")
    assert torch.allclose(out[0, :, 0], torch.tensor([0.0, 0.5, 1.0, 0.5]), atol=1e-6)
    out = targets.activate(torch.tensor([[[-20.0], [0.0], [-20.0]]]), "bcd")
    assert torch.allclose(out[0, 2], torch.tensor([-1.0]))  # tanh, not sigmoid
