"""Bad inputs fail before any training, with one line naming the key and the allowed values.

Every case runs the CLI's own preflight (``mtneuro_lab.cli.preflight`` with
``run.preflight_checks``) in-process and checks: exit status 2, exactly one ``error: ...`` line
on stderr that contains the expected key and hint, and nothing written to the cache or
output directories. A handful of cases also run through the whole CLI entry point
(``run_inproc``: Hydra, exit status, stderr; real processes: tests/test_cli.py). The table in docs/reliability.md lists these inputs and their messages.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compose, run_inproc
from omegaconf import OmegaConf

from mtneuro_lab import cli, run
from mtneuro_lab.errors import CheckpointError


class Arbitrary:
    """Stands for any object a malicious pickle could carry."""

    def __init__(self) -> None:
        self.payload = "x"


# (overrides, substrings the one-line error must contain); {files} is the fixture directory
BAD_INPUTS: list[tuple[list[str], tuple[str, ...]]] = [
    # unknown keys, typos, unknown options
    (["model=foo"], ("model=foo", "available:", "supervised")),
    (["task=roi_c9"], ("task=roi_c9", "available:", "roi_c1")),
    (["logger=foo"], ("logger=foo", "available:", "csv")),
    (["model.dropuot=0.1"], ("model.dropuot", "unknown key")),
    (["+model.dropuot=0.1"], ("model.dropuot", "allowed:", "dropout")),
    (["trainer.max_epoch=3"], ("trainer.max_epoch", "unknown key")),
    (["+foo=1"], ("foo", "unknown top-level key", "allowed:")),
    (["+data.bach_size=3"], ("data.bach_size", "allowed keys:", "batch_size")),
    (["data.augment.hflp=true"], ("data.augment.hflp", "unknown key")),
    (["+perf.foo=1"], ("perf.foo", "allowed keys:", "channels_last")),
    # wrong types
    (["data.batch_size=abc"], ("data.batch_size", "abc")),
    (["test_after_fit=maybe"], ("test_after_fit", "true or false")),
    (["perf.compile=maybe"], ("perf.compile", "bool")),
    (["trainer.devices=abc"], ("trainer.devices", "auto")),
    # out-of-range values and unknown choices
    (["model.optimizer.lr=-0.1"], ("model.optimizer.lr", "> 0")),
    (["data.batch_size=0"], ("data.batch_size", ">= 1")),
    (["data.eval_batch_size=-3"], ("data.eval_batch_size", ">= 1")),
    (["data.normalize=zscore"], ("data.normalize", "train_stats", "fixed")),
    (["data.augment.intensity_jitter=-1"], ("data.augment.intensity_jitter", ">= 0")),
    (["seed=-1"], ("seed", "non-negative")),
    (["model.optimizer.name=adamw2"], ("model.optimizer.name", "sgd, adam, adamw")),
    (["model.optimizer.momentum=-1"], ("model.optimizer.momentum", "[0, 1)")),
    (["model.optimizer.weight_decay=-1"], ("model.optimizer.weight_decay", ">= 0")),
    (["model.optimizer.lr_scaling=cubic"], ("model.optimizer.lr_scaling", "none, linear or sqrt")),
    (["model.scheduler.name=plateau"], ("model.scheduler.name", "none, cosine or step")),
    (["model.scheduler.warmup_epochs=-1"], ("model.scheduler.warmup_epochs", ">= 0")),
    (["model.dropout=1.5"], ("model.dropout", "[0, 1)")),
    (["model.stem=huge"], ("model.stem", "auto, imagenet, small, tiny")),
    (["model.mixup_prob=2"], ("model.mixup_prob", "[0, 1]")),
    (["task.downsample=3"], ("task.downsample", "1, 2, 4")),
    (["task.label_mode=majority"], ("task.label_mode", "roi_majority")),
    (["task.test_buffer=-2"], ("task.test_buffer", ">= 0")),
    (["trainer.precision=17"], ("trainer.precision", "bf16-mixed")),
    (["trainer.max_epochs=-5"], ("trainer.max_epochs", ">= -1")),
    (["trainer.accelerator=tpu9"], ("trainer.accelerator", "cpu, gpu")),
    (["perf.compile_mode=fast"], ("perf.compile_mode", "reduce-overhead")),
    (["source=bossdb", "source.protocol=ftp"], ("source.protocol", "https, http")),
    (["source=bossdb", "source.retries=-1"], ("source.retries", ">= 0")),
    # z ranges outside the volume, overlapping or too-close splits, unknown cube sets
    (["task.splits.train=[{set: A, z: [50, 380]}]"], ("task.splits.train", "outside", "[100, 480]")),
    (["task.splits.test=[{set: A, z: [420, 600]}]"], ("task.splits.test", "outside", "[100, 480]")),
    (["source.z_extent=[100,300]"], ("task.splits.train", "outside", "[100, 300]")),
    (["task.splits.val=[{set: A, z: [370, 400]}]"], ("task.splits", "overlap")),
    (["task.splits.test=[{set: A, z: [412, 470]}]"], ("task.splits", "apart", ">= 10")),
    (["task.splits.train=[{set: Q, z: [110, 380]}]"], ("task.splits.train[0].set", "'Q'", "known:")),
    # volume_z larger than a split, or not fitting the network
    (["task=seg3d_3class", "model=unet3d", "task.volume_z=64"], ("task.volume_z", "do not fit", "z[380, 410]")),
    (["task=seg3d_3class", "model=unet3d", "task.volume_z=6"], ("task.volume_z", "multiple of 8")),
    # model/task mismatches
    (["model=byol", "task=seg2d_3class"], ("model=byol", "task=seg2d_3class", "classification")),
    (["model=unet3d", "task=roi_c1"], ("model=unet3d", "segmentation")),
    # missing local files and HDF5 keys
    (["source=local"], ("source.channels", "path")),
    (["source=local", "source.channels.image.path={files}/missing.h5"], ("source.channels.image", "missing.h5")),
    (
        ["source=local", "source.channels.image.path={files}/vol.h5", "source.channels.image.key=data"],
        ("source.channels.image", "'data'", "available keys: raw"),
    ),
    # checkpoints: missing, unsafe pickle, another model's
    (["ckpt_path={files}/missing.ckpt"], ("ckpt_path", "missing.ckpt")),
    (["ckpt_path={files}/evil.ckpt"], ("ckpt_path", "evil.ckpt", "safely")),
    (
        ["model=byol", "ckpt_path={files}/run/checkpoints/best.ckpt"],
        ("ckpt_path", "not a checkpoint of model", "BYOL", "SupervisedClassifier"),
    ),
]

EVALUATE_BAD_INPUTS: list[tuple[list[str], tuple[str, ...]]] = [
    ([], ("ckpt_path", "evaluate.py needs")),
    (["ckpt_path={files}/missing.ckpt"], ("ckpt_path", "missing.ckpt")),
    (["ckpt_path={files}/run/checkpoints/best.ckpt", "model=byol"], ("ckpt_path", "not a checkpoint of model", "BYOL")),
    (["ckpt_path={files}/run/checkpoints/best.ckpt", "task.downsample=2"], ("ckpt_path", "other shapes")),
]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An HDF5 volume, a malicious checkpoint and a supervised 'run' (config.yaml + checkpoint)."""
    import h5py

    root = tmp_path_factory.mktemp("files")
    with h5py.File(root / "vol.h5", "w") as fh:
        fh["raw"] = np.zeros((400, 64, 64), dtype=np.uint8)
    with open(root / "evil.ckpt", "wb") as fh:
        torch.save({"state_dict": {}, "hook": Arbitrary()}, fh)
    cfg = compose(["+debug=fast"])
    comps = run.build_components(cfg)  # nothing is read: the phantom is generated lazily
    (root / "run" / "checkpoints").mkdir(parents=True)
    torch.save({"state_dict": comps.method.state_dict()}, root / "run" / "checkpoints" / "best.ckpt")
    plain = OmegaConf.to_container(cfg, resolve=False)
    (root / "run" / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(plain)))
    return root


