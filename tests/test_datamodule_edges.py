"""The Task 1 datamodule (:class:`mtneuro_lab.data.datamodules.VolumeDataModule`) outside a fit:
option errors, batches checked against a DDP world (a stand-in trainer saying rank and world
size), facts read from the task without building a split, and the predict loader."""

from __future__ import annotations

from typing import Any

import pytest
from conftest import build

from mtneuro_lab.data.datamodules import VolumeDataModule
from mtneuro_lab.errors import ConfigError


@pytest.fixture(scope="module")
def comps() -> Any:
    return build("+debug=fast")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_size": 0}, "data.batch_size: must be >= 1, got 0"),
        ({"normalize": "minmax"}, "data.normalize: must be 'train_stats' or 'fixed', got 'minmax'"),
    ],
)
def test_options_are_checked_first(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        VolumeDataModule(None, None, None, **kwargs)  # type: ignore[arg-type]
    assert str(err.value) == message


def test_facts_come_from_the_task_without_building_a_split(comps: Any) -> None:
    dm = comps.datamodule
    assert isinstance(dm, VolumeDataModule)
    assert dm.num_classes == comps.task.num_classes and dm.class_names == comps.task.class_names
    assert dm.sample_shape() == comps.task.sample_shape()
    dm.seed_training_batch()  # no training loader yet: nothing to count
    assert "train" not in dm._loaders and "train" not in dm.arrays


def test_batches_are_checked_against_the_ddp_world(comps: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    dm = comps.datamodule
    monkeypatch.setattr(dm, "batch_size", 4)
    monkeypatch.setattr(dm, "eval_batch_size", 6)
    monkeypatch.setattr(dm, "_world", lambda: (0, 3))
    with pytest.raises(ConfigError) as err:
        dm.check_world("train", 100, train=True)
    assert str(err.value) == "data.batch_size: global batch 4 is not divisible by the 3 DDP processes"
    with pytest.raises(ConfigError) as err:
        dm.check_world("test", 2, train=False)
    assert str(err.value) == "task: the test split has 2 samples, fewer than the 3 DDP processes"
    assert dm.check_world("val", 3, train=False) == 6
    monkeypatch.setattr(dm, "_world", lambda: (0, 1))
    with pytest.raises(ConfigError) as err:
        dm.check_world("train", 3, train=True)
    assert str(err.value) == "data.batch_size: 4 is larger than the 3 training samples"


def test_the_predict_loader_serves_the_test_split_in_order(comps: Any) -> None:
    dm = comps.datamodule
    loader = dm.predict_dataloader()
    assert "test" in dm.arrays
    indices = [int(i) for batch in loader for i in batch["index"]]
    assert indices == list(range(len(dm.arrays["test"])))
