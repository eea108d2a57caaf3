"""The report on synthetic sweep directories: grouping, mean ± std, failed and missing seeds."""

from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path

import pytest
import yaml

from mtneuro_lab.analysis.tables import mean_std
from mtneuro_lab.report import build_report, main


def make_job(
    root: Path,
    name: str,
    *,
    task: str,
    model: str,
    seed: int,
    lr: float = 0.03,
    acc: float | None = None,
    error: str | None = None,
    sweep: dict | None = None,
    extra_overrides: tuple[str, ...] = (),
) -> Path:
    """A job directory as train.py writes it (config.yaml, .hydra/, metrics.json or failed.json)."""
    job = root / name
    (job / ".hydra").mkdir(parents=True)
    config = {
        "seed": seed,
        "task": {"name": task},
        "model": {"name": model, "optimizer": {"lr": lr}},
        "paths": {"output_dir": str(job)},
        "logger": {"csv": {"save_dir": str(job)}},
    }
    if sweep:
        config["sweep"] = sweep
    (job / "config.yaml").write_text(yaml.safe_dump(config))
    overrides = [f"task={task}", f"model={model}", f"seed={seed}", *extra_overrides]
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (job / ".hydra" / "hydra.yaml").write_text(
        yaml.safe_dump({"hydra": {"runtime": {"choices": {"task": task, "model": model, "trainer": "auto"}}}})
    )
    if acc is not None:
        (job / "metrics.json").write_text(
            json.dumps(
                {
                    "test/acc": acc,
                    "test/loss": 1 - acc,
                    "val/acc": acc + 0.01,
                    "selection/metric": "val/acc",
                    "selection/mode": "max",
                    "selection/value": acc + 0.01,
                    "best_epoch": 3,
                    "best_step": 40,
                }
            )
        )
    if error is not None:
        (job / "failed.json").write_text(json.dumps({"error": error, "type": "RuntimeError"}))
    return job


SEEDS = [1, 100, 350, 631, 872]
TABLE1 = {"name": "table1", "seeds": SEEDS, "report": {"rows": "model", "cols": "task", "metric": "test/acc"}}


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    root = tmp_path / "sweep"
    accs = {
        ("roi_c1", "supervised"): [0.8, 0.82, 0.84, 0.81, 0.83],
        ("roi_c1", "byol"): [0.7, 0.72, 0.71, 0.69, 0.73],
        ("roi_c2", "supervised"): [0.6, 0.62, 0.64, 0.61, 0.63],
    }
    for (task, model), values in accs.items():
        for seed, acc in zip(SEEDS, values):
            if (task, model, seed) == ("roi_c1", "byol", 350):
                make_job(
                    root,
                    f"{task}-{model}-{seed}",
                    task=task,
                    model=model,
                    seed=seed,
                    error="CUDA out of memory",
                    sweep=TABLE1,
                )
            elif (task, model, seed) == ("roi_c2", "supervised", 872):
                continue  # never ran
            else:
                make_job(root, f"{task}-{model}-{seed}", task=task, model=model, seed=seed, acc=acc, sweep=TABLE1)
    return root


def test_mean_std_is_the_sample_std() -> None:
    mean, std, n = mean_std([0.8, 0.82, 0.84])
    assert (mean, n) == (pytest.approx(0.82), 3) and std == pytest.approx(statistics.stdev([0.8, 0.82, 0.84]))
    assert math.isnan(mean_std([0.5])[1]) and mean_std([])[2] == 0


def test_report_groups_by_everything_but_the_seed(sweep: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    summary = build_report([sweep], out)
    assert summary["tables"] == {"table1": 3}
    rows = list(csv.DictReader((out / "report.csv").open()))
    acc = {(r["model"], r["task"]): r for r in rows if r["metric"] == "test/acc"}
    sup = acc[("supervised", "roi_c1")]
    assert float(sup["mean"]) == pytest.approx(0.82) and int(sup["n"]) == 5
    assert float(sup["std"]) == pytest.approx(statistics.stdev([0.8, 0.82, 0.84, 0.81, 0.83]), rel=1e-4)
    byol = acc[("byol", "roi_c1")]
    assert byol["n"] == "4" and byol["failed_seeds"] == "350" and byol["missing_seeds"] == ""
    c2 = acc[("supervised", "roi_c2")]
    assert c2["n"] == "4" and c2["missing_seeds"] == "872" and c2["failed_seeds"] == ""


def test_markdown_names_failures_and_missing_seeds_and_has_the_paper_layout(sweep: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    build_report([sweep], out)
    md = (out / "report.md").read_text()
    assert "seed 350 failed (CUDA out of memory)" in md
    assert "missing seeds 872" in md
    # pivot: models down, tasks across, mean ± std (n)
    assert "| model | roi_c1 | roi_c2 |" in md
    assert "0.820 ± 0.016 (n=5)" in md and "| byol | 0.710 ± 0.018 (n=4) | — |" in md
    png = out / "table1.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 2000


def test_seeds_are_inferred_when_the_sweep_does_not_list_them(tmp_path: Path) -> None:
    root = tmp_path / "m"
    for seed in (1, 2, 3):
        make_job(root, f"a{seed}", task="roi_c1", model="supervised", seed=seed, acc=0.5 + seed / 10)
    for seed in (1, 2):
        make_job(
            root,
            f"b{seed}",
            task="roi_c1",
            model="supervised",
            seed=seed,
            lr=0.1,
            acc=0.4,
            extra_overrides=("model.optimizer.lr=0.1",),
        )
    build_report([root], tmp_path / "out", plots=False)
    rows = list(csv.DictReader((tmp_path / "out" / "report.csv").open()))
    by_lr = {r["model.optimizer.lr"]: r for r in rows if r["metric"] == "test/acc"}
    assert by_lr["0.1"]["missing_seeds"] == "3" and by_lr[""]["missing_seeds"] == ""
    assert not list((tmp_path / "out").glob("*.png"))


def test_several_directories_make_one_table(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    make_job(a, "j1", task="roi_c1", model="supervised", seed=1, acc=0.5)
    make_job(b, "j2", task="roi_c1", model="supervised", seed=2, acc=0.7)
    build_report([a, b], tmp_path / "out")
    rows = [r for r in csv.DictReader((tmp_path / "out" / "report.csv").open()) if r["metric"] == "test/acc"]
    assert len(rows) == 1 and rows[0]["n"] == "2" and float(rows[0]["mean"]) == pytest.approx(0.6)


def test_best_setting_names_the_overrides(sweep: Path, capsys: pytest.CaptureFixture) -> None:
    assert main([str(sweep), "--best"]) == 0
    line, tests = capsys.readouterr().out.strip().splitlines()
    assert line.startswith("table1: best val/acc (max) = 0.830 ± 0.016 (n=5)")
    assert "model=supervised" in line and "task=roi_c1" in line
    assert tests.strip().startswith("test metrics of that setting: test/acc = 0.820 ± 0.016")


def test_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main([str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "not a directory" in err
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty")]) == 2
    assert "no run directories" in capsys.readouterr().err


def test_report_files_are_written_by_the_cli(sweep: Path, capsys: pytest.CaptureFixture) -> None:
    assert main([str(sweep)]) == 0
    assert {p.name for p in (sweep / "report").iterdir()} == {"report.md", "report.csv", "table1.png"}
    assert "15 runs" not in capsys.readouterr().out  # 14 job dirs: one seed never ran
