"""Task 2: segmentation splits, nets, config errors, and CLI runs (phantom and ISBI 2012)."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compose, read_metrics, run_inproc

from mtneuro_lab.config.schema import validate_config
from mtneuro_lab.data.cubes import catalog_from_config
from mtneuro_lab.data.seg_tasks import SegmentationTask
from mtneuro_lab.data.sources.base import VolumeSource
from mtneuro_lab.errors import ConfigError, DataError
from mtneuro_lab.methods.segmentation import SMPSegmentation, Volumetric3DSegmentation
from mtneuro_lab.nets.segmentation import VNetLight
from mtneuro_lab.run import instantiate_cfg

TASKS = ["seg2d_3class", "seg2d_4class", "seg3d_3class", "seg3d_4class", "isbi2012"]
MODELS_2D = ["unet2d", "manet", "fpn", "unetpp", "pan", "pspnet"]
QUICK_2D = [m for m in MODELS_2D if m != "pan"]  # pan needs >= 128x128 samples (task.downsample <= 2)
MODELS_3D = ["unet3d", "vnet_light", "highresnet"]
NAMES3 = ["bg_axon", "vessel", "cell"]


class CoordinateSource(VolumeSource):
    """Labels ``(x // 3 + y // 5 + z) % 4`` and image ``40 * label + 10`` at dataset coordinates."""

    def __init__(self, labels_plus: int = 0) -> None:
        self.labels_plus = labels_plus

    def labels(self, x, y, z) -> np.ndarray:
        zz, yy, xx = np.meshgrid(np.arange(*z), np.arange(*y), np.arange(*x), indexing="ij")
        return ((xx // 3 + yy // 5 + zz) % 4 + self.labels_plus).astype(np.uint8)

    def cutout(self, channel, x, y, z) -> np.ndarray:
        labels = self.labels(x, y, z)
        return labels if channel == "pixel_labels" else (40 * labels + 10).astype(np.uint8)


def make_task(name: str, *overrides: str) -> SegmentationTask:
    cfg = compose([f"task={name}", *overrides])
    return instantiate_cfg(cfg.task, _convert_="all").bind(catalog_from_config(cfg.cubes))


# -- splits -----------------------------------------------------------------------------------
def test_seg2d_3class_merges_axon_into_background_and_downsamples_labels_by_nearest() -> None:
    task = make_task("seg2d_3class", "task.downsample=4")
    assert task.kind == "segmentation" and task.class_names == NAMES3 and task.sample_shape() == (64, 64)
    arr = task.build("test", CoordinateSource())
    assert arr.images.shape == (4 * 50, 64, 64) and arr.targets.shape == arr.images.shape
    assert arr.images.dtype == np.uint8 and arr.targets.dtype == np.uint8
    assert sorted(np.unique(arr.regions)) == [0, 1, 2, 3]
    cube = task.catalog.cube("A", "striatum")
    row = int(np.flatnonzero((arr.regions == 1) & (arr.z == 433))[0])
    raw = CoordinateSource().labels(cube.x, cube.y, (433, 434))[0, 2::4, 2::4]
    np.testing.assert_array_equal(arr.targets[row], np.array([0, 1, 2, 0])[raw])


def test_seg2d_4class_keeps_axon_and_leaves_out_zi() -> None:
    task = make_task("seg2d_4class", "task.downsample=4")
    arr = task.build("val", CoordinateSource())
    assert task.class_names == ["bg", "vessel", "cell", "axon"]
    assert sorted(np.unique(arr.regions)) == [0, 1, 2]
    assert sorted(np.unique(arr.targets)) == [0, 1, 2, 3]
    assert len(arr) == 3 * 30


def test_seg3d_stacks_stay_inside_one_cube_and_split() -> None:
    task = make_task("seg3d_3class", "task.downsample=4")
    assert task.sample_shape() == (8, 64, 64)
    arr = task.build("test", CoordinateSource())
    assert arr.images.shape == (4 * 6, 8, 64, 64)
    assert sorted(set(arr.z.tolist())) == [420, 428, 436, 444, 452, 460]
    source, cube = CoordinateSource(), task.catalog.cube("A", "vp")
    row = int(np.flatnonzero((arr.regions == 2) & (arr.z == 444))[0])
    expected = np.array([0, 1, 2, 0])[source.labels(cube.x, cube.y, (444, 452))[:, 2::4, 2::4]]
    np.testing.assert_array_equal(arr.targets[row], expected)
    overlapping = make_task("seg3d_3class", "task.downsample=4", "task.train_z_stride=4")
    starts = overlapping.stack_starts("train", (110, 380))
    assert starts[0] == 110 and starts[1] == 114 and starts[-1] + 8 <= 380
    assert list(overlapping.stack_starts("test", (420, 470))) == list(range(420, 461, 8))


def test_unmapped_label_values_are_a_one_line_data_error() -> None:
    task = make_task("seg2d_3class", "task.downsample=4")
    with pytest.raises(DataError, match=r"label values \[4\] are not in task.class_map"):
        task.build("val", CoordinateSource(labels_plus=1))


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["task.class_map={0: 0, 1: 1, 2: 7, 3: 0}"], "task.class_map"),
        (["task.class_map={2: 1}"], r"class indices \[2\] get no label value"),
        (["task.volume_z=40"], "task.volume_z: 40 slices do not fit in val"),
        (["task.class_names=[a]", "task.class_map={0: 0}"], "task.class_names"),
    ],
)
def test_task_config_errors(overrides: list[str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        make_task("seg3d_3class", *overrides)


# -- configs and nets ---------------------------------------------------------------------------
@pytest.mark.parametrize("task", TASKS)
def test_every_task_and_model_config_composes_and_validates(task: str) -> None:
    for model in MODELS_2D + MODELS_3D:
        cfg = compose([f"task={task}", f"model={model}"])
        validate_config(cfg)
        assert cfg.task.name == task
    if task == "isbi2012":
        assert cfg.source._target_.endswith("LocalVolumeSource")
        assert cfg.source.channels.image.path.endswith("isbi2012/train-volume.tif")


def test_3d_nets_return_logits_of_the_input_shape() -> None:
    x = torch.randn(1, 1, 8, 16, 16)
    for arch in MODELS_3D:
        method = Volumetric3DSegmentation(3, NAMES3, (8, 16, 16), arch=arch, base_channels=4)
        assert method(x).shape == (1, 3, 8, 16, 16), arch
    assert VNetLight(1, 2, base_channels=4, levels=2)(torch.randn(2, 1, 4, 8, 8)).shape == (2, 2, 4, 8, 8)


def test_method_rejects_wrong_dimensions_shapes_and_weights() -> None:
    with pytest.raises(ConfigError, match="model=unet: is a 2D model"):
        SMPSegmentation(3, NAMES3, (8, 64, 64), encoder_name="resnet18")
    with pytest.raises(ConfigError, match="is a 3D model"):
        Volumetric3DSegmentation(3, NAMES3, (64, 64))
    with pytest.raises(ConfigError, match="task.downsample: samples of 48x48 must be divisible by 32x32"):
        SMPSegmentation(3, NAMES3, (48, 48), encoder_name="resnet18")
    with pytest.raises(ConfigError, match="task.volume_z/task.downsample"):
        Volumetric3DSegmentation(3, NAMES3, (6, 64, 64), arch="vnet_light")
    with pytest.raises(ConfigError, match="model.class_weights: need 3"):
        Volumetric3DSegmentation(3, NAMES3, (8, 16, 16), base_channels=4, class_weights=[1.0, 2.0])
    with pytest.raises(ConfigError, match="model.levels"):
        Volumetric3DSegmentation(3, NAMES3, (8, 16, 16), arch="highresnet", levels=2)
    with pytest.raises(ConfigError, match="model pan needs samples of at least 128x128, got 64x64"):
        SMPSegmentation(3, NAMES3, (64, 64), arch="pan", encoder_name="resnet18")
    with pytest.raises(ConfigError, match="model.encoder_name: unknown encoder 'resnet19'"):
        SMPSegmentation(3, NAMES3, (64, 64), encoder_name="resnet19")


def test_imagenet_weights_offline_fail_at_once_with_one_line(monkeypatch, tmp_path: Path) -> None:
    from huggingface_hub import constants

    import mtneuro_lab.nets.segmentation as nets

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))  # nothing cached
    monkeypatch.setattr(nets, "hub_reachable", lambda timeout=5.0: "huggingface.co unreachable (test)")
    with pytest.raises(ConfigError) as err:
        SMPSegmentation(3, NAMES3, (64, 64), encoder_name="resnet18", encoder_weights="imagenet")
    message = str(err.value)
    assert "\n" not in message
    assert "model.encoder_weights=imagenet" in message and "unreachable (test)" in message
    assert "model.encoder_weights=null" in message


