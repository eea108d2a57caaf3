"""Option errors of the Task 2 segmentation task, the Task 3 semantic read-out task and the EM
phantom source, each one line naming its key; the semantic task's downsample adopted from a
checkpoint, the segmentation task's in-plane shape check, and an EM phantom that pickles
without its memory maps (DDP spawn)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
from conftest import config_error

from mtneuro_lab.data.cubes import catalog_from_config
from mtneuro_lab.data.seg_tasks import SegmentationTask
from mtneuro_lab.data.semantic_task import SemanticFeatureTask
from mtneuro_lab.data.sources.phantom_em import PhantomEMSource, check_shape

SPLITS = {
    "train": [{"set": "A", "z": [0, 20]}],
    "val": [{"set": "A", "z": [40, 45]}],
    "test": [{"set": "A", "z": [60, 65]}],
}
SEG = {"splits": SPLITS, "class_names": ["bg", "cell"], "class_map": {0: 0, 1: 1}}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"dims": 4}, "task.dims: must be 2 or 3, got 4"),
        ({"dims": 3, "volume_z": 0}, "task.volume_z: must be >= 1, got 0"),
        ({"train_z_stride": 0}, "task.train_z_stride: must be >= 1 or null, got 0"),
        ({"class_map": {"bg": 0, 1: 1}}, "task.class_map: expected {label value: class index}, got {'bg': 0, 1: 1}"),
    ],
)
def test_segmentation_options_name_their_key(kwargs: dict, message: str) -> None:
    assert config_error(SegmentationTask, "seg", **{**SEG, **kwargs}) == message


def test_segmentation_windows_share_one_in_plane_shape() -> None:
    catalog = catalog_from_config(
        {
            "regions": ["cortex", "striatum"],
            "roi_ids": {"cortex": 1, "striatum": 2},
            "sets": {"A": {"cortex": {"x": [0, 64], "y": [0, 64]}, "striatum": {"x": [100, 132], "y": [0, 64]}}},
        }
    )
    task = SegmentationTask("seg", **SEG)
    assert (
        config_error(task.bind, catalog)
        == "task.splits: all windows must share one in-plane shape, got [(64, 32), (64, 64)]"
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"downsample": 3}, "task.downsample: must be one of 1, 2, 4 or null, got 3"),
        ({"sample_unit": "pixel"}, "task.sample_unit: must be quadrants or tile, got 'pixel'"),
        ({"connectivity": 8}, "task.connectivity: must be one of 6, 18, 26, got 8"),
        ({"centroid": "1d"}, "task.centroid: must be 2d or 3d, got '1d'"),
        ({"cv": "loo"}, "task.cv: must be shuffled or blocked, got 'loo'"),
        ({"umap_neighbors": 1}, "task.umap_neighbors: must be >= 2, got 1"),
        ({"embed_batch_size": 0}, "task.embed_batch_size: must be >= 1, got 0"),
    ],
)
def test_semantic_options_name_their_key(kwargs: dict, message: str) -> None:
    assert config_error(SemanticFeatureTask, **kwargs) == message


def test_semantic_downsample_comes_from_the_checkpoint_only_when_unset() -> None:
    task = SemanticFeatureTask()
    assert config_error(task.use_downsample, 3) == "task.downsample: the checkpoint's downsample 3 is not 1, 2 or 4"
    task.use_downsample(4)
    assert task.downsample == 4
    fixed = SemanticFeatureTask(downsample=1)
    fixed.use_downsample(4)
    assert fixed.downsample == 1


def test_phantom_em_options() -> None:
    assert config_error(PhantomEMSource, seed=-1) == "source.seed: must be >= 0, got -1"
    assert (
        config_error(check_shape, [8, "64", None])
        == "source.em_shape: expected [z, y, x] integers, got [8, '64', None]"
    )


def test_phantom_em_pickles_without_its_memory_maps(tmp_path: Path) -> None:
    source = PhantomEMSource(seed=3, cache_dir=str(tmp_path), shape=(8, 32, 32))
    assert source.z_extent == (0, 8)
    first = np.array(source.cutout("labels", (0, 32), (0, 32), (2, 4)))
    assert source._arrays is not None
    copy = pickle.loads(pickle.dumps(source))
    assert copy._arrays is None and source._arrays is not None
    np.testing.assert_array_equal(copy.cutout("labels", (0, 32), (0, 32), (2, 4)), first)
