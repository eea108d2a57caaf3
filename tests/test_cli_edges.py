"""Command-line helpers of :mod:`mtneuro_lab.cli` on inputs the CLI tests never give: list keys
walked by index, existing config directories, a command line argparse refuses, the objective a
failed sweep job reports, and a torchrun launch across nodes refused before Hydra starts."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from conftest import run_inproc
from omegaconf import OmegaConf

from mtneuro_lab import cli


def test_list_keys_are_walked_by_index() -> None:
    base = OmegaConf.create({"task": {"splits": {"train": [{"set": "A", "z": [0, 10]}]}}})
    assert cli._list_step(base, "task.splits.train.0.z") is None  # a valid path: nothing to explain
    assert cli._list_step(base, "task.splits.train.0.z.1") is None
    assert cli._list_step(base, "task.nothing.here") is None
    assert (
        cli._list_step(base, "task.splits.train.0.z.5")
        == "task.splits.train.0.z.5: task.splits.train.0.z has 2 items; no item 5"
    )
    assert cli._list_step(base, "task.splits.train.first.z") == (
        "task.splits.train.first.z: task.splits.train is a list; name an item by its index (e.g. task.splits.train.0.first.z)"
    )


def test_existing_config_directories_are_returned_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "conf").mkdir()
    assert cli.check_config_dir("conf") == [str(tmp_path / "conf")]
    assert cli.check_config_dir(None) == []
    assert cli.searchpath_dirs([f"hydra.searchpath=[file://{tmp_path / 'conf'},pkg://somewhere]", "seed=1"]) == [
        str(tmp_path / "conf")
    ]


def test_a_command_line_argparse_refuses_leaves_the_overrides_to_hydra(capsys: pytest.CaptureFixture[str]) -> None:
    overrides, dirs = cli.parse_command_line(["seed=3", "--config-dir"])  # the option lacks its value
    assert (overrides, dirs) == (["seed=3"], [])
    assert "--config-dir" in capsys.readouterr().err


@pytest.mark.parametrize(("direction", "worst"), [("maximize", -math.inf), ("minimize", math.inf)])
def test_a_failed_sweep_job_reports_the_worst_objective(
    direction: str, worst: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cli, "hydra_node", lambda: OmegaConf.create({"sweeper": {"direction": direction}}))
    cfg = OmegaConf.create({"sweep": {"objective": "val/acc"}})
    assert cli._objective(cfg, None) == worst
    assert cli._objective(cfg, {"val/acc": 0.75}) == 0.75
    assert cli._objective(OmegaConf.create({"sweep": {"objective": "selection"}}), {"selection/value": 0.5}) == 0.5


def test_outside_hydra_there_is_no_multirun() -> None:
    assert cli._is_multirun() is False


def test_torchrun_across_nodes_without_rendezvous_id_is_refused_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No ``hydra.run.dir`` on the command line (the ranks could not agree on one): refused
    before Hydra makes any directory."""
    monkeypatch.chdir(tmp_path)
    env = {"TORCHELASTIC_RUN_ID": "none", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2", "RANK": "0"}
    proc = run_inproc("train.py", env=env)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "error: hydra.run.dir: torchrun across nodes without a rendezvous id"
    )
    assert list(tmp_path.iterdir()) == []
