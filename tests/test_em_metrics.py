"""EM metrics, targets and post-processing on small hand-made volumes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mtneuro_lab.data import targets
from mtneuro_lab.decoding.postprocess import PostprocessConfig, segment, sliding_window_predict
from mtneuro_lab.errors import ConfigError, DataError
from mtneuro_lab.metrics.em import evaluate_instances


def two_cells() -> np.ndarray:
    gt = np.zeros((4, 20, 20), np.int64)
    gt[:, :9] = 1
    gt[:, 11:] = 2
    return gt


def blobs() -> np.ndarray:
    """Three separated boxes on background 0 (mitochondria-like)."""
    gt = np.zeros((8, 32, 32), np.int64)
    gt[1:7, 2:10, 2:10] = 1
    gt[2:6, 14:26, 4:12] = 2
    gt[0:8, 6:14, 18:30] = 3
    return gt


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    pairs = np.unique(np.stack([a.ravel(), b.ravel()]), axis=1)
    return len(np.unique(pairs[0])) == pairs.shape[1] == len(np.unique(pairs[1]))


def test_segmentation_against_itself_is_perfect():
    gt = two_cells()
    for pred in (gt, gt * 7 + 3 * (gt > 0)):  # ids do not matter
        m = evaluate_instances(pred, gt)
        assert m["arand"] == pytest.approx(0, abs=1e-12)
        assert m["voi_split"] == pytest.approx(0, abs=1e-12)
        assert m["voi_merge"] == pytest.approx(0, abs=1e-12)
        assert m["ap50"] == m["ap75"] == 1.0
    scored = evaluate_instances(gt, gt, scores={1: 0.2, 2: 0.9})
    assert scored["ap50"] == scored["ap75"] == 1.0


def test_split_raises_voi_split_and_merge_raises_voi_merge():
    gt = two_cells()
    split = gt.copy()
    split[:, :4][split[:, :4] == 1] = 3
    merged = np.where(gt == 2, 1, gt)
    s, m = evaluate_instances(split, gt), evaluate_instances(merged, gt)
    assert s["voi_split"] > 0.1 and s["voi_merge"] == pytest.approx(0, abs=1e-12)
    assert m["voi_merge"] > 0.1 and m["voi_split"] == pytest.approx(0, abs=1e-12)
    assert s["arand"] > 0 and m["arand"] > 0
    # merging the two halves (one bit of information) costs exactly 0.5 bit per voxel on average
    assert m["voi_merge"] == pytest.approx(1.0, abs=1e-6)


def test_ignore_zero_leaves_ground_truth_boundary_out():
    gt = two_cells()
    pred = np.where(gt == 0, 1, gt)  # boundary voxels given to cell 1
    assert evaluate_instances(pred, gt, ignore_zero=True)["arand"] == pytest.approx(0, abs=1e-12)
    assert evaluate_instances(pred, gt, ignore_zero=False)["arand"] > 0


def test_ap_thresholds_and_missing_objects():
    gt = blobs()
    missing = np.where(gt == 3, 0, gt)
    m = evaluate_instances(missing, gt, ignore_zero=False)
    assert m["ap50"] == pytest.approx(2 / 3)  # precision 1, recall 2/3, one operating point
    shrunk = gt.copy()
    shrunk[(gt == 1) & (np.arange(32)[None, None, :] >= 7)] = 0  # object 1 keeps 5/8 of its voxels
    m = evaluate_instances(shrunk, gt, ignore_zero=False)
    assert m["ap50"] == 1.0
    assert m["ap75"] == pytest.approx((2 / 3) * (2 / 3))
    # ranking matters: a confident false positive lowers AP, an unconfident one (ranked last) does not
    fp = gt.copy()
    fp[0, 28:32, 0:4] = 9
    high = evaluate_instances(fp, gt, ignore_zero=False, scores={1: 0.5, 2: 0.5, 3: 0.5, 9: 0.99})["ap50"]
    low = evaluate_instances(fp, gt, ignore_zero=False, scores={1: 0.5, 2: 0.5, 3: 0.5, 9: 0.01})["ap50"]
    assert low == 1.0 and high < 1.0


def test_bad_inputs_are_one_line_errors():
    with pytest.raises(DataError, match="shape"):
        evaluate_instances(np.zeros((2, 3, 3), int), np.zeros((2, 3, 4), int))
    with pytest.raises(DataError, match="integer"):
        evaluate_instances(np.zeros((2, 3, 3)), np.zeros((2, 3, 3), int))
    with pytest.raises(ConfigError, match="task.postprocess.threshold"):
        PostprocessConfig(threshold=1.5)
    with pytest.raises(ConfigError, match="task.postprocess.scoring"):
        PostprocessConfig(scoring="max")


def test_affinity_convention_and_exact_crops():
    gt = torch.from_numpy(two_cells())[None]
    aff, mask = targets.affinities(gt, targets.NEAREST_OFFSETS)
    assert aff.shape == (1, 3, 4, 20, 20)
    assert mask[0, 0, 0].sum() == 0 and mask[0, 0, 1:].min() == 1  # no z-neighbour below slice 0
    assert aff[0, 1, 0, 5, 3] == 1 and aff[0, 1, 0, 9, 3] == 0  # y-affinity into the boundary row 9
    assert aff[0, 1, 0, 11, 3] == 0 and aff[0, 1, 0, 12, 3] == 1
    # a crop with margin gets exactly the affinities of the big volume, long-range offsets too
    offs = targets.parse_offsets([[0, 3, 0], [2, 0, -2]])
    big = torch.from_numpy(blobs())[None]
    full, _ = targets.affinities(big, offs)
    crop, cmask = targets.affinities(big[:, 1:8, 4:30, 5:31], offs, margin=(2, 3))
    assert torch.equal(crop, full[:, :, 3:6, 7:27, 8:28]) and cmask.min() == 1
    assert targets.target_channels("affinity", [[0, 3, 0]]) == ["aff_z", "aff_y", "aff_x", "aff_0_3_0"]
    with pytest.raises(ConfigError, match="task.offsets"):
        targets.parse_offsets([[0, 0]])


def test_affinities_agglomerate_back_to_the_segmentation():
    gt = two_cells()
    gt[:, :9, 10:] = 0
    gt[:, :9, 11:] = 3  # three cells separated by a boundary, plus z-touching cells below
    gt[2:, 11:] = 4
    aff, _ = targets.affinities(torch.from_numpy(gt)[None], targets.NEAREST_OFFSETS)
    seg = segment(aff[0], "affinity")
    fg = gt > 0
    assert same_partition(seg[fg], gt[fg])
    assert evaluate_instances(seg, gt)["arand"] == pytest.approx(0, abs=1e-12)


@pytest.mark.parametrize("kind", ["bc", "bcd"])
def test_bc_targets_watershed_back_to_instances(kind):
    gt = blobs()
    lab = torch.from_numpy(gt)[None]
    distance = torch.from_numpy(targets.signed_distance(gt, (30, 6, 6), 50.0))[None] if kind == "bcd" else None
    target, _ = targets.compute_targets(kind, lab, distance=distance)
    assert target.shape[1] == len(targets.target_channels(kind))
    seg = segment(target[0], kind, PostprocessConfig(min_seed_size=4, seed_distance=0.2))  # blobs are tiny
    assert same_partition(seg, gt)
    if kind == "bcd":
        d = target[0, 2]
        assert d[gt == 0].max() <= 0 and d[gt > 0].min() >= 0 and float(d.abs().max()) < 1


def test_sliding_window_covers_whole_volume_and_blends():
    image = torch.randn(1, 1, 7, 40, 37)
    out = sliding_window_predict(lambda x: torch.cat([x, 2 * x], 1), image, (4, 16, 16), overlap=0.5)
    assert out.shape == (1, 2, 7, 40, 37)
    assert torch.allclose(out[:, :1], image, atol=1e-5) and torch.allclose(out[:, 1:], 2 * image, atol=1e-5)
    small = torch.randn(1, 1, 2, 8, 8)  # smaller than the window: padded and cropped back
    assert torch.allclose(sliding_window_predict(lambda x: x, small, (4, 16, 16)), small, atol=1e-5)