def test_class_weights_change_the_cross_entropy() -> None:
    logits, target = torch.randn(2, 3, 8, 8), torch.randint(0, 3, (2, 8, 8))
    plain = Volumetric3DSegmentation(3, NAMES3, (8, 8, 8), base_channels=2, levels=1)
    weighted = Volumetric3DSegmentation(3, NAMES3, (8, 8, 8), base_channels=2, levels=1, class_weights=[0.0, 1.0, 1.0])
    expected = torch.nn.functional.cross_entropy(logits, target, weight=torch.tensor([0.0, 1.0, 1.0]))
    assert weighted.loss(logits, target).item() == pytest.approx(expected.item())
    assert plain.loss(logits, target).item() != pytest.approx(expected.item())
    dice = Volumetric3DSegmentation(3, NAMES3, (8, 8, 8), base_channels=2, levels=1, loss="dice")
    perfect = 20 * torch.nn.functional.one_hot(target, 3).movedim(-1, 1).float()
    assert dice.loss(perfect, target).item() < 0.01 < dice.loss(logits, target).item()


# -- CLI ----------------------------------------------------------------------------------------
def _check_jobs(sweep_dir: Path, n: int, class_names: list[str]) -> None:
    jobs = sorted(p for p in sweep_dir.iterdir() if (p / "config.yaml").is_file())
    assert len(jobs) == n, [p.name for p in jobs]
    for job in jobs:
        metrics = read_metrics(job)
        for kind in ("f1", "iou"):
            for name in [*class_names, "mean"]:
                assert f"test/{kind}_{name}" in metrics, (job, kind, name)
        for name in class_names:
            f1, iou = metrics[f"test/f1_{name}"], metrics[f"test/iou_{name}"]
            if not math.isnan(f1):
                assert iou == pytest.approx(f1 / (2 - f1), abs=1e-5)
        assert math.isfinite(metrics["test/loss"])


