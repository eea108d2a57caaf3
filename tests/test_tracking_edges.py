"""``logger=wandb`` checks of :mod:`mtneuro_lab.tracking` that run before any W&B call: an
unknown mode (config or ``WANDB_MODE``) or job type, wandb not installed, and the job type that
evaluate.py / the read-out set."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from mtneuro_lab import tracking
from mtneuro_lab.errors import ConfigError


def _cfg(**wandb: object) -> object:
    return OmegaConf.create({"logger": {"wandb": {"_target_": "mtneuro_lab.tracking.WandbRun", **wandb}}})


@pytest.mark.parametrize(
    ("env", "section", "message"),
    [
        ("cloud", {}, "WANDB_MODE: must be one of online, offline, disabled, got 'cloud' (logger=wandb)"),
        (None, {"mode": "cloud"}, "logger.wandb.mode: must be one of online, offline, disabled, got 'cloud'"),
        (None, {"job_type": "test"}, "logger.wandb.job_type: must be one of train, eval, readout, got 'test'"),
    ],
)
def test_unknown_modes_and_job_types_name_their_key(
    env: str | None, section: dict, message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if env is None:
        monkeypatch.delenv("WANDB_MODE", raising=False)
    else:
        monkeypatch.setenv("WANDB_MODE", env)
    with pytest.raises(ConfigError) as err:
        tracking.check_wandb(_cfg(**section))  # type: ignore[arg-type]
    assert str(err.value) == message


def test_known_values_and_other_loggers_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "dryrun")
    tracking.check_wandb(_cfg(mode="offline", job_type="eval"))  # type: ignore[arg-type]
    tracking.check_wandb(OmegaConf.create({"logger": {"csv": {}}}))


def test_wandb_not_installed_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    with pytest.raises(ConfigError) as err:
        tracking.check_wandb(_cfg())  # type: ignore[arg-type]
    assert str(err.value) == "logger=wandb: the wandb package is not installed (pip install wandb); or use logger=csv"


def test_the_logger_refuses_an_unknown_job_type_before_creating_a_run(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        tracking.WandbRun(save_dir=str(tmp_path), job_type="sweep", mode="disabled")
    assert str(err.value) == "logger.wandb.job_type: must be one of train, eval, readout, got 'sweep'"
    assert not (tmp_path / "wandb").exists()


def test_set_job_type_changes_only_a_wandb_section() -> None:
    cfg = _cfg(job_type="train")
    tracking.set_job_type(cfg, "eval")  # type: ignore[arg-type]
    assert cfg.logger.wandb.job_type == "eval"  # type: ignore[attr-defined]
    csv = OmegaConf.create({"logger": {"csv": {"save_dir": "."}}})
    tracking.set_job_type(csv, "eval")
    assert OmegaConf.to_container(csv) == {"logger": {"csv": {"save_dir": "."}}}
