"""docs/user_configs.md stays true: where an installed package writes, a user's own config
directory and method class (docs/examples/my_lab), evaluate overrides checked against the
checkpoint's saved config, and (slow) the wheel installed into a fresh venv, run from /tmp."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import pytest
from conftest import ROOT, cli_env, compose
from omegaconf import OmegaConf

from mtneuro_lab import cli, run

EXAMPLE = ROOT / "docs" / "examples" / "my_lab"


def test_project_root_follows_home_then_clone_then_cwd(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MTNEURO_HOME", str(tmp_path / "home"))
    assert cli.project_root() == tmp_path / "home"
    monkeypatch.delenv("MTNEURO_HOME")
    assert cli.project_root() == ROOT  # the tests run from a clone
    monkeypatch.setattr(cli, "CLONE_DIR", None)  # an installed package: the working directory
    monkeypatch.chdir(tmp_path)
    assert cli.project_root() == tmp_path


@pytest.fixture
def example_on_path(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The worked example's method module importable, its config directory as ``--config-dir``."""
    monkeypatch.syspath_prepend(str(EXAMPLE))
    monkeypatch.delitem(sys.modules, "my_methods", raising=False)
    return [str(EXAMPLE / "conf")]


def test_worked_example_passes_the_preflight(
    example_on_path: list[str], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    overrides = ["task=roi_c1_top", "model=small_cnn", f"paths.cache_dir={tmp_path}", f"hydra.run.dir={tmp_path / 'r'}"]
    cli.preflight(overrides, run.preflight_checks["train"], example_on_path)  # no SystemExit
    with pytest.raises(SystemExit) as exc:
        cli.preflight([*overrides, "+model.widht=8"], run.preflight_checks["train"], example_on_path)
    line = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and "\n" not in line, line
    assert line.startswith("error: model.widht: unknown key for SmallCNN; allowed:"), line
    for key in ("depth", "optimizer", "scheduler", "width"):
        assert key in line.split("allowed:", 1)[1], line


def test_worked_example_task_changes_only_the_training_slices(example_on_path: list[str]) -> None:
    with cli.hydra_context(example_on_path):
        from hydra import compose as hydra_compose

        mine = hydra_compose(config_name="config", overrides=["task=roi_c1_top"])
    packaged = compose(["task=roi_c1"])
    assert OmegaConf.to_container(mine.task.splits.train) == [{"set": "A", "z": [245, 380]}]
    assert mine.task.splits.val == packaged.task.splits.val and mine.task.splits.test == packaged.task.splits.test
    assert mine.task.name == "roi_c1_top"


def test_evaluate_overrides_follow_the_saved_config(tmp_path: Path) -> None:
    saved = compose(["task=snemi3d", "model=mae_finetune"])
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(saved))
    ckpt = f"ckpt_path={tmp_path / 'checkpoints' / 'last.ckpt'}"
    argv = [ckpt, "task.postprocess.threshold=0.2", "task.nope=1", "+extra.key=1", "data.eval_batch_size=2"]
    assert cli.evaluate_overrides(argv) == [
        ckpt,
        "++task.postprocess.threshold=0.2",  # the run had it: overridden as written
        "task.nope=1",  # unknown to the run too: the preflight refuses it as usual
        "+extra.key=1",
        "++data.eval_batch_size=2",
    ]
    # ++ is accepted where the default composition (ROI-C1) lacks the key
    assert compose(["++task.postprocess.threshold=0.2"]).task.postprocess.threshold == 0.2
    assert cli.evaluate_overrides(["task.postprocess.threshold=0.2"]) == ["task.postprocess.threshold=0.2"]


# -- the installed wheel -------------------------------------------------------------------------
def _run(args: list[str], cwd: Path, env: dict[str, str], timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_wheel_installs_into_a_fresh_venv_and_trains_from_tmp() -> None:
    """Build the wheel from a copy of the sources (nothing written into the clone), install it
    without dependencies into a new venv that borrows this environment's packages through a
    .pth (torch is not downloaded again), then train the worked example and evaluate it from a
    directory outside any clone."""
    tmp = Path(tempfile.mkdtemp(prefix="mtneuro-wheel-"))
    try:
        src = tmp / "src"
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
        shutil.copytree(ROOT / "mtneuro_lab", src / "mtneuro_lab", ignore=ignore)
        for name in ("pyproject.toml", "README.md"):
            shutil.copy(ROOT / name, src / name)
        env = {k: v for k, v in cli_env().items() if k not in ("MTNEURO_HOME", "MTNEURO_OUTPUTS", "PYTHONPATH")}
        build = _run(
            [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", "dist", str(src)],
            tmp,
            env,
        )
        assert build.returncode == 0, build.stderr[-2000:]
        (wheel,) = (tmp / "dist").glob("mtneuro_lab-*.whl")

        venv = tmp / "venv"
        made = _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp, env)
        assert made.returncode == 0, made.stderr
        python = venv / "bin" / "python"
        site = Path(
            _run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], tmp, env).stdout.strip()
        )
        # dependencies from this environment, appended after the venv's own site-packages (a plain
        # path line: the clone's editable install, a .pth inside it, is not processed)
        (site / "zz_project_deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
        inst = _run(
            [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", str(wheel)], tmp, env
        )
        assert inst.returncode == 0, inst.stderr[-2000:]

        work = tmp / "work"
        shutil.copytree(EXAMPLE, work, ignore=ignore)
        where = _run([str(python), "-c", "import mtneuro_lab; print(mtneuro_lab.__file__)"], work, env)
        assert where.stdout.strip().startswith(str(site)), where.stdout + where.stderr

        train_env = {**env, "PYTHONPATH": str(work)}  # the example's method module
        fast = ["+debug=fast"]  # the tiny sizes ship with the package (conf/debug)
        args = [str(venv / "bin" / "mtneuro-train"), "--config-dir", "conf", "task=roi_c1_top", "model=small_cnn"]
        trained = _run([*args, *fast, "trainer.max_epochs=1"], work, train_env)
        assert trained.returncode == 0, trained.stderr[-3000:]
        (run_dir,) = (work / "outputs" / "roi_c1_top" / "small_cnn").iterdir()  # paths.root_dir: the cwd
        assert {"config.yaml", "metrics.json", "checkpoints"} <= {p.name for p in run_dir.iterdir()}
        assert f"run directory: {run_dir}" in trained.stdout + trained.stderr
        assert "  mtneuro-eval ckpt_path=" in trained.stdout + trained.stderr  # next commands as started

        ckpt = run_dir / "checkpoints" / "last.ckpt"
        evaluated = _run(
            [str(python), "-m", "mtneuro_lab.evaluate", f"ckpt_path={ckpt}", "logger=none"], work, train_env
        )
        assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
