"""Small contracts of files and schedules: the checksummed cache (:mod:`mtneuro_lab.data.cache`),
atomic writes that fail half-way (:mod:`mtneuro_lab.io`), checkpoint and run-directory lookups
(:mod:`mtneuro_lab.checkpoints`, :mod:`mtneuro_lab.rundir`), and optimiser/scheduler options
(:mod:`mtneuro_lab.methods.optim`)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from mtneuro_lab import checkpoints, io, rundir
from mtneuro_lab.data import cache
from mtneuro_lab.errors import CheckpointError, ConfigError, DataError
from mtneuro_lab.methods import optim


# -- cache and atomic writes ------------------------------------------------------------------
def test_cache_entries_are_npy_with_a_matching_sidecar(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"^cache entries are \.npy files, got .*a\.npz$"):
        cache.save_array(tmp_path / "a.npz", np.zeros(3))
    with pytest.raises(DataError) as err:
        cache.load_array(tmp_path / "b.npy")
    assert str(err.value) == f"cache entry {tmp_path / 'b.npy'} is missing or incomplete (no sidecar)"
    path = tmp_path / "c.npy"
    cache.save_array(path, np.arange(6, dtype=np.int16).reshape(2, 3), meta={"z": [0, 2]})
    assert cache.read_meta(path) == {"z": [0, 2]}
    side = json.loads(cache.sidecar_path(path).read_text())
    side["shape"] = [3, 2]  # the checksum still matches: the header does not
    cache.sidecar_path(path).write_text(json.dumps(side))
    with pytest.raises(DataError) as err:
        cache.load_array(path, verify=False)
    assert str(err.value) == f"cache entry {path} does not match its sidecar (shape/dtype)"


class _Interrupted(Exception):
    pass


def test_a_failed_write_leaves_no_temporary_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(fh: Any) -> None:
        fh.write(b"half")
        raise _Interrupted

    with pytest.raises(_Interrupted):
        io.write_temp(tmp_path, ".bin", fail)
    assert list(tmp_path.iterdir()) == []

    def no_rename(src: Any, dst: Any) -> None:
        raise _Interrupted

    monkeypatch.setattr(cache.os, "replace", no_rename)
    with pytest.raises(_Interrupted):
        cache.save_array(tmp_path / "d.npy", np.zeros(4))
    assert list(tmp_path.iterdir()) == []


def test_unwritable_reason_of_a_path_below_a_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    assert io.unwritable_reason(tmp_path / "file" / "run") == f"{tmp_path / 'file'} is not a directory"
    assert io.unwritable_reason(tmp_path / "new" / "run") is None


# -- checkpoints and run directories ----------------------------------------------------------
def test_checkpoint_lookups_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError) as err:
        checkpoints.load_checkpoint(tmp_path / "none.ckpt")
    assert str(err.value) == f"ckpt_path: no checkpoint file at {tmp_path / 'none.ckpt'}"
    (tmp_path / "bad.ckpt").write_bytes(b"not a zip or pickle")
    with pytest.raises(CheckpointError) as err:
        checkpoints.checkpoint_position(tmp_path / "bad.ckpt")
    assert str(err.value).startswith(f"ckpt_path: cannot load {tmp_path / 'bad.ckpt'} safely (")
    torch.save({"epoch": 4, "global_step": 40}, tmp_path / "good.ckpt")
    assert checkpoints.checkpoint_position(tmp_path / "good.ckpt") == {"best_epoch": 4, "best_step": 40}


def test_saved_config_and_evaluation_config_need_a_run(tmp_path: Path) -> None:
    ckpt = tmp_path / "run" / "checkpoints" / "best.ckpt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"")
    with pytest.raises(CheckpointError) as err:
        rundir.saved_config(ckpt)
    assert str(err.value) == (
        f"ckpt_path: no config.yaml beside the checkpoint (looked for {tmp_path / 'run' / 'config.yaml'})"
    )
    (tmp_path / "run" / "config.yaml").write_text("- a\n- b\n")
    with pytest.raises(CheckpointError) as err:
        rundir.saved_config(ckpt)
    assert str(err.value) == f"ckpt_path: {tmp_path / 'run' / 'config.yaml'} holds a list, not a run's config"
    with pytest.raises(ConfigError) as err:
        rundir.evaluation_config(OmegaConf.create({"ckpt_path": None}))
    assert str(err.value) == "ckpt_path: evaluate.py needs ckpt_path=<checkpoint file>"
    with pytest.raises(CheckpointError) as err:
        rundir.evaluation_config(OmegaConf.create({"ckpt_path": str(tmp_path / "gone.ckpt")}))
    assert str(err.value) == f"ckpt_path: no checkpoint file at {tmp_path / 'gone.ckpt'}"
    assert rundir.cli_overrides() == []  # outside a Hydra app


def test_next_steps_spell_the_console_scripts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["/usr/bin/mtneuro-train", "task=roi_c1"])
    text = rundir.next_steps(Path("/runs/a"), "/runs/a/checkpoints/best.ckpt", ["task=roi_c1", "seed=3"])
    assert "  mtneuro-eval ckpt_path=/runs/a/checkpoints/best.ckpt" in text
    assert "  mtneuro-report /runs/a" in text
    assert "  mtneuro-train -m task=roi_c1 +sweep=seeds" in text


# -- optimiser and scheduler ------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"betas": [0.9, 1.0]}, "model.optimizer.betas: must be two values in [0, 1), got [0.9, 1.0]"),
        ({"betas": [0.9]}, "model.optimizer.betas: must be two values in [0, 1), got [0.9]"),
        ({"reference_batch": 0}, "model.optimizer.reference_batch: must be >= 1, got 0"),
    ],
)
def test_optimizer_options(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        optim.OptimizerConfig(**kwargs)
    assert str(err.value) == message


def test_scheduler_min_lr_ratio() -> None:
    with pytest.raises(ConfigError) as err:
        optim.SchedulerConfig(min_lr_ratio=1.5)
    assert str(err.value) == "model.scheduler.min_lr_ratio: must be in [0, 1], got 1.5"


def test_sqrt_scaling_and_step_decay() -> None:
    cfg = optim.OptimizerConfig(lr=0.1, lr_scaling="sqrt", reference_batch=64)
    assert optim.scaled_lr(cfg, 256) == pytest.approx(0.2)
    param = torch.nn.Parameter(torch.zeros(1))
    opt = optim.build_optimizer([param], cfg, 256)
    assert optim.build_scheduler(opt, optim.SchedulerConfig(name="none"), 100, 10) is None
    sched = optim.build_scheduler(opt, optim.SchedulerConfig(name="step", step_epochs=2, gamma=0.5), 100, 10)
    assert sched is not None and sched["interval"] == "step"
    factor = sched["scheduler"].lr_lambdas[0]
    assert [factor(s) for s in (0, 19, 20, 39, 40)] == [1.0, 1.0, 0.5, 0.5, 0.25]
    assert math.isclose(opt.param_groups[0]["lr"], 0.2)