def _preflight(flow: str, overrides: list[str], tmp: Path, capsys: pytest.CaptureFixture) -> tuple[int, list[str]]:
    sandbox = [f"paths.cache_dir={tmp / 'cache'}", f"paths.output_root={tmp / 'out'}", f"paths.data_dir={tmp / 'data'}"]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        cli.preflight([*overrides, *sandbox], run.preflight_checks[flow])
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    return int(exc.value.code), lines


def _check(
    flow: str,
    overrides: list[str],
    expected: tuple[str, ...],
    files: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
) -> None:
    overrides = [o.replace("{files}", str(files)) for o in overrides]
    code, lines = _preflight(flow, overrides, tmp_path, capsys)
    assert code == 2
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: "), lines[0]
    for text in expected:
        assert text in lines[0], f"{text!r} not in: {lines[0]}"
    assert list(tmp_path.iterdir()) == [], f"preflight wrote {sorted(map(str, tmp_path.rglob('*')))}"


def test_at_least_25_bad_inputs_are_covered() -> None:
    assert len(BAD_INPUTS) + len(EVALUATE_BAD_INPUTS) >= 25


@pytest.mark.parametrize("overrides,expected", BAD_INPUTS, ids=[" ".join(o) for o, _ in BAD_INPUTS])
def test_bad_train_input_is_one_line_before_any_work(
    overrides: list[str], expected: tuple[str, ...], files: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    _check("train", overrides, expected, files, tmp_path, capsys)


@pytest.mark.parametrize(
    "overrides,expected", EVALUATE_BAD_INPUTS, ids=[" ".join(o) or "no ckpt_path" for o, _ in EVALUATE_BAD_INPUTS]
)
def test_bad_evaluate_input_is_one_line_before_any_work(
    overrides: list[str], expected: tuple[str, ...], files: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    _check("evaluate", overrides, expected, files, tmp_path, capsys)


def test_good_checkpoint_passes_the_preflight(files: Path, tmp_path: Path) -> None:
    """The checks reject other models, not the model that wrote the checkpoint."""
    ckpt = files / "run" / "checkpoints" / "best.ckpt"
    cli.preflight(["+debug=fast", f"ckpt_path={ckpt}", f"paths.cache_dir={tmp_path}"], run.preflight_checks["train"])
    cli.preflight([f"ckpt_path={ckpt}", f"paths.cache_dir={tmp_path}"], run.preflight_checks["evaluate"])
    assert list(tmp_path.iterdir()) == []


def test_unsafe_checkpoint_is_refused_by_load_checkpoint(files: Path) -> None:
    from mtneuro_lab.checkpoints import load_checkpoint

    with pytest.raises(CheckpointError, match="evil.ckpt"):
        load_checkpoint(files / "evil.ckpt")


@pytest.mark.parametrize(
    "script,overrides,expected",
    [
        ("train.py", ["model=byol", "task=seg2d_3class"], "model=byol"),
        (
            "train.py",
            ["source=local", "source.channels.image.path={files}/vol.h5", "source.channels.image.key=data"],
            "source.channels.image",
        ),
        ("evaluate.py", ["ckpt_path={files}/run/checkpoints/best.ckpt", "model=byol"], "ckpt_path"),
    ],
)
def test_cli_bad_input_writes_nothing(
    script: str, overrides: list[str], expected: str, files: Path, tmp_path: Path
) -> None:
    """The whole entry point: exit 2, one line, no run directory, no cache entry."""
    cache, run_dir = tmp_path / "cache", tmp_path / "run"
    overrides = [o.replace("{files}", str(files)) for o in overrides]
    proc = run_inproc(script, *overrides, f"paths.cache_dir={cache}", run_dir=run_dir, fast=script == "train.py")
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], proc.stderr
    assert not run_dir.exists() and not cache.exists()


# -- perf.* (GPU options): what can be checked on a CPU -----------------------------------------
def _built(*overrides: str) -> run.Components:
    return run.build_components(compose(["+debug=fast", *overrides]))


def test_channels_last_keeps_the_outputs() -> None:
    from mtneuro_lab import perf

    torch.manual_seed(0)
    comps = _built()
    method = comps.method.eval()
    x = torch.randn(4, 1, 64, 64)
    with torch.no_grad():
        before = method(x)
        perf.apply({"channels_last": True}, method, comps.datamodule)
        after = method(x.contiguous(memory_format=torch.channels_last))
    conv = next(p for p in method.parameters() if p.dim() == 4)
    assert conv.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)
    batch = comps.datamodule.on_after_batch_transfer(
        {"image": torch.zeros(2, 64, 64, dtype=torch.uint8), "target": torch.zeros(2, dtype=torch.long)}, 0
    )
    assert batch["image"].shape == (2, 1, 64, 64)
    assert batch["image"].is_contiguous(memory_format=torch.channels_last)


