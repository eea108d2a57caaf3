"""Cube catalogs and Task 1 split entries (:mod:`mtneuro_lab.data.cubes`,
:mod:`mtneuro_lab.data.tasks`): one line naming the key for every malformed entry, on a small
catalog written here."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from conftest import one_line_error

from mtneuro_lab.data.cubes import catalog_from_config
from mtneuro_lab.data.tasks import RegionClassificationTask, SplitArrays, downsample_area, parse_split

CUBES: dict[str, Any] = {
    "regions": ["cortex", "striatum"],
    "roi_ids": {"cortex": 1, "striatum": 2},
    "sets": {"A": {"cortex": {"x": [0, 64], "y": [0, 64]}, "striatum": {"x": [100, 164], "y": [0, 64]}}},
}
CATALOG = catalog_from_config(CUBES)
SPLITS = {
    "train": [{"set": "A", "z": [0, 20]}],
    "val": [{"set": "A", "z": [40, 45]}],
    "test": [{"set": "A", "z": [60, 65]}],
}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"roi_ids": {"cortex": 1}}, "cubes.roi_ids: no id for region(s) ['striatum']"),
        (
            {"sets": {"A": {"thalamus": {"x": [0, 8], "y": [0, 8]}}}},
            "cubes.sets.A.thalamus: unknown region; known: ['cortex', 'striatum']",
        ),
        (
            {"sets": {"A": {"cortex": {"x": [64, 0], "y": [0, 8]}}}},
            "cubes.sets.A.cortex.x: expected 0 <= start < stop, got [64, 0]",
        ),
    ],
)
def test_catalog_errors_name_the_key(change: dict, message: str) -> None:
    assert one_line_error(catalog_from_config, {**CUBES, **change}) == message


def test_catalog_lookups() -> None:
    assert CATALOG.cube("A", "striatum").x == (100, 164)
    assert one_line_error(CATALOG.cube, "B", "cortex") == "cubes.sets: unknown cube set 'B'; known: ['A']"
    assert (
        one_line_error(CATALOG.cube, "A", "vp") == "cubes.sets.A: no cube for region 'vp'; has: ['cortex', 'striatum']"
    )


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (
            {"set": "A", "z": [0, 5], "slices": 3},
            "task.splits.val[0]: unknown key(s) ['slices']; allowed: set, box, z, regions",
        ),
        ({"set": "A", "z": ["a", 5]}, "task.splits.val[0].z: expected [start, stop), got ['a', 5]"),
        (
            {"box": {"x": [0, "end"], "y": [0, 8]}, "z": [0, 5]},
            "task.splits.val[0].box.x: expected [start, stop), got [0, 'end']",
        ),
        (
            {"set": "A", "z": [0, 5], "regions": ["thalamus"]},
            "cubes.sets.A: no cube for region 'thalamus'; has: ['cortex', 'striatum']",
        ),
    ],
)
def test_split_entry_errors_name_the_key(entry: dict, message: str) -> None:
    assert one_line_error(parse_split, "val", [entry], CATALOG) == message


def test_box_entries_and_regions_parse() -> None:
    (part,) = parse_split("val", [{"box": {"x": [8, 40], "y": [0, 32]}, "z": [3, 9], "regions": ["cortex"]}], CATALOG)
    assert (part.set_name, part.z, part.regions, part.box) == ("box_x8_y0", (3, 9), ("cortex",), ((8, 40), (0, 32)))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"splits": {"train": SPLITS["train"], "val": SPLITS["val"]}},
            "task.splits: missing split(s) ['test']; need train, val, test",
        ),
        ({"splits": {**SPLITS, "holdout": []}}, "task.splits: unknown split(s) ['holdout']; allowed: train, val, test"),
    ],
)
def test_task_split_names(kwargs: dict, message: str) -> None:
    assert one_line_error(RegionClassificationTask, "roi", **kwargs) == message


def test_binding_checks_regions_and_empty_splits() -> None:
    task = RegionClassificationTask("roi", SPLITS, regions=["cortex", "hippocampus"])
    assert (
        one_line_error(task.bind, CATALOG)
        == "task.regions: unknown region 'hippocampus'; known: ['cortex', 'striatum']"
    )
    empty = RegionClassificationTask("roi", {**SPLITS, "val": []})
    assert one_line_error(empty.bind, CATALOG) == "task.splits.val: is empty"


def test_area_downsampling_needs_a_divisible_tile() -> None:
    assert (
        one_line_error(downsample_area, np.zeros((2, 6, 7), np.uint8), 2)
        == "tile of 6x7 is not divisible by downsample 2"
    )
    pooled = downsample_area(np.array([[[0, 2], [4, 6]]], np.uint8), 2)
    assert pooled.tolist() == [[[3]]]


def test_split_arrays_count_their_bytes() -> None:
    none = np.zeros(3, np.int64)
    arrays = SplitArrays(images=np.zeros((3, 4, 4), np.uint8), targets=none, regions=none, z=none)
    assert len(arrays) == 3 and arrays.nbytes == 3 * 16 + 3 * 8
