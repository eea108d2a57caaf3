"""DDP: trainer options compose into Trainers; 2 gloo processes train like one process with the
same global batch and score a checkpoint exactly as one process does; a ddp_cpu multirun (2 gloo
processes per job) runs each job once, with metrics.json from rank 0 only and a failed job
recorded."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, cli_args, cli_env, compose, read_metrics, run_cli, run_inproc
from hydra.utils import instantiate

sys.path.insert(0, str(ROOT))

from benchmarks.bench_ddp import EQUIVALENCE, PRECISIONS, initial_weights, update_gap, weights  # noqa: E402

#: a 2-process run still going after this is a hang (a collective waiting): it is killed and the test fails
HANG_TIMEOUT_S = 300
#: the equivalence runs: float64, 4 steps (the 4th is the partial global batch of 6 of 30 samples), the
#: ResNet-18 layout 16 channels wide (what is compared is the optimisation, not the width; 11 MB
#: float64 checkpoints instead of 180 MB)
EQUIVALENCE_RUN = (*EQUIVALENCE, PRECISIONS["float64"], "trainer.limit_train_batches=4", "model.width=16")
#: 2 processes vs 1 after 4 steps in float64, as a fraction of the update
#: (benchmarks/bench_ddp.py::update_gap). Measured in this setting (docs/gpu.md, bench:ddp):
#: ~3e-13 in float64 (float64 rounding: the float32 runs' gap is larger by the ratio of the machine
#: epsilons, then amplified by training) and 1.5 for the control without batch-norm
#: synchronisation. A real difference in the optimisation (gradient averaging, learning rate,
#: the samples of a rank, batch-norm statistics) changes the update at first order; 1e-8 is
#: four orders of magnitude above the rounding and far below any such change.
UPDATE_GAP_TOLERANCE = 1e-8


def run_real_processes(script: str, *overrides: str, run_dir: Path) -> None:
    """``script`` in a real process (Lightning re-runs it for rank 1); see :func:`run_or_fail`."""
    args = [sys.executable, str(ROOT / script), *cli_args(overrides, run_dir, fast=False)]
    run_or_fail(args, ROOT, f"{script} {' '.join(overrides)}")


def run_or_fail(args: list[str], cwd: Path, label: str) -> None:
    """``args`` run to success, or killed with every process it started and the test failed if
    it has not finished after :data:`HANG_TIMEOUT_S` (a hanging rank fails the test, not CI)."""
    proc = subprocess.Popen(
        args, cwd=cwd, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        _, err = proc.communicate(timeout=HANG_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"{label} still running after {HANG_TIMEOUT_S} s: a rank hangs")
    assert proc.returncode == 0, err[-3000:]


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


def test_two_processes_train_like_one_and_score_a_checkpoint_like_one(tmp_path: Path) -> None:
    """2 ranks x batch 4 vs 1 rank x batch 8, same seed, 4 steps, in float64 so that the
    comparison is not blurred by amplified float32 rounding (benchmarks/bench_ddp.py). Splits
    that do not divide: 30 training samples (last global batch 6, 3 per rank), 15 test samples
    at eval batch 4 (the last batch of 3 split 1 + 2). One 1-process reference (in this process),
    one 2-process run (real processes), the 2-process checkpoint scored by 1 process."""
    one, two, scored = tmp_path / "one", tmp_path / "two", tmp_path / "scored"
    proc = run_inproc("train.py", *EQUIVALENCE_RUN, run_dir=one, fast=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_real_processes("train.py", *EQUIVALENCE_RUN, "trainer=ddp_cpu", run_dir=two)
    assert (two / "train_ddp_process_1.log").is_file(), "rank 1 ran (and, like rank 0, finished)"

    # the same optimisation: weights and the loss after 4 steps
    assert update_gap(initial_weights(list(EQUIVALENCE_RUN)), weights(one), weights(two)) < UPDATE_GAP_TOLERANCE
    expected, got = read_metrics(one), read_metrics(two)
    # logged as float32: float64 losses equal to 1e-12 are at most one float32 step apart
    assert got["val/loss"] == pytest.approx(expected["val/loss"], rel=1e-6, abs=0)

    # the 2-process test scores (every sample once, none padded) are the 1-process scores exactly
    best = two / "checkpoints" / "epoch000.ckpt"
    # trainer=cpu: evaluate.py would take trainer=ddp_cpu from the run's saved config
    proc = run_inproc("evaluate.py", "trainer=cpu", *EQUIVALENCE_RUN, f"ckpt_path={best}", run_dir=scored, fast=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = read_metrics(scored)
    test_keys = sorted(k for k in got if k.startswith("test/"))
    assert len(test_keys) > 2 and {k: single[k] for k in test_keys} == {k: got[k] for k in test_keys}


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


@pytest.mark.slow  # ~40 s: two real processes under torchrun
def test_torchrun_launch_as_documented_writes_one_run_directory(tmp_path: Path) -> None:
    """docs/gpu.md's CPU recipe, ``torchrun --standalone --nproc_per_node=2 train.py
    trainer=ddp_cpu``: both ranks agree on one ``torchrun_<id>`` run directory, rank 0 writes
    the config and metrics, rank 1 only its own log."""
    torchrun = Path(sys.executable).parent / "torchrun"
    args = [str(torchrun), "--standalone", "--nproc_per_node=2", str(ROOT / "train.py"), "trainer=ddp_cpu"]
    args += ["+debug=fast", f"paths.output_root={tmp_path / 'out'}"]
    run_or_fail(args, tmp_path, "torchrun")
    runs = list((tmp_path / "out").glob("*/*/*"))
    assert len(runs) == 1 and runs[0].name.startswith("torchrun_"), runs
    names = {p.name for p in runs[0].iterdir()}
    assert {".hydra", "config.yaml", "metrics.json", "cli.log", "train_rank_1.log"} <= names, names
    assert {"test/acc", "test/loss", "val/acc", "best_epoch"} <= set(read_metrics(runs[0]))
