"""Edges of EM decoding (:mod:`mtneuro_lab.decoding`) and its scoring (:mod:`mtneuro_lab.methods.em_eval`):
output files, shape errors, channel counts per target kind, post-processing options, and
instances kept within one section."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch
from conftest import one_line_error

from mtneuro_lab.config.sections import PostprocessConfig, PostprocessGrid
from mtneuro_lab.decoding import postprocess as pp
from mtneuro_lab.decoding.volume import ChunkedStats, open_output, predict_chunked
from mtneuro_lab.methods import em_eval


def test_outputs_are_zarr_or_hdf5(tmp_path: Path) -> None:
    out = open_output(tmp_path / "probs.h5", (2, 4, 8, 8), chunks=(1, 2, 8, 8))
    out[:] = 0.25
    out.file.close()
    with h5py.File(tmp_path / "probs.h5", "r") as f:
        data = f["probabilities"]
        assert data.shape == (2, 4, 8, 8) and data.dtype == np.float16 and data.compression == "gzip"
        assert float(data[1, 3, 7, 7]) == 0.25
    assert one_line_error(open_output, tmp_path / "probs.tif", (2, 4, 8, 8)) == (
        f"output: {tmp_path / 'probs.tif'} must end in .zarr, .h5 or .hdf5"
    )
    assert ChunkedStats(windows=2, voxels=1000, wall_s=0.5, cpu_s=0.4).voxels_per_s == 2000.0


def test_chunked_prediction_checks_shapes_before_predicting() -> None:
    def never(x: torch.Tensor) -> torch.Tensor:
        raise AssertionError("predicted despite a shape error")

    norm = lambda slab: torch.from_numpy(slab).float()[:, None]  # noqa: E731
    assert one_line_error(predict_chunked, never, np.zeros((8, 8), np.uint8), np.zeros((1, 8, 8)), (2, 4, 4), norm) == (
        "predict: expected a (z, y, x) volume, got shape (8, 8)"
    )
    assert (
        one_line_error(predict_chunked, never, np.zeros((4, 8, 8), np.uint8), np.zeros((2, 4, 8, 9)), (2, 4, 4), norm)
        == "predict: output shape (2, 4, 8, 9) does not hold (2, *(4, 8, 8))"
    )


def test_prediction_shapes() -> None:
    assert one_line_error(pp.sliding_window_predict, lambda x: x, torch.zeros(1, 4, 8, 8), (2, 4, 4)) == (
        "sliding_window_predict: expected (B, 1, Z, Y, X), got shape (1, 4, 8, 8)"
    )
    batch = torch.rand(1, 3, 2, 4, 4)
    assert np.array_equal(pp.as_prediction(batch), batch[0].numpy())
    assert (
        one_line_error(pp.as_prediction, np.zeros((2, 4, 4)))
        == "segment: expected a (C, Z, Y, X) prediction, got shape (2, 4, 4)"
    )


@pytest.mark.parametrize(
    ("channels", "kind", "settings", "message"),
    [
        (2, "affinity", None, "segment: affinity predictions need >= 3 channels, got 2"),
        (
            3,
            "affinity",
            [{"seed_foreground": 0.9}],
            "segment: affinity settings vary threshold only, got [{'seed_foreground': 0.9}]",
        ),
        (1, "bc", None, "segment: bc predictions need 2 channels, got 1"),
        (2, "bcd", None, "segment: bcd predictions need 3 channels, got 2"),
        (3, "mask", None, "task.target: must be one of affinity, bc, bcd, got 'mask'"),
    ],
)
def test_candidates_need_the_channels_of_their_kind(channels: int, kind: str, settings: Any, message: str) -> None:
    pred = np.zeros((channels, 2, 4, 4), np.float32)
    assert one_line_error(lambda: list(pp.candidates(pred, kind, settings=settings))) == message


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"grid": {"threshold": [0.1, 0.1]}}, "task.postprocess.grid.threshold: values repeat in [0.1, 0.1]"),
        ({"seed_distance": 1.5}, "task.postprocess.seed_distance: must lie in [-1, 1], got 1.5"),
        ({"aff_low": 0.6, "aff_high": 0.5}, "task.postprocess.aff_low: must be below aff_high (0.5), got 0.6"),
        ({"min_size": -1}, "task.postprocess.min_size: must be >= 0, got -1"),
    ],
)
def test_postprocess_options_name_their_key(kwargs: dict, message: str) -> None:
    assert one_line_error(PostprocessConfig, **kwargs) == message


def test_postprocess_grid_typo_names_the_section() -> None:
    assert one_line_error(PostprocessConfig, grid={"thresholds": [0.5]}).startswith("task.postprocess.grid: ")
    assert PostprocessConfig(grid={"threshold": [0.3]}).grid == PostprocessGrid(threshold=[0.3])


def test_choice_needs_a_known_metric_and_a_candidate() -> None:
    assert one_line_error(em_eval.better, "dice", 0.5, 0.4) == (
        "task.metric: must be one of arand, voi, ap50, ap75, got 'dice'"
    )
    assert em_eval.better("arand", 0.1, 0.2) and em_eval.better("ap50", 0.8, 0.2)
    assert one_line_error(em_eval.choose, iter([]), np.ones((2, 4, 4), np.int64), "arand") == (
        "task.postprocess.grid: no candidate to choose from"
    )


def test_section_instances_never_cross_sections() -> None:
    """One object through both sections: affinities say so, but with ``sections`` the z
    affinities are ignored and each section holds its own instance."""
    prob = np.ones((3, 2, 6, 6), np.float32)
    gt = np.stack([np.ones((6, 6), np.int64), 2 * np.ones((6, 6), np.int64)])
    cfg = PostprocessConfig(select="fixed", threshold=0.5)
    _, joined = em_eval.evaluate_volume(prob, gt, "affinity", cfg, sections=False)
    metrics, split = em_eval.evaluate_volume(prob, gt, "affinity", cfg, sections=True)
    assert len(np.unique(joined[joined > 0])) == 1
    assert split[0].max() > 0 and split[1].max() > 0 and set(np.unique(split[0])).isdisjoint(np.unique(split[1]))
    assert metrics["arand"] == pytest.approx(0.0)
    choice = em_eval.search_postprocess(prob, gt, "affinity", cfg, "arand", sections=True, search=False)
    assert choice.metrics["arand"] == pytest.approx(0.0)
    bc = np.ones((2, 2, 6, 6), np.float32)
    assert em_eval.in_plane_only(bc, "bc") is bc  # no z channel to drop
