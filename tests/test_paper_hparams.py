"""Task 2 defaults are the paper's Table A4 (mtneuro_lab/conf/paper_hparams/), overridable, and documented."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from conftest import ROOT, compose, run_inproc

from mtneuro_lab.config.schema import validate_config
from mtneuro_lab.errors import ConfigError

if str(ROOT) not in sys.path:  # benchmarks/ is a package at the project root
    sys.path.insert(0, str(ROOT))

from benchmarks.bench_seg import Run, paper_hparams_table, result_row  # noqa: E402

#: MTNeuro appendix 4.2.4, Table A4, typed from the paper: model -> ((lr, batch) 3 classes, (lr, batch) 4 classes)
TABLE_A4 = {
    "unet2d": ((0.1, 8), (0.01, 4)),
    "manet": ((0.01, 2), (0.001, 8)),
    "fpn": ((0.01, 2), (0.01, 4)),
    "unetpp": ((0.001, 8), (0.01, 8)),
    "pan": ((0.01, 10), (0.001, 8)),
    "pspnet": ((0.01, 4), (0.1, 2)),
    "unet3d": ((0.005, 1), (0.01, 1)),
    "vnet_light": ((0.01, 1), (0.01, 1)),
    "highresnet": ((0.005, 1), (0.001, 1)),
}
DIMS = {m: 3 if m in ("unet3d", "vnet_light", "highresnet") else 2 for m in TABLE_A4}
CASES = [
    (f"seg{DIMS[m]}d_{c}class", m, lr, batch)
    for m, settings in TABLE_A4.items()
    for c, (lr, batch) in zip((3, 4), settings)
]


@pytest.mark.parametrize("task, model, lr, batch", CASES)
def test_table_a4_is_the_default(task: str, model: str, lr: float, batch: int) -> None:
    cfg = compose([f"task={task}", f"model={model}"])
    assert cfg.model.optimizer.lr == pytest.approx(lr, rel=1e-12)
    assert cfg.data.batch_size == batch
    assert cfg.model.optimizer.name == "adam"
    assert cfg.trainer.max_epochs == 20
    assert cfg.hparams_from.startswith("MTNeuro Table A4")
    assert f"{task[-6]} classes" in cfg.hparams_from
    validate_config(cfg)


def test_every_paper_hparams_file_belongs_to_one_table_a4_entry() -> None:
    files = {p.stem for p in (ROOT / "mtneuro_lab" / "conf" / "paper_hparams").glob("*.yaml")}
    assert files == {f"{task}_{model}" for task, model, _, _ in CASES}


def test_command_line_and_experiment_overrides_win(tmp_path: Path) -> None:
    cfg = compose(
        ["task=seg2d_3class", "model=unet2d", "data.batch_size=16", "model.optimizer.lr=0.3", "trainer.max_epochs=2"]
    )
    assert (cfg.data.batch_size, cfg.model.optimizer.lr, cfg.trainer.max_epochs) == (16, 0.3, 2)
    # a user's CPU-sized experiment (experiment=quickstart pins ROI-C1 and its model)
    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "cpu_sized.yaml").write_text(
        "# @package _global_\ntrainer:\n  max_epochs: 6\ndata:\n  batch_size: 32\n"
    )
    search = f"hydra.searchpath=[file://{tmp_path}]"
    cfg = compose(["task=seg3d_4class", "model=highresnet", "experiment=cpu_sized", search])
    assert (cfg.data.batch_size, cfg.trainer.max_epochs) == (32, 6)
    assert cfg.model.optimizer.lr == pytest.approx(0.001)  # not touched by the experiment


@pytest.mark.parametrize("task, model, lr", [("roi_c1", "supervised", 0.03), ("isbi2012", "unet2d", 0.001)])
def test_other_tasks_compose_as_before(task: str, model: str, lr: float) -> None:
    cfg = compose([f"task={task}", f"model={model}"])
    assert cfg.data.batch_size == 256
    assert cfg.trainer.max_epochs == 100
    assert cfg.model.optimizer.lr == pytest.approx(lr)
    assert "hparams_from" not in cfg


def test_seg_grid_sweep_still_sweeps_lr_and_batch_size() -> None:
    cfg = compose(["+sweep=seg_grid", "task=seg2d_4class", "model=unet2d"], return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    assert params["model.optimizer.lr"] == "0.1,0.05,0.01,0.005,0.001"
    assert params["data.batch_size"] == "2,4,6,8,10"
    # a grid job's values are command-line overrides, so they beat Table A4 (lr 0.01, batch 4)
    job = compose(
        ["+sweep=seg_grid", "task=seg2d_4class", "model=unet2d", "model.optimizer.lr=0.05", "data.batch_size=6"]
    )
    assert (job.model.optimizer.lr, job.data.batch_size, job.trainer.max_epochs) == (0.05, 6, 20)


def test_hparams_from_must_be_a_string() -> None:
    cfg = compose(["task=seg2d_3class", "model=unet2d", "hparams_from=3"])
    with pytest.raises(ConfigError, match=r"^hparams_from: expected a string.*got 3$"):
        validate_config(cfg)


def test_cfg_job_shows_where_the_defaults_came_from() -> None:
    proc = run_inproc("train.py", "task=seg2d_4class", "model=pspnet", "--cfg", "job", fast=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "hparams_from: 'MTNeuro Table A4, 2D PSPNet, 4 classes" in proc.stdout
    assert "batch_size: 2\n" in proc.stdout


def test_docs_task2_holds_the_table_rendered_from_the_configs() -> None:
    table = paper_hparams_table()
    assert "| `pan` (2D) | 0.01, 10 | 0.001, 8 | adam, 20 |" in table.splitlines()
    doc = (ROOT / "docs" / "task2.md").read_text()
    assert f"<!-- bench:task2_hparams -->\n{table}\n\n_written by" in doc, (
        "docs/task2.md is stale: run python benchmarks/bench_seg.py --hparams-only"
    )


def test_bench_row_reads_the_selection_keys_when_present() -> None:
    run = Run("seg2d_3class", "unet2d", 10, 2, ("model.encoder_name=resnet18",))
    base = {
        "test/iou_mean": 0.5,
        "test/iou_bg_axon": 0.9,
        "test/iou_vessel": 0.2,
        "test/iou_cell": 0.4,
        "wall_s": 120.0,
    }
    new = [
        {**base, "selection/metric": "val/iou_mean", "selection/value": 0.61, "best_epoch": 7},
        {**base, "test/iou_mean": 0.7, "selection/metric": "val/iou_mean", "selection/value": 0.65, "best_epoch": 9},
    ]
    row = result_row(run, [1, 2], new, [])
    assert "| val/iou_mean 0.630 ± 0.028 | 7, 9 | **0.600 ± 0.141** |" in row
    assert "10 epochs, 128x128, model.encoder_name=resnet18" in row
    assert "vessel 0.200 ± 0.000, cell 0.400 ± 0.000 | 2.0 ± 0.0 min |" in row
    old = result_row(run, [1], [base], [])  # metrics.json written before selection/* existed
    assert "| - - | - | **0.500** |" in old
