"""One-line errors of :class:`mtneuro_lab.data.em.EMTask` for every option, the source checks
before any read, and what ``build`` does with unusual volumes (sections as instances, ids
beyond int32, BCD distances), on small in-memory volumes."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from conftest import one_line_error

from mtneuro_lab.data.em import EMTask
from mtneuro_lab.errors import ConfigError, DataError

SPLITS = {"train": {"z": [0, 8]}, "val": {"z": [8, 10]}, "test": {"z": [10, 12]}}


class Volumes:
    """A source of whole in-memory ``(z, y, x)`` channels placed at the origin."""

    def __init__(self, voxel_size: tuple[float, float, float] | None = None, **channels: np.ndarray) -> None:
        self.arrays = channels
        z, y, x = next(iter(channels.values())).shape
        self.extent = ((0, x), (0, y), (0, z))
        self.channels = tuple(channels)
        self.voxel_size = voxel_size

    def cutout(self, channel: str, x: Any, y: Any, z: Any) -> np.ndarray:
        return self.arrays[channel][z[0] : z[1], y[0] : y[1], x[0] : x[1]]


def volumes(labels: np.ndarray | None = None, image_dtype: Any = np.uint8, **kwargs: Any) -> Volumes:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (12, 16, 16)).astype(image_dtype)
    if labels is None:
        labels = np.repeat(np.arange(4, dtype=np.uint16), 4)[None, None, :].repeat(12, 0).repeat(16, 1)
    return Volumes(image=image, labels=labels, **kwargs)


def _message(**kwargs: Any) -> str:
    return one_line_error(EMTask, "t", raises=ConfigError, **{"splits": SPLITS, "crop": [4, 8, 8], **kwargs})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"target": "mask"}, "task.target: must be one of affinity, bc, bcd, got 'mask'"),
        ({"downsample": 3}, "task.downsample: must be one of 1, 2, 4, got 3"),
        ({"contour_width": 0}, "task.contour_width: must be >= 1, got 0"),
        ({"distance_scale": 0.0}, "task.distance_scale: must be > 0 (nm), got 0.0"),
        ({"samples_per_epoch": 0}, "task.samples_per_epoch: must be >= 1, got 0"),
        ({"eval_overlap": 1.0}, "task.eval_overlap: must lie in [0, 1), got 1.0"),
        ({"splits": {"train": {}, "val": {}}}, "task.splits: need exactly train, val, test; got ['train', 'val']"),
        ({"splits": [1, 2, 3]}, "task.splits: need exactly train, val, test; got [1, 2, 3]"),
        ({"metric": "dice"}, "task.metric: must be one of arand, voi, ap50, ap75, got 'dice'"),
        ({"instances": "mask"}, "task.instances: must be one of ids, section_components, got 'mask'"),
        ({"crop": [4, "eight", 8]}, "task.crop: expected 3 integers, got [4, 'eight', 8]"),
        ({"crop": [4, 8]}, "task.crop: expected 3 integers >= 1, got [4, 8]"),
        ({"voxel_size": [30, "six", 6]}, "task.voxel_size: expected [z, y, x] numbers, got [30, 'six', 6]"),
        ({"voxel_size": [30, 0, 6]}, "task.voxel_size: expected [z, y, x] positive numbers, got [30, 0, 6]"),
        (
            {"splits": {**SPLITS, "val": [8, 10]}},
            "task.splits.val: expected {z: [start, stop] or null, image: <channel>, labels: <channel>}, got [8, 10]",
        ),
        (
            {"splits": {**SPLITS, "test": {"z": [10, 12], "labels": ""}}},
            "task.splits.test.labels: expected a channel name, got ''",
        ),
    ],
)
def test_option_errors_name_the_key(kwargs: dict, message: str) -> None:
    assert _message(**kwargs) == message


def test_postprocess_typo_names_the_section() -> None:
    assert _message(postprocess={"thresholds": [0.5]}).startswith("task.postprocess: ")
    task = EMTask("t", SPLITS, crop=[4, 8, 8], postprocess={})
    assert task.postprocess is not None


def test_source_checks_before_any_read() -> None:
    task = EMTask("t", SPLITS, crop=[4, 8, 8])
    with pytest.raises(ConfigError) as err:
        task.check_source(object())  # type: ignore[arg-type]
    assert str(err.value) == (
        "task=t: object has no extent; EM tasks read whole volumes from source=phantom or source=local"
    )
    with pytest.raises(ConfigError) as err:
        task.build("val", object())  # type: ignore[arg-type]
    assert str(err.value).startswith("task=t: object has no extent")
    mito = EMTask("t", SPLITS, labels="mito", crop=[4, 8, 8])
    with pytest.raises(ConfigError) as err:
        mito.check_source(volumes())  # type: ignore[arg-type]
    assert str(err.value) == (
        "task.splits.train.labels: channel 'mito' is not provided by Volumes; available: image, labels"
    )


def test_bcd_needs_a_voxel_size_from_the_task_or_the_source() -> None:
    task = EMTask("t", SPLITS, target="bcd", crop=[4, 8, 8], downsample=2)
    with pytest.raises(ConfigError) as err:
        task.check_source(volumes())  # type: ignore[arg-type]
    assert str(err.value).startswith("task.voxel_size: Volumes does not know its voxel size; set")
    with pytest.raises(ConfigError) as err:
        task.effective_voxel_size(volumes())  # type: ignore[arg-type]
    assert str(err.value) == "task.voxel_size: unknown for this source; set task.voxel_size=[z,y,x] (nm)"
    source = volumes(voxel_size=(30.0, 6.0, 6.0))
    task.check_source(source)  # type: ignore[arg-type]
    assert task.effective_voxel_size(source) == (30.0, 12.0, 12.0)  # type: ignore[arg-type]
    val = task.build("val", source)  # type: ignore[arg-type]
    assert val.shape == (2, 8, 8) and val.distance is not None and val.distance.shape == (2, 8, 8)
    assert val.distance.min() < 0 < val.distance.max()  # boundaries and interiors


def test_wrong_dtypes_are_data_errors() -> None:
    task = EMTask("t", SPLITS, crop=[4, 8, 8])
    with pytest.raises(DataError) as err:
        task.build("val", volumes(image_dtype=np.float32))  # type: ignore[arg-type]
    assert str(err.value) == "task.splits.val.image: channel 'image' has dtype float32, expected uint8"
    with pytest.raises(DataError) as err:
        task.build("val", volumes(labels=np.zeros((12, 16, 16), np.float32)))  # type: ignore[arg-type]
    assert str(err.value) == (
        "task.splits.val.labels: channel 'labels' has dtype float32, expected integer instance ids"
    )
    with pytest.raises(DataError) as err:
        task.build("val", volumes(labels=np.full((12, 16, 16), -3, np.int64)))  # type: ignore[arg-type]
    assert str(err.value) == "labels (val): instance ids must be >= 0, got -3"


def test_ids_beyond_int32_are_renumbered_keeping_zero_and_distinct_ids() -> None:
    labels = np.zeros((12, 16, 16), np.uint64)
    labels[:, :, 4:8] = 2**40
    labels[:, :, 8:] = 2**40 + 7
    val = EMTask("t", SPLITS, crop=[4, 8, 8]).build("val", volumes(labels=labels))  # type: ignore[arg-type]
    assert val.labels.dtype == np.int32
    assert sorted(np.unique(val.labels)) == [0, 1, 2]
    assert (val.labels[:, :, :4] == 0).all() and (val.labels[:, :, 4:8] == 1).all()
    labels[labels == 0] = 2**33  # no background: ids start at 1
    val = EMTask("t", SPLITS, crop=[4, 8, 8]).build("val", volumes(labels=labels))  # type: ignore[arg-type]
    assert sorted(np.unique(val.labels)) == [1, 2, 3]


def test_section_components_are_unique_per_section() -> None:
    mask = np.zeros((12, 16, 16), np.uint8)
    mask[:, 2:6, 2:6] = 1
    mask[:, 10:14, 10:14] = 1
    task = EMTask("t", SPLITS, crop=[4, 8, 8], instances="section_components")
    val = task.build("val", volumes(labels=mask))  # type: ignore[arg-type]
    assert sorted(np.unique(val.labels)) == [0, 1, 2, 3, 4]  # two cells in each of two sections
    assert val.labels[0, 3, 3] != val.labels[1, 3, 3]


def test_a_crop_larger_than_the_training_volume_is_refused() -> None:
    task = EMTask("t", SPLITS, crop=[4, 16, 16], downsample=2)
    with pytest.raises(DataError) as err:
        task.build("train", volumes())  # type: ignore[arg-type]
    assert str(err.value) == (
        "task.crop: [4, 16, 16] plus target context [6, 18, 18] does not fit the training volume "
        "[8, 8, 8] (after downsample 2)"
    )
