"""Bad input outside the schema's own table: unwritable paths, a list addressed by a name, user
config directories that do not exist, exceptions no check anticipated, and random wrong-typed
overrides of every config group. Each ends in one ``error: ...`` line (exit 2), nothing written.
"""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import compose, run_inproc
from hypothesis import given, settings
from hypothesis import strategies as st
from omegaconf import DictConfig, ListConfig, OmegaConf

from mtneuro_lab import cli, run


def _preflight_line(overrides: list[str], capsys: pytest.CaptureFixture, flow: str = "train") -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        cli.preflight(overrides, run.preflight_checks[flow], cli.parse_command_line(overrides)[1])
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert exc.value.code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("error: "), lines[0]
    return lines[0]


@pytest.mark.parametrize(
    "override,expected",
    [
        ("paths.cache_dir=/proc/nope/cache", ("paths.cache_dir", "/proc/nope/cache", "not writable")),
        ("hydra.run.dir=/proc/nope/run", ("hydra.run.dir", "/proc/nope/run", "not writable")),
        ("paths.output_root=/proc/nope", ("hydra.run.dir (under paths.output_root)", "/proc/nope/roi_c1")),
        ("logger=tensorboard logger.tensorboard.save_dir=/proc/nope/tb", ("logger.tensorboard.save_dir",)),
        (
            "task=seg3d_3class task.splits.train.z=[100,50]",
            ("task.splits.train.z", "task.splits.train is a list", "task.splits.train.0.z"),
        ),
        ("task.splits.train.3.z=[100,50]", ("task.splits.train.3.z", "has 1 items")),
        ("hydra.searchpath=[file:///nonexistent/confs]", ("hydra.searchpath", "/nonexistent/confs")),
    ],
)
def test_bad_paths_and_list_keys_name_the_key(
    override: str, expected: tuple[str, ...], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    overrides = [f"paths.cache_dir={tmp_path / 'cache'}", *override.split()]
    if not override.startswith(("paths.output_root", "hydra.run.dir")):
        overrides.append(f"hydra.run.dir={tmp_path / 'run'}")
    line = _preflight_line(overrides, capsys)
    for text in expected:
        assert text in line, line
    assert list(tmp_path.iterdir()) == [], "the preflight wrote something"


def test_an_unexpected_exception_names_its_section(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from mtneuro_lab.nets import resnet

    def broken(self: Any, *args: Any, **kwargs: Any) -> None:
        raise ZeroDivisionError("a bug inside the network's constructor")

    monkeypatch.setattr(resnet.ResNet18Encoder, "__init__", broken)
    overrides = [f"paths.cache_dir={tmp_path}", f"hydra.run.dir={tmp_path / 'run'}"]
    line = _preflight_line(overrides, capsys)
    assert line.startswith("error: model: ZeroDivisionError: a bug inside the network's constructor"), line
    assert "-v or HYDRA_FULL_ERROR=1" in line
    monkeypatch.setattr(cli, "_verbose", True)  # -v: the traceback, then the same line
    with pytest.raises(SystemExit):
        cli.preflight(overrides, run.preflight_checks["train"])
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "def broken" not in err
    assert err.strip().splitlines()[-1] == line


def test_missing_config_dir_is_one_line_from_the_command_line(tmp_path: Path) -> None:
    proc = run_inproc("train.py", "--config-dir", str(tmp_path / "nope"), run_dir=tmp_path / "run", fast=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip() == f"error: --config-dir: no config directory at {tmp_path / 'nope'}"
    assert not (tmp_path / "run").exists()


# -- property: wrong-typed overrides of every config group --------------------------------------
#: compositions whose leaves are overridden: the defaults and one option of each other kind
COMPOSITIONS = (
    (),
    ("task=seg2d_3class", "model=unet2d"),
    ("task=snemi3d", "model=mae_finetune"),
    ("model=byol",),
    ("logger=tensorboard",),
)
#: leaves left out, and why: values the run computes, not the user
COMPUTED = (
    "paths.output_dir",
    "paths.root_dir",
    "callbacks.model_checkpoint.dirpath",
    "callbacks.last_checkpoint.dirpath",
)


def _leaves(node: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, value) of every leaf the user could override; interpolations left out."""
    out = []
    keys = list(node.keys()) if isinstance(node, DictConfig) else list(range(len(node)))
    for k in keys:
        if OmegaConf.is_interpolation(node, k):
            continue
        value, key = node[k], f"{prefix}{k}"
        if isinstance(value, DictConfig | ListConfig) and len(value) > 0:
            out += _leaves(value, f"{key}.")
        else:
            out.append((key, value))
    return out


def _cases() -> list[tuple[tuple[str, ...], str, Any]]:
    cases = {}
    for choices in COMPOSITIONS:
        cfg = compose(choices)
        for key, value in _leaves(cfg):
            if key.endswith("_target_") or key.startswith(COMPUTED) or value is None:
                continue
            cases.setdefault((choices, key), (choices, key, value))
    return sorted(cases.values(), key=lambda c: (c[0], c[1]))


CASES = _cases()


def _wrong_values(value: Any) -> list[str]:
    """Override values (Hydra syntax) of another type than ``value``."""
    mapping, listing, word = "{bad: 1}", "[1,oops]", "oops"
    if isinstance(value, bool):
        return [word, "3", listing, mapping]
    if isinstance(value, int | float):
        return [word, listing, mapping]
    if isinstance(value, str):
        return [listing, mapping]
    return [word, mapping] if isinstance(value, list | ListConfig) else [word, listing]


#: a fixed sample of 12 by default (the default suite stays fast and deterministic); set
#: MTNEURO_HYPOTHESIS_EXAMPLES=500 to explore at random
_EXAMPLES = os.environ.get("MTNEURO_HYPOTHESIS_EXAMPLES")


@settings(max_examples=int(_EXAMPLES or 12), derandomize=_EXAMPLES is None, deadline=None, database=None)
@given(case=st.sampled_from(CASES), pick=st.integers(min_value=0, max_value=3))
def test_wrong_typed_overrides_are_one_line(case: tuple, pick: int, tmp_path_factory: pytest.TempPathFactory) -> None:
    choices, key, value = case
    options = _wrong_values(value)
    override = f"{key}={options[pick % len(options)]}"
    tmp = tmp_path_factory.mktemp("wrong")
    overrides = [*choices, override, f"paths.cache_dir={tmp / 'cache'}", f"hydra.run.dir={tmp / 'run'}"]
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exc:
        cli.preflight(overrides, run.preflight_checks["train"])
    lines = [ln for ln in err.getvalue().splitlines() if ln.strip()]
    assert exc.value.code == 2, (override, lines)
    assert len(lines) == 1 and lines[0].startswith("error: "), (override, lines)
    assert key.split(".")[0] in lines[0], (override, lines[0])
    assert list(tmp.iterdir()) == [], f"{override}: the preflight wrote something"


# -- memory check (perf.memory_check) -------------------------------------------------------------
def test_an_oversized_batch_is_refused_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import re

    from mtneuro_lab import memcheck

    # a fixed amount of free memory: the machine's own changes between the two checks below
    monkeypatch.setattr(memcheck, "available_bytes", lambda device: 8 * 2**30)

    overrides = ["data.batch_size=200000", f"paths.cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path / 'run'}"]
    line = _preflight_line(overrides, capsys)
    assert line.startswith("error: data.batch_size: one training step of 200000 samples of 128x128 needs"), line
    assert "perf.memory_check=false" in line and "but 7.2 GB are available" in line
    largest = int(re.search(r"the largest batch that fits is about (\d+)", line)[1])
    assert 1 <= largest < 200000
    assert list(tmp_path.iterdir()) == [], "the preflight wrote something"
    # the batch it names as the largest passes the same check
    fits = [f"data.batch_size={largest}", *overrides[1:]]
    cli.preflight(fits, run.preflight_checks["train"])
    assert list(tmp_path.iterdir()) == []


def test_the_memory_check_opts_out(tmp_path: Path) -> None:
    overrides = ["data.batch_size=200000", "perf.memory_check=false", f"hydra.run.dir={tmp_path / 'run'}"]
    cli.preflight([*overrides, f"paths.cache_dir={tmp_path / 'cache'}"], run.preflight_checks["train"])


@pytest.mark.slow  # ~40 s of CPU: the memory check probes full-size 3D ViTs and U-Nets
def test_the_em_guide_commands_pass_the_preflight(tmp_path: Path) -> None:
    """docs/em.md opens with four commands: each composes, validates and fits in memory with
    the EM tasks' default batch (the X-ray default of 256 crops did not, for three of them)."""
    import re
    import shlex

    guide = (Path(__file__).resolve().parent.parent / "docs" / "em.md").read_text()
    block = guide.split("```", 2)[1]
    commands = [line.split("#")[0] for line in block.splitlines() if line.startswith("python train.py")]
    assert len(commands) == 4
    for command in commands:
        overrides = shlex.split(command)[2:]
        assert any(re.fullmatch(r"model=\w+", o) for o in overrides), command
        cli.preflight([*overrides, f"hydra.run.dir={tmp_path / 'run'}"], run.preflight_checks["train"])
    assert not (tmp_path / "run").exists()


def test_the_memory_estimate_is_reused_only_for_the_same_network_and_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    from mtneuro_lab import memcheck

    monkeypatch.setattr(memcheck, "_ESTIMATES", {})
    probes: list[str] = []
    real = memcheck.estimate

    def counted(method: torch.nn.Module, *args: Any) -> memcheck.Estimate:
        probes.append(repr(method))
        return real(method, *args)

    monkeypatch.setattr(memcheck, "estimate", counted)
    cfg = OmegaConf.create({"model": {"dropout": 0.2}, "task": {"name": "t"}})

    def net(stride: int) -> torch.nn.Module:
        return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, stride=stride), torch.nn.Flatten())

    first = memcheck.cached_estimate(cfg, net(1), (16, 16), 8, 8, False)
    assert memcheck.cached_estimate(cfg, net(1), (16, 16), 8, 8, False) == first  # a new seed, same run
    assert len(probes) == 1
    strided = memcheck.cached_estimate(cfg, net(2), (16, 16), 8, 8, False)  # same weights, other stride
    assert strided.train.per_sample < first.train.per_sample
    other = OmegaConf.create({"model": {"dropout": 0.5}, "task": {"name": "t"}})
    memcheck.cached_estimate(other, net(1), (16, 16), 8, 8, False)
    memcheck.cached_estimate(cfg, net(1), (32, 32), 8, 8, False)
    memcheck.cached_estimate(cfg, net(1), (16, 16), 16, 8, False)
    assert len(probes) == 5, "a setting, a shape or a batch that differs is probed again"
