"""The CLI contract end to end: train, metrics.json, evaluate round trip, one-line errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, cli_env, read_metrics, run_cli, run_inproc


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("train") / "run"
    proc = run_inproc("train.py", "trainer.limit_test_batches=3", "data.eval_batch_size=32", run_dir=run_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def test_run_directory_contract(trained_run: Path) -> None:
    assert (trained_run / "config.yaml").is_file()
    assert (trained_run / "checkpoints" / "last.ckpt").is_file()
    metrics = read_metrics(trained_run)
    assert "test/acc" in metrics and "test/acc_cortex" in metrics
    # what selection needs: the validation metrics of the tested checkpoint and what chose it
    assert metrics["selection/metric"] == "val/acc" and metrics["selection/mode"] == "max"
    assert metrics["val/acc"] == pytest.approx(metrics["selection/value"], abs=1e-6)
    assert isinstance(metrics["best_epoch"], int) and isinstance(metrics["best_step"], int)
    assert metrics["best_step"] == 2 * (metrics["best_epoch"] + 1)  # 2 training batches per epoch
    best = [p.name for p in (trained_run / "checkpoints").glob("*.ckpt") if p.name != "last.ckpt"]
    assert best == [f"epoch{metrics['best_epoch']:03d}.ckpt"]
    assert metrics["split/touching"] == 0  # ROI-C1: one cube set, nothing touches
    assert {k.split("/")[0] for k in metrics} == {"test", "val", "selection", "split", "best_epoch", "best_step"}
    assert not list(trained_run.rglob(".tmp-*")), "temporary files left behind"


def test_evaluate_round_trip_gives_the_same_metrics(trained_run: Path, tmp_path: Path) -> None:
    best = [p for p in (trained_run / "checkpoints").glob("*.ckpt") if p.name != "last.ckpt"]
    assert len(best) == 1
    eval_dir = tmp_path / "eval"
    proc = run_inproc("evaluate.py", f"ckpt_path={best[0]}", run_dir=eval_dir, fast=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    train_metrics, eval_metrics = read_metrics(trained_run), read_metrics(eval_dir)
    assert eval_metrics["test/acc"] == pytest.approx(train_metrics["test/acc"], abs=1e-6)
    assert {k for k in train_metrics if k.startswith("test/")} <= set(eval_metrics)


@pytest.mark.parametrize(
    "override,key",
    [
        ("model=foo", "model=foo"),
        ("task=roi_c9", "task=roi_c9"),
        ("model.optimizer.lr=-0.1", "model.optimizer.lr"),
        ("task.downsample=3", "task.downsample"),
        ("task.splits.val=[{set: A, z: [370, 400]}]", "task.splits"),
        ("task.splits.test=[{set: A, z: [412, 470]}]", "task.splits"),
        ("data.batch_size=0", "data.batch_size"),
        ("model.dropuot=0.1", "model.dropuot"),
        ("trainer.max_epoch=3", "trainer.max_epoch"),
        ("seed=-1", "seed"),
    ],
)
def test_bad_overrides_fail_before_any_work(override: str, key: str, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = run_inproc("train.py", override, run_dir=run_dir)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and key in lines[0], lines[0]
    assert not run_dir.exists(), "a failed preflight must not create the run directory"


def test_evaluate_without_checkpoint_is_one_line(tmp_path: Path) -> None:
    proc = run_inproc("evaluate.py", f"ckpt_path={tmp_path / 'missing.ckpt'}", run_dir=tmp_path / "e", fast=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "ckpt_path" in proc.stderr


def test_print_config_needs_no_data(tmp_path: Path) -> None:
    proc = run_inproc("train.py", "--cfg", "job", fast=False)
    assert proc.returncode == 0, proc.stderr
    assert "roi_c1" in proc.stdout and "batch_size" in proc.stdout


def test_real_processes_exit_2_with_one_line_and_write_nothing(tmp_path: Path) -> None:
    """What a shell sees from the scripts themselves (the other tests run the same entry point in-process)."""
    for script, override in (("train.py", "data.batch_size=0"), ("evaluate.py", f"ckpt_path={tmp_path / 'no.ckpt'}")):
        run_dir = tmp_path / script
        proc = run_cli(script, override, run_dir=run_dir, fast=script == "train.py")
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert (
            proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: ") and override.split("=")[0] in proc.stderr
        )
        assert not run_dir.exists()


@pytest.mark.parametrize(
    ("flow", "override", "message"),
    [
        ("train", "data.batch_sise=3", "error: data.batch_sise: unknown key"),
        (
            "evaluate",
            "ckpt_path=/no/such/run/last.ckpt",
            "error: ckpt_path: no checkpoint file at /no/such/run/last.ckpt",
        ),
    ],
)
def test_bad_input_exits_before_torch_is_loaded(flow: str, override: str, message: str, tmp_path: Path) -> None:
    """A typo or a bad value in a training command, or a checkpoint that is not there, is
    refused before torch and Lightning are imported (about 1 s of CPU instead of about 10)."""
    code = (
        "import sys\n"
        "from mtneuro_lab.cli import main\n"
        f"sys.argv = ['{flow}.py', '{override}', 'hydra.run.dir={tmp_path / 'run'}']\n"
        f"try:\n    main('{flow}')\nexcept SystemExit as exc:\n    print(exc.code, 'torch' in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=cli_env(), capture_output=True, text=True)
    assert proc.stdout.split() == ["2", "False"], proc.stdout + proc.stderr[-2000:]
    assert proc.stderr.strip().startswith(message) and not (tmp_path / "run").exists()
