"""docs/contributing.md stays true: its worked examples are installed and run as written.

Every code block tagged ``file=<path>`` is installed: Python files as in-memory modules under
their documented module name (nothing is written into the package), YAML files into a
temporary directory added to Hydra's search path. Every ``python train.py`` line of the guide's
``bash`` blocks is then composed exactly as the CLI would, validated, and (single runs) trained
and tested in-process on the ``+debug=fast`` sizes; each example's claims are checked.
"""

from __future__ import annotations

import importlib.util
import itertools
import re
import shlex
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import ROOT, compose
from omegaconf import OmegaConf, open_dict

from mtneuro_lab import run
from mtneuro_lab.build import build_components
from mtneuro_lab.cli import PACKAGE_DIR
from mtneuro_lab.config.schema import validate_config
from mtneuro_lab.errors import ConfigError

GUIDE = ROOT / "docs" / "contributing.md"
BLOCK = re.compile(r"^```(\w+)([^\n]*)\n(.*?)^```", re.M | re.S)
YAML_ROOTS = ("mtneuro_lab/conf/", "mtneuro_lab/sweeps/")


def guide_blocks() -> list[tuple[str, str, str]]:
    """``(language, info after the language, body)`` of every fenced block in the guide."""
    return [(m.group(1), m.group(2).strip(), m.group(3)) for m in BLOCK.finditer(GUIDE.read_text())]


def train_commands() -> list[list[str]]:
    """The arguments of every ``python train.py ...`` line in the guide's bash blocks."""
    lines = [ln for lang, _, body in guide_blocks() if lang == "bash" for ln in body.splitlines()]
    return [shlex.split(ln.split("#")[0])[2:] for ln in lines if ln.startswith("python train.py")]