def test_compile_flag_compiles_every_sub_network_in_place(monkeypatch: pytest.MonkeyPatch) -> None:
    from torch import nn

    from mtneuro_lab import perf

    calls: list[tuple[str, str]] = []
    monkeypatch.setattr(nn.Module, "compile", lambda self, **kw: calls.append((type(self).__name__, kw["mode"])))
    comps = _built()
    keys = set(comps.method.state_dict())
    perf.apply(compose(["perf.compile=true", "perf.compile_mode=max-autotune"]).perf, comps.method, comps.datamodule)
    assert {name for name, _ in calls} >= {"ResNet18Encoder", "Sequential"}
    assert {mode for _, mode in calls} == {"max-autotune"}
    assert set(comps.method.state_dict()) == keys  # checkpoints keep their parameter names
    calls.clear()
    perf.apply(compose().perf, comps.method, comps.datamodule)  # the default: off
    assert calls == []


def test_data_on_device_trains_and_gathers_on_the_trainer_device(tmp_path: Path) -> None:
    import pytorch_lightning as pl

    from mtneuro_lab import perf

    comps = _built()
    perf.apply({"data_on_device": True}, comps.method, comps.datamodule)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=2,
        limit_val_batches=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        default_root_dir=str(tmp_path),
    )
    trainer.fit(comps.method, datamodule=comps.datamodule)
    assert trainer.global_step == 2
    on_device = comps.datamodule._device_tensors["train"]
    assert on_device["image"].device == trainer.strategy.root_device
    assert comps.datamodule._loaders["train"].tensors["image"] is on_device["image"]


def test_data_on_device_needs_a_datamodule_that_supports_it() -> None:
    from mtneuro_lab import perf
    from mtneuro_lab.errors import ConfigError

    with pytest.raises(ConfigError, match="perf.data_on_device"):
        perf.apply({"data_on_device": True}, torch.nn.Linear(2, 2), object())
