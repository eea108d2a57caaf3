"""DDP: trainer options compose into Trainers; a ddp_cpu multirun (2 gloo processes per job)
runs each job once, with metrics.json from rank 0 only and a failed job recorded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import compose, run_cli
from hydra.utils import instantiate


@pytest.mark.parametrize("trainer", ["auto", "cpu", "ddp_cpu"])
def test_cpu_trainers_instantiate(trainer: str) -> None:
    cfg = compose([f"trainer={trainer}"])
    t = instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
    assert t.world_size == (2 if trainer == "ddp_cpu" else 1)
    if trainer == "ddp_cpu":
        assert type(t.strategy).__name__ == "DDPStrategy" and t.strategy._get_process_group_backend() == "gloo"


def test_gpu_trainers_ask_for_bf16_and_sync_bn() -> None:
    gpu, ddp = compose(["trainer=gpu"]).trainer, compose(["trainer=ddp", "trainer.num_nodes=2"]).trainer
    assert gpu.precision == "bf16-mixed" and gpu.accelerator == "gpu"
    assert ddp.strategy == "ddp" and ddp.sync_batchnorm is True and ddp.num_nodes == 2
    assert ddp.use_distributed_sampler is False  # our loaders shard the global batch themselves


@pytest.mark.slow
def test_ddp_cpu_inside_a_multirun(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    proc = run_cli(
        "train.py", "trainer=ddp_cpu", "seed=1,2,3", "+extras.fail_on_seed=2", run_dir=sweep, multirun=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = {yaml.safe_load(p.read_text())["seed"]: p.parent for p in sweep.glob("*/config.yaml")}
    assert sorted(jobs) == [1, 2, 3], "each job ran once: no nested sweep in the DDP worker"
    assert len(list(sweep.glob("*/.hydra"))) == 3
    for seed in (1, 3):
        assert json.loads((jobs[seed] / "metrics.json").read_text())["test/acc"] >= 0
        assert (jobs[seed] / "train_ddp_process_1.log").is_file()  # rank 1 joined this job
    assert "fail_on_seed" in json.loads((jobs[2] / "failed.json").read_text())["error"]
    from mtneuro_lab.report import main as report_main

    assert report_main([str(sweep)]) == 0
    assert "seed 2 failed" in (sweep / "report" / "report.md").read_text()