def test_cli_every_2d_model_trains_on_seg2d_3class(tmp_path: Path) -> None:
    # "++": in a multirun Hydra first composes with the default model, which has no encoder_name
    proc = run_inproc(
        "train.py",
        "task=seg2d_3class",
        f"model={','.join(QUICK_2D)}",
        "++model.encoder_name=efficientnet-b0",  # 6-9 M parameters (resnet18: 11-22 M): smaller checkpoints
        run_dir=tmp_path / "sweep",
        multirun=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not list((tmp_path / "sweep").glob("*/failed.json"))
    _check_jobs(tmp_path / "sweep", len(QUICK_2D), NAMES3)


def test_cli_every_3d_model_trains_on_seg3d_4class(tmp_path: Path) -> None:
    proc = run_inproc(
        "train.py",
        "task=seg3d_4class",
        f"model={','.join(MODELS_3D)}",
        "++model.base_channels=4",
        "data.batch_size=2",
        run_dir=tmp_path / "sweep",
        multirun=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not list((tmp_path / "sweep").glob("*/failed.json"))
    _check_jobs(tmp_path / "sweep", len(MODELS_3D), ["bg", "vessel", "cell", "axon"])


@pytest.mark.slow
@pytest.mark.parametrize(
    "task, models, extra",
    [
        ("seg2d_4class", MODELS_2D, ["++model.encoder_name=resnet18", "task.downsample=2"]),
        ("seg3d_3class", MODELS_3D, ["++model.base_channels=4", "data.batch_size=2"]),
    ],
)
def test_cli_every_model_trains_on_its_other_task(
    tmp_path: Path, task: str, models: list[str], extra: list[str]
) -> None:
    proc = run_inproc(
        "train.py", f"task={task}", f"model={','.join(models)}", *extra, run_dir=tmp_path / "sweep", multirun=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = NAMES3 if "3class" in task else ["bg", "vessel", "cell", "axon"]
    _check_jobs(tmp_path / "sweep", len(models), names)


def test_cli_model_task_mismatch_is_one_line(tmp_path: Path) -> None:
    proc = run_inproc(
        "train.py", "task=seg3d_3class", "model=unet2d", "model.encoder_name=resnet18", run_dir=tmp_path / "run"
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: model=unet: is a 2D model")
    assert not (tmp_path / "run").exists()


def test_evaluate_writes_overlays_and_pooled_confusion_matrix(tmp_path: Path) -> None:
    train = run_inproc(
        "train.py", "task=seg2d_3class", "model=unet2d", "model.encoder_name=resnet18", run_dir=tmp_path / "train"
    )
    assert train.returncode == 0, train.stderr[-3000:]
    ckpt = tmp_path / "train" / "checkpoints" / "last.ckpt"
    ev = run_inproc(
        "evaluate.py",
        f"ckpt_path={ckpt}",
        "trainer.limit_test_batches=2",
        "++model.overlay_samples=2",
        run_dir=tmp_path / "eval",
        fast=False,
    )
    assert ev.returncode == 0, ev.stderr[-3000:]
    out = tmp_path / "eval"
    assert sorted(p.name for p in (out / "overlays").glob("*.png")) == [
        "cortex.png",
        "striatum.png",
        "vp.png",
        "zi.png",
    ]
    assert (out / "confusion_matrix.png").stat().st_size > 1000
    with open(out / "confusion_matrix.csv") as fh:
        rows = list(csv.reader(fh))
    assert rows[0][1:] == NAMES3 and [r[0] for r in rows[1:]] == NAMES3
    counts = np.array([[int(v) for v in r[1:]] for r in rows[1:]])
    assert counts.sum() == 2 * 4 * 64 * 64  # two test batches of 4 slices of 64x64 (+debug=fast), pooled
    metrics = read_metrics(out)
    for i, name in enumerate(NAMES3):
        tp, union = counts[i, i], counts[i].sum() + counts[:, i].sum() - counts[i, i]
        assert metrics[f"test/iou_{name}"] == pytest.approx(tp / union, abs=1e-5)


@pytest.mark.slow  # a 12-epoch training run (90 s on 2 cores): keeps the default suite under 10 minutes
def test_isbi2012_membrane_segmentation_beats_all_cell(tmp_path: Path, shared_data: Path) -> None:
    import tifffile

    proc = run_inproc(
        "train.py",
        "task=isbi2012",
        "model=unet2d",
        "model.encoder_name=resnet18",
        "task.downsample=4",
        "trainer.max_epochs=12",
        "data.batch_size=4",
        "trainer.enable_progress_bar=false",
        "logger=none",
        run_dir=tmp_path / "run",
        fast=False,
        env={"OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = read_metrics(tmp_path / "run")
    labels = tifffile.imread(shared_data / "isbi2012" / "train-labels.tif")[26:30, 2::4, 2::4]
    cell = float((labels == 255).mean())
    all_cell_iou_mean = (0.0 + cell) / 2  # membrane IoU 0, cell IoU = cell fraction
    assert metrics["test/iou_mean"] > all_cell_iou_mean + 0.15, (metrics, all_cell_iou_mean)
    assert metrics["test/iou_membrane"] > 0.3
