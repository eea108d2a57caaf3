"""DDP: trainer options compose into Trainers; 2 gloo processes train like one process with the
same global batch and score the same checkpoint identically; a ddp_cpu multirun (2 gloo
processes per job) runs each job once, with metrics.json from rank 0 only and a failed job
recorded."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, compose, read_metrics, run_cli
from hydra.utils import instantiate

sys.path.insert(0, str(ROOT))

from benchmarks.bench_ddp import EQUIVALENCE, initial_weights, update_gap, weights  # noqa: E402

#: a 2-process run still going after this is a hang (a collective waiting): the test fails
HANG_TIMEOUT_S = 600
#: 2 processes vs 1 after 4 steps, as a fraction of the update (benchmarks/bench_ddp.py::update_gap).
#: Measured (docs/gpu.md, bench:ddp): 0.048 with batch norm synchronised, 1.49 without (the
#: control). 0.2 separates the two by a wide margin either way; the 0.048 residual is more
#: than float32 rounding of one step and is not explained yet (see docs/gpu.md).
UPDATE_GAP_TOLERANCE = 0.2


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


def test_two_processes_train_like_one_and_score_its_checkpoint_identically(tmp_path: Path) -> None:
    """2 ranks x batch 4 vs 1 rank x batch 8, same seed, one epoch = 4 steps. Pinned setting
    (benchmarks/bench_ddp.py::EQUIVALENCE): 64x64 tiles, lr 0.003, no augmentation/dropout,
    so that float32 summation order stays at rounding size (at lr 0.03, or with the tiny maps
    of 16x16 tiles, the first steps amplify it). The splits do not divide evenly: 30 training
    samples (last global batch 6), 9 val and 15 test samples at eval batch 4 over 2 ranks."""
    base = [*EQUIVALENCE, "trainer.limit_train_batches=4"]
    one, two, scored = tmp_path / "one", tmp_path / "two", tmp_path / "scored"
    for run_dir, extra in ((one, []), (two, ["trainer=ddp_cpu"])):
        proc = run_cli("train.py", *base, *extra, run_dir=run_dir, fast=False, timeout=HANG_TIMEOUT_S)
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert (two / "train_ddp_process_1.log").is_file()  # rank 1 really ran
    assert update_gap(initial_weights(base), weights(one), weights(two)) < UPDATE_GAP_TOLERANCE
    best = one / "checkpoints" / "epoch000.ckpt"
    proc = run_cli(
        "evaluate.py", *base, "trainer=ddp_cpu", f"ckpt_path={best}", run_dir=scored, fast=False, timeout=HANG_TIMEOUT_S
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected, got = read_metrics(one), read_metrics(scored)
    test_keys = sorted(k for k in expected if k.startswith("test/"))
    assert test_keys and {k: got[k] for k in test_keys} == {k: expected[k] for k in test_keys}


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
        assert "test/acc" in json.loads((jobs[seed] / "metrics.json").read_text())
        assert (jobs[seed] / "train_ddp_process_1.log").is_file()  # rank 1 joined this job
    assert "fail_on_seed" in json.loads((jobs[2] / "failed.json").read_text())["error"]
    from mtneuro_lab.report import main as report_main

    assert report_main([str(sweep)]) == 0
    assert "seed 2 failed" in (sweep / "report" / "report.md").read_text()
