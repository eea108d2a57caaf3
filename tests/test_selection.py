"""Choices are made on validation: the run record, sweep objectives, `report --best`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import compose, run_inproc
from omegaconf import OmegaConf

from mtneuro_lab import cli, run
from mtneuro_lab.errors import ConfigError
from mtneuro_lab.methods.segmentation import SMPSegmentation
from mtneuro_lab.methods.supervised import SupervisedClassifier
from mtneuro_lab.report import build_report, main

CLASSES = ["cortex", "striatum", "vp", "zi"]


def test_methods_name_what_they_log_on_validation() -> None:
    sup = SupervisedClassifier(4, CLASSES, (64, 64))
    assert sup.validation_metrics() == {"val/loss", "val/acc", *(f"val/acc_{c}" for c in CLASSES)}
    seg = SMPSegmentation(3, ["bg", "vessel", "cell"], (64, 64), encoder_name="resnet18")
    assert {"val/iou_mean", "val/f1_cell", "val/acc", "val/loss"} <= seg.validation_metrics()
    assert seg.monitor[0] in seg.validation_metrics() and sup.monitor[0] in sup.validation_metrics()


@pytest.mark.parametrize(
    "metric,message",
    [
        ("test/acc", "callbacks.model_checkpoint.monitor: test/acc selects on the test split; use a val/ metric"),
        ("val/iou_mean", "callbacks.model_checkpoint.monitor: val/iou_mean is not logged by SupervisedClassifier"),
    ],
)
def test_a_selection_metric_must_be_a_logged_validation_metric(metric: str, message: str) -> None:
    with pytest.raises(ConfigError, match="^" + message.replace("/", "/")):
        run.check_selection_metric(
            SupervisedClassifier(4, CLASSES, (64, 64)), metric, "callbacks.model_checkpoint.monitor"
        )


def _preflight_error(overrides: list[str], capsys: pytest.CaptureFixture, check: str = "train") -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli.preflight(overrides, run.preflight_checks[check])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize(
    "overrides,expected",
    [
        (
            ["+sweep=optuna", "sweep.objective=test/acc"],
            "error: sweep.objective: test/acc selects on the test split; use a val/ metric",
        ),
        (["+sweep=optuna", "sweep.objective=val/iou_mean"], "error: sweep.objective: val/iou_mean is not logged by"),
        (
            ["+sweep=optuna", "hydra.sweeper.direction=minimize"],
            "error: hydra.sweeper.direction: minimize, but the objective val/acc is maximised",
        ),
        (
            ["callbacks.model_checkpoint.monitor=val/dice"],
            "error: callbacks.model_checkpoint.monitor: val/dice is not logged by SupervisedClassifier",
        ),
        # ROI-C2 has touching cubes: their warnings belong to the run's log, not to a failing preflight
        (
            ["task=roi_c2", "callbacks.model_checkpoint.monitor=test/acc"],
            "error: callbacks.model_checkpoint.monitor: test/acc selects on the test split; use a val/ metric",
        ),
    ],
)
def test_bad_selection_is_one_line_before_any_work(
    overrides: list[str], expected: str, capsys: pytest.CaptureFixture
) -> None:
    assert _preflight_error(["task.downsample=4", *overrides], capsys).startswith(expected)


def test_multirun_objective_is_checked_before_the_first_job(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "sweep"
    proc = run_inproc(
        "train.py", "+sweep=optuna", "sweep.objective=test/acc", "seed=1,2", run_dir=sweep_dir, multirun=True
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip() == "error: sweep.objective: test/acc selects on the test split; use a val/ metric"
    assert not sweep_dir.exists()


def test_sweep_overrides_are_told_apart_by_hydras_parser() -> None:
    plain, swept = cli.split_sweep_overrides(
        ["+sweep=optuna", "seed=1,2", "model=byol,myow", "task.x=[1,2]", "model.optimizer.lr=choice(0.1,0.01)"]
    )
    assert plain == ["+sweep=optuna", "task.x=[1,2]"]
    assert swept == ["seed", "model", "model.optimizer.lr"]
    assert cli.is_multirun_launch(["-m", "seed=1,2"]) and not cli.is_multirun_launch(["-m", "--cfg", "job"])


def test_optuna_objective_is_the_validation_value_even_when_test_disagrees() -> None:
    cfg = OmegaConf.create({"sweep": {"objective": "selection"}})
    result = {"val/acc": 0.6, "selection/value": 0.6, "test/acc": 0.9}
    assert cli._objective(cfg, result) == 0.6
    cfg.sweep.objective = "val/acc_zi"
    assert cli._objective(cfg, {**result, "val/acc_zi": 0.25}) == 0.25
    assert compose(["+sweep=optuna"]).sweep.objective == "selection"


# -- report --------------------------------------------------------------------------------------
def _job(root: Path, name: str, lr: float, seed: int, val: float, test: float, sweep: dict) -> None:
    job = root / name
    (job / ".hydra").mkdir(parents=True)
    config = {"seed": seed, "task": {"name": "roi_c1"}, "model": {"optimizer": {"lr": lr}}, "sweep": sweep}
    (job / "config.yaml").write_text(yaml.safe_dump(config))
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"model.optimizer.lr={lr}", f"seed={seed}"]))
    (job / ".hydra" / "hydra.yaml").write_text(
        yaml.safe_dump({"hydra": {"runtime": {"choices": {"task": "roi_c1", "model": "supervised"}}}})
    )
    (job / "metrics.json").write_text(
        json.dumps(
            {
                "val/acc": val,
                "selection/metric": "val/acc",
                "selection/mode": "max",
                "selection/value": val,
                "best_epoch": 3,
                "best_step": 40,
                "test/acc": test,
                "test/loss": 1 - test,
            }
        )
    )


@pytest.fixture
def disagreeing_sweep(tmp_path: Path) -> Path:
    """lr 0.1 is best on validation, lr 0.01 on test."""
    sweep = {
        "name": "grid",
        "seeds": [1, 2],
        "report": {"rows": "model.optimizer.lr", "cols": None, "metric": "test/acc", "paper_choice": "test/acc"},
    }
    root = tmp_path / "sweep"
    for seed in (1, 2):
        _job(root, f"lr0.1_s{seed}", 0.1, seed, val=0.90 + seed / 100, test=0.70, sweep=sweep)
        _job(root, f"lr0.01_s{seed}", 0.01, seed, val=0.80, test=0.95 + seed / 100, sweep=sweep)
    return root


def test_best_chooses_by_validation_and_shows_test_beside_it(
    disagreeing_sweep: Path, capsys: pytest.CaptureFixture
) -> None:
    assert main([str(disagreeing_sweep), "--best"]) == 0
    out = capsys.readouterr().out
    assert (
        "grid: best val/acc (max) = 0.915 ± 0.007 (n=2) with: task=roi_c1 model=supervised model.optimizer.lr=0.1\n"
        in out
    )
    assert "test/acc = 0.700 ± 0.000" in out


@pytest.mark.parametrize("argv", [["--best", "test/acc"], ["--best", "test/loss", "--minimize"]])
def test_best_refuses_a_test_metric(disagreeing_sweep: Path, argv: list[str], capsys: pytest.CaptureFixture) -> None:
    assert main([str(disagreeing_sweep), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: --best: {argv[1]} selects on the test split; use a val/ metric"


def test_report_labels_the_papers_test_split_choice(disagreeing_sweep: Path) -> None:
    build_report([disagreeing_sweep], disagreeing_sweep / "report", plots=False)
    md = (disagreeing_sweep / "report" / "report.md").read_text()
    assert "Chosen on validation (val/acc, max of the mean over seeds): **model.optimizer.lr=0.1**" in md
    assert "The paper's way (best mean test/acc: chooses on the test split" in md
    assert "model.optimizer.lr=0.01 (0.965 ± 0.007)" in md


def test_report_without_a_common_selection_metric_asks_for_one(
    disagreeing_sweep: Path, capsys: pytest.CaptureFixture
) -> None:
    first = disagreeing_sweep / "lr0.1_s1" / "metrics.json"
    record = json.loads(first.read_text())
    first.write_text(json.dumps({**record, "selection/metric": "val/loss", "selection/mode": "min"}))
    assert main([str(disagreeing_sweep), "--best"]) == 2
    assert "name a val/ metric: --best val/<metric>" in capsys.readouterr().err


def test_optuna_sweep_chooses_the_trial_best_on_validation(tmp_path: Path) -> None:
    """Three tiny trials; the study's best trial is the one with the highest val/acc."""
    sweep_dir = tmp_path / "optuna"
    proc = run_inproc(
        "train.py",
        "+sweep=optuna",
        "hydra.sweeper.n_trials=3",
        "trainer.limit_train_batches=1",
        "data.batch_size=8",  # fixed: the study's own batch-size choice would train on up to 256 tiles
        "data.eval_batch_size=32",  # one validation batch of 32 tiles: trials may tie (checked below)
        run_dir=sweep_dir,
        multirun=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    trials = []
    for path in sorted(sweep_dir.glob("*/metrics.json")):
        overrides = yaml.safe_load((path.parent / ".hydra" / "overrides.yaml").read_text())
        params = {k: float(v) for k, v in (o.split("=", 1) for o in overrides) if k in results["best_params"]}
        trials.append((json.loads(path.read_text()), params))
    assert len(trials) == 3
    best_value = max(m["selection/value"] for m, _ in trials)
    assert results["best_value"] == pytest.approx(best_value)
    chosen = {k: float(v) for k, v in results["best_params"].items()}
    tied = [params for m, params in trials if m["val/acc"] == pytest.approx(best_value)]
    assert any(chosen == pytest.approx(params) for params in tied), (chosen, tied)
