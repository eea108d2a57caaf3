"""EM phantom, EM tasks and their datamodule (phantom and the real gala FIB-SEM volume)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import build as components
from conftest import compose, run_inproc

from mtneuro_lab.config.schema import validate_config
from mtneuro_lab.data import targets
from mtneuro_lab.data.em import EMDataModule, EMTask
from mtneuro_lab.data.sources.phantom_em import PhantomEMSource
from mtneuro_lab.errors import ConfigError, DataError
from mtneuro_lab.methods.em_eval import evaluate_volume

SMALL = [
    "source.em_shape=[24,64,64]",
    "task.crop=[4,32,32]",
    "task.samples_per_epoch=16",
    "task.splits.train.z=[0,14]",
    "task.splits.val.z=[14,18]",
    "task.splits.test.z=[18,24]",
    "data.batch_size=4",
    "model=mae_finetune",
]


def test_phantom_em_is_deterministic_cached_and_plausible(tmp_path):
    a = PhantomEMSource(seed=3, cache_dir=str(tmp_path), shape=(16, 64, 64))
    box = ((0, 64), (0, 64), (0, 16))
    image, labels, mito = (np.array(a.cutout(c, *box)) for c in ("image", "labels", "mito"))
    assert image.dtype == np.uint8 and labels.dtype == mito.dtype == np.int32
    assert list(tmp_path.rglob("*.npy")) and list(tmp_path.rglob("*.json"))
    b = PhantomEMSource(seed=3, cache_dir=str(tmp_path / "other"), shape=(16, 64, 64))
    assert np.array_equal(image, b.cutout("image", *box)) and np.array_equal(labels, b.cutout("labels", *box))
    c = PhantomEMSource(seed=4, cache_dir=str(tmp_path), shape=(16, 64, 64))
    assert not np.array_equal(image, c.cutout("image", *box))
    assert len(np.unique(labels)) > 5  # several neurites, membranes (0) between them
    assert image[labels == 0].mean() < image[labels > 0].mean() - 40  # dark membranes
    assert mito.max() >= 1 and (labels[mito > 0] > 0).all()  # mitochondria lie inside neurites
    assert image[mito > 0].mean() < image[(labels > 0) & (mito == 0)].mean() - 30
    with pytest.raises(DataError, match="outside"):
        a.cutout("image", (0, 65), (0, 64), (0, 16))
    with pytest.raises(ConfigError, match="source.em_shape"):
        PhantomEMSource(shape=(4, 64, 64))


def test_task_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="task.target"):
        validate_config(compose(["task=snemi3d", "task.target=masks"]))
    with pytest.raises(ConfigError, match="overlap"):
        EMTask("t", {"train": {"z": [0, 10]}, "val": {"z": [5, 12]}, "test": {"z": [20, 30]}})
    with pytest.raises(ConfigError, match=r"val z\[0, 10\] x\[20, 40\] overlap"):
        EMTask(
            "t", {"train": {"z": [0, 10], "x": [0, 30]}, "val": {"z": [0, 10], "x": [20, 40]}, "test": {"z": [20, 30]}}
        )
    with pytest.raises(ConfigError, match=r"task.splits.val.x: expected \[start, stop\)"):
        EMTask("t", {"train": {"z": [0, 10]}, "val": {"z": [10, 12], "x": [5]}, "test": {"z": [20, 30]}})
    with pytest.raises(ConfigError, match="task.splits.val: unknown key"):
        EMTask("t", {"train": {"z": [0, 10]}, "val": {"zz": [5, 12]}, "test": {"z": [20, 30]}})
    with pytest.raises(ConfigError, match="task.offsets"):
        EMTask("t", {"train": {}, "val": {"image": "v"}, "test": {"image": "t"}}, target="bc", offsets=[[0, 2, 0]])
    with pytest.raises(ConfigError, match="task.crop"):
        components("task=snemi3d", *SMALL, "task.crop=[20,32,32]")
    with pytest.raises(ConfigError, match="lies outside"):
        components("task=snemi3d", *SMALL, "task.splits.test.z=[18,30]")


def test_splits_can_divide_a_volume_along_x(tmp_path):
    """Validation beside training in x (objects that run along z are not shared), z ranges kept."""
    source = PhantomEMSource(seed=0, cache_dir=str(tmp_path), shape=(16, 48, 48))
    splits = {"train": {"z": [0, 12], "x": [0, 36]}, "val": {"z": [0, 12], "x": [40, 48]}, "test": {"z": [12, 16]}}
    task = EMTask("t", splits, crop=[4, 32, 32])
    task.check_source(source)
    train, val = task.build("train", source), task.build("val", source)
    assert train.shape == (12, 48, 36) and val.shape == (12, 48, 8)
    whole = np.array(source.cutout("labels", (0, 48), (0, 48), (0, 12)))
    assert np.array_equal(val.labels, whole[:, :, 40:48]) and np.array_equal(train.labels, whole[:, :, :36])
    splits["val"]["x"] = [40, 50]
    with pytest.raises(ConfigError, match=r"task.splits.val.x: \[40, 50\] lies outside"):
        EMTask("t", splits, crop=[4, 32, 32]).check_source(source)


@pytest.mark.parametrize("task,kind,channels", [("snemi3d", "affinity", 3), ("mitoem", "bc", 2)])
def test_datamodule_batches_follow_the_contract(task, kind, channels):
    comps = components(f"task={task}", *SMALL)
    dm = comps.datamodule
    assert isinstance(dm, EMDataModule) and comps.task.num_classes == channels
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert len(loader) == 16 // 4
    batch = dm.on_after_batch_transfer(next(iter(loader)), 0)
    assert batch["image"].shape == (4, 1, 4, 32, 32) and batch["image"].dtype == torch.float32
    assert batch["target"].shape == batch["mask"].shape == (4, channels, 4, 32, 32)
    assert batch["instances"].shape == (4, 4, 32, 32) and batch["instances"].dtype == torch.int64
    val = dm.on_after_batch_transfer(next(iter(dm.val_dataloader())), 0)
    assert val["image"].shape == (1, 1, 4, 64, 64) and val["instances"].shape == (1, 4, 64, 64)
    recomputed, _ = targets.compute_targets(kind, val["instances"])
    assert torch.equal(val["target"], recomputed)


def test_training_augmentation_keeps_image_labels_and_targets_aligned():
    comps = components("task=snemi3d", *SMALL, "data.augment.intensity_jitter=0.1")
    dm = comps.datamodule
    dm.setup("fit")
    dm.trainer = SimpleNamespace(training=True, global_rank=0, world_size=1)
    raw = next(iter(dm.train_dataloader()))
    torch.manual_seed(0)
    for _ in range(3):
        batch = dm.on_after_batch_transfer(raw, 0)
        image, lab = batch["image"][:, 0], batch["instances"]
        assert image[lab == 0].mean() < image[lab > 0].mean() - 1.0  # membranes stay dark, in std units
        # targets were computed after the transform, with context: equal to the crop's own affinities inside
        inner, _ = targets.affinities(lab, targets.NEAREST_OFFSETS, margin=(1, 1))
        assert torch.equal(batch["target"][:, :, 1:-1, 1:-1, 1:-1], inner)


def test_crop_loader_resumes_exactly():
    dm = components("task=snemi3d", *SMALL).datamodule
    dm.setup("fit")
    loader = dm.train_dataloader()
    it = iter(loader)
    next(it)
    loader.mark_consumed()  # what the datamodule does when the batch reaches the model
    next(it)  # Lightning prefetches one batch ahead: yielded is not consumed
    state = loader.state_dict()
    expected = [b for _, b in zip(range(2), iter(dm.train_dataloader()))][1]  # the second batch
    again = dm.train_dataloader()
    again.load_state_dict(state)
    assert all(torch.equal(expected[k], v) for k, v in next(iter(again)).items())


def test_evaluate_scores_a_perfect_prediction():
    comps = components("task=mitoem", *SMALL)
    dm = comps.datamodule
    dm.setup("test")
    batch = dm.on_after_batch_transfer(next(iter(dm.test_dataloader())), 0)
    task = comps.task
    task.postprocess.min_size = 0
    task.postprocess.min_seed_size = 0
    metrics, _ = evaluate_volume(
        batch["target"][0], batch["instances"][0], task.target, task.postprocess, task.ignore_zero
    )
    assert metrics["arand"] < 0.02 and metrics["ap50"] > 0.9
    assert {"arand", "voi_split", "voi_merge", "ap50", "ap75"} <= set(metrics)


def test_gala_fibsem_loads_through_source_local(shared_data):
    comps = components("task=gala_fibsem", "model=mae_finetune", "data.batch_size=2")
    assert type(comps.source).__name__ == "LocalVolumeSource"
    dm = comps.datamodule
    dm.setup("test")
    test = dm.volumes["test"]
    assert test.shape == (50, 100, 200) and test.image.dtype == np.uint8
    assert len(np.unique(test.labels[test.labels > 0])) == 132  # the README's count of test ids
    train = dm.volumes["train"]
    assert train.shape == (40, 100, 200)
    batch = dm.on_after_batch_transfer(next(iter(dm.train_dataloader())), 0)
    assert batch["image"].shape == (2, 1, 16, 64, 64) and batch["target"].shape == (2, 3, 16, 64, 64)
    # real membranes are darker than cell interiors there too
    assert test.image[test.labels == 0].mean() < test.image[test.labels > 0].mean()


def test_cli_rejects_bad_em_config_in_one_line(tmp_path):
    proc = run_inproc("train.py", "task=snemi3d", "task.postprocess.threshold=2", run_dir=tmp_path / "run", fast=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: task.postprocess.threshold")