@pytest.fixture()
def guide(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Install the guide's files; returns the directory put on Hydra's search path."""
    conf = tmp_path / "conf"
    for lang, info, body in guide_blocks():
        if not info.startswith("file="):
            continue
        path = info.removeprefix("file=")
        if lang == "python":
            name = path.removesuffix(".py").replace("/", ".")
            module = importlib.util.module_from_spec(importlib.util.spec_from_loader(name, loader=None))
            module.__file__ = str(ROOT / path)
            monkeypatch.setitem(sys.modules, name, module)  # before exec: classes look their module up
            exec(compile(body, path, "exec"), module.__dict__)  # noqa: S102 - the guide's own code
            parent, _, leaf = name.rpartition(".")
            monkeypatch.setattr(sys.modules[parent], leaf, module, raising=False)
        else:
            root = next(r for r in YAML_ROOTS if path.startswith(r))
            (conf / path.removeprefix(root)).parent.mkdir(parents=True, exist_ok=True)
            (conf / path.removeprefix(root)).write_text(body)
    return conf


def composed(conf: Path, args: list[str], output_dir: Path | None = None) -> Any:
    """The config the CLI would build for ``args``, with the guide's files on the search path."""
    searchpath = f"hydra.searchpath=[file://{PACKAGE_DIR / 'sweeps'},file://{conf}]"
    extra = [f"paths.output_dir={output_dir}"] if output_dir is not None else []
    return compose([searchpath, *[a for a in args if a != "-m"], *extra])


def test_the_guide_has_the_four_worked_examples() -> None:
    files = {info.removeprefix("file=") for _, info, _ in guide_blocks() if info.startswith("file=")}
    assert {
        "mtneuro_lab/methods/meanpool.py",
        "mtneuro_lab/conf/model/meanpool.yaml",
        "mtneuro_lab/data/cortex_task.py",
        "mtneuro_lab/conf/task/cortex_vs_rest.yaml",
        "mtneuro_lab/data/sources/grey_levels.py",
        "mtneuro_lab/conf/source/grey_levels.yaml",
        "mtneuro_lab/sweeps/sweep/lr_grid.yaml",
    } <= files
    commands = train_commands()
    assert ["model=meanpool", "+debug=fast"] in commands
    assert ["task=cortex_vs_rest", "model=meanpool", "+debug=fast"] in commands
    assert ["source=grey_levels", "model=meanpool", "+debug=fast"] in commands
    assert ["-m", "+sweep=lr_grid", "model=meanpool"] in commands


@pytest.mark.parametrize("args", [c for c in train_commands() if "-m" not in c], ids=" ".join)
def test_each_train_command_of_the_guide_trains_and_tests(guide: Path, tmp_path: Path, args: list[str]) -> None:
    cfg = composed(guide, args, tmp_path / "run")
    metrics = run.train(cfg)
    assert (tmp_path / "run" / "metrics.json").is_file() and (tmp_path / "run" / "config.yaml").is_file()
    assert metrics["selection/metric"] == "val/acc" and np.isfinite(metrics["test/loss"])
    if "task=cortex_vs_rest" in args:  # the method was told the task's two classes
        assert {k for k in metrics if k.startswith("test/acc_")} == {"test/acc_other", "test/acc_cortex"}
    else:
        assert {k for k in metrics if k.startswith("test/acc_")} == {f"test/acc_{r}" for r in cfg.cubes.regions}


def test_meanpool_options_are_checked_across_the_hierarchy(guide: Path) -> None:
    cfg = composed(guide, ["model=meanpool"])
    validate_config(cfg)
    bad = OmegaConf.merge(cfg, {})
    with open_dict(bad):
        bad.model.gird = 2
    with pytest.raises(
        ConfigError, match=r"^model.gird: unknown key for MeanPoolClassifier; allowed: grid, optimizer, scheduler$"
    ):
        validate_config(bad)
    with pytest.raises(ConfigError, match=r"^model.optimizer.lr: must be > 0, got -1.0$"):
        build_components(OmegaConf.merge(cfg, {"model": {"optimizer": {"lr": -1.0}}}))
    with pytest.raises(ConfigError, match=r"^model.grid: must be >= 1, got 0$"):
        build_components(OmegaConf.merge(cfg, {"model": {"grid": 0}}))


def test_cortex_task_labels_exactly_the_cortex_tiles(guide: Path) -> None:
    comps = build_components(composed(guide, ["task=cortex_vs_rest", "model=meanpool", "+debug=fast"]))
    assert comps.method.num_classes == 2 and comps.method.class_names == ["other", "cortex"]
    arrays = comps.task.build("val", comps.source)
    cortex = comps.catalog.region_index("cortex")
    assert set(np.unique(arrays.regions)) == set(range(len(comps.catalog.regions)))  # all four regions
    assert np.array_equal(arrays.targets, (arrays.regions == cortex).astype(np.int64))


def test_grey_level_source_gives_each_region_its_level(guide: Path) -> None:
    comps = build_components(composed(guide, ["source=grey_levels", "model=meanpool", "+debug=fast"]))
    arrays = comps.task.build("val", comps.source)
    for i in range(len(comps.catalog.regions)):
        mean = arrays.images[arrays.regions == i].mean()
        assert abs(mean - (40 + 50 * i)) < 1.0, (i, mean)
    with pytest.raises(ConfigError, match=r"^source.noise: must be >= 0, got -1"):
        build_components(composed(guide, ["source=grey_levels", "source.noise=-1"]))


def test_lr_grid_sweep_composes_validates_and_has_nine_jobs(guide: Path) -> None:
    (args,) = [c for c in train_commands() if "+sweep=lr_grid" in c]
    cfg = composed(guide, args)
    validate_config(cfg)
    run.check_selection(cfg, build_components(cfg).method)  # what chooses each job's checkpoint
    hydra = compose([f"hydra.searchpath=[file://{PACKAGE_DIR / 'sweeps'},file://{guide}]", "+sweep=lr_grid"], True)
    params = hydra.hydra.sweeper.params
    jobs = list(itertools.product(*(str(v).split(",") for v in params.values())))
    assert len(jobs) == 9 and cfg.sweep.seeds == [1, 100, 350] and cfg.sweep.report.rows == "model.optimizer.lr"


# -- habits: the pre-commit hooks ---------------------------------------------------------------
def test_pre_commit_hooks_are_local_and_offline() -> None:
    config = OmegaConf.load(ROOT / ".pre-commit-config.yaml")
    assert [r.repo for r in config.repos] == ["local"]  # nothing to download
    hooks = {h.id: h for r in config.repos for h in r.hooks}
    assert set(hooks) == {"ruff-format", "ruff-check", "mypy", "large-files"}
    assert all(h.language == "system" for h in hooks.values())
    # mypy checks the package as configured ([tool.mypy] packages), not only the staged files
    assert hooks["mypy"].pass_filenames is False and hooks["mypy"].entry == "python -m mypy"
    assert "--max-kb 500" in hooks["large-files"].entry
    assert (ROOT / hooks["large-files"].entry.split()[1]).is_file()


def test_large_file_check_refuses_only_files_over_the_limit(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    spec = importlib.util.spec_from_file_location("check_large_files", ROOT / ".ci" / "check_large_files.py")
    assert spec is not None and spec.loader is not None
    checker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(checker)
    small, limit, big = tmp_path / "small.py", tmp_path / "limit.bin", tmp_path / "run.ckpt"
    small.write_bytes(b"x" * 10_000)
    limit.write_bytes(b"x" * 500 * 1024)
    big.write_bytes(b"x" * (500 * 1024 + 1))
    assert checker.main(["--max-kb", "500", str(small), str(limit), str(tmp_path / "deleted.py")]) == 0
    assert checker.main(["--max-kb", "500", str(small), str(big)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"error: {big}: 501 KB is over the 500 KB limit (run products and data stay out of git)"]
