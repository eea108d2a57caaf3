"""How :mod:`mtneuro_lab.report` reads job directories it meets in the wild: an ``evaluate.py``
run labelled by the training run of its checkpoint, unreadable result files, config only under
``.hydra/``, and the choice of the best experiment by a metric's direction."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from mtneuro_lab import report
from mtneuro_lab.analysis.tables import group_runs
from mtneuro_lab.errors import ConfigError


def job(
    path: Path,
    *,
    config: Any = None,
    hydra_config: Any = None,
    choices: dict | None = None,
    overrides: list[str] | None = None,
    metrics: Any = None,
    failed: str | None = None,
) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    if config is not None:
        (path / "config.yaml").write_text(yaml.safe_dump(config))
    hydra = path / ".hydra"
    hydra.mkdir(exist_ok=True)
    if hydra_config is not None:
        (hydra / "config.yaml").write_text(yaml.safe_dump(hydra_config))
    if choices is not None:
        (hydra / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"runtime": {"choices": choices}}}))
    if overrides is not None:
        (hydra / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if metrics is not None:
        (path / "metrics.json").write_text(metrics if isinstance(metrics, str) else json.dumps(metrics))
    if failed is not None:
        (path / "failed.json").write_text(failed)
    return path


def test_an_evaluate_run_is_labelled_by_the_training_run_of_its_checkpoint(tmp_path: Path) -> None:
    train = job(
        tmp_path / "train",
        config={"seed": 1},
        choices={"task": "roi_c1", "model": "resnet18", "source": None},
        overrides=["model.lr=0.01", "seed=1"],
    )
    ckpt = train / "checkpoints" / "best.ckpt"
    evaluate = job(
        tmp_path / "eval",
        hydra_config={"seed": 2},  # no config.yaml of its own: .hydra/config.yaml is read
        choices={"task": "other", "model": "other"},
        overrides=[f"ckpt_path={ckpt}", "data.eval_batch_size=4", "hydra.run.dir=x"],
        metrics={"test/acc": 0.75, "selection/metric": "val/acc"},
    )
    run = report.read_run(evaluate)
    assert run is not None and run.status == "done" and run.seed == 2
    assert run.label == {
        "task": "roi_c1",
        "model": "resnet18",
        "model.lr": "0.01",
        "data.eval_batch_size": "4",
    }  # the checkpoint path, the seed and hydra.* name no experiment
    assert run.metrics == {"test/acc": 0.75} and run.info == {"selection/metric": "val/acc"}
    orphan = job(tmp_path / "orphan", config={}, choices={"task": "t1"}, overrides=["ckpt_path=/nowhere/best.ckpt"])
    assert report.describe(orphan) == {"task": "t1"}  # no training run found: its own choices


@pytest.mark.parametrize(
    ("files", "status", "error"),
    [
        ({"metrics": "{not json"}, "failed", "unreadable metrics.json ("),
        ({"metrics": "[1, 2]"}, "failed", "unreadable metrics.json ("),
        ({"failed": "{oops"}, "failed", "failed (unreadable failed.json)"),
        ({"failed": json.dumps({"error": "data.batch_size: too large"})}, "failed", "data.batch_size: too large"),
        ({}, "incomplete", ""),
    ],
)
def test_result_files_give_the_status(tmp_path: Path, files: dict, status: str, error: str) -> None:
    run = report.read_run(job(tmp_path / "run", config={"seed": 0}, **files))
    assert run is not None and run.status == status and run.error.startswith(error)
    assert run.metrics == {}


def test_a_directory_with_an_unreadable_config_is_not_a_run(tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.yaml").write_text("seed: [unclosed\n")
    assert report.read_run(broken) is None
    with pytest.raises(ConfigError) as err:
        report.collect([tmp_path])
    assert str(err.value) == f"report: no run directories (config.yaml) below {tmp_path}"
    job(tmp_path / "report" / "copy", config={"seed": 0})  # the report's own output is skipped
    job(tmp_path / "good", config={"seed": 0}, metrics={"val/loss": 1.0})
    assert [Path(r.path).name for r in report.collect([tmp_path, tmp_path / "good"])] == ["good"]


def _groups(tmp_path: Path, values: dict[str, dict[str, float]]) -> list:
    runs = []
    for name, metrics in values.items():
        run = report.read_run(job(tmp_path / name, config={"seed": 0, "model": {"lr": name}}, metrics=metrics))
        assert run is not None
        runs.append(run)
    return group_runs(runs)["runs"]


def test_the_best_experiment_follows_the_metrics_direction(tmp_path: Path) -> None:
    groups = _groups(tmp_path, {"a": {"val/loss": 0.2, "val/acc": 0.6}, "b": {"val/loss": 0.4, "val/acc": 0.9}})
    best, metric, maximize = report.choose(groups, "val/loss")
    assert (Path(best.runs[0].path).name, metric, maximize) == ("a", "val/loss", False)
    best, _, maximize = report.choose(groups, "val/acc")
    assert (Path(best.runs[0].path).name, maximize) == ("b", True)
    best, _, maximize = report.choose(groups, "val/acc", minimize=True)
    assert (Path(best.runs[0].path).name, maximize) == ("a", False)
    with pytest.raises(ConfigError) as err:
        report.choose(groups, "val/dice")
    assert str(err.value) == "--best: no finished run has metric 'val/dice'"
    with pytest.raises(ConfigError) as err:
        report.choose(groups, "test/acc")
    assert str(err.value) == "--best: test/acc selects on the test split; use a val/ metric"
