"""Exact resume: a run killed with SIGKILL mid-epoch and resumed ends like an uninterrupted one.

The killed run is a process of its own, forked from the test process (SIGKILL ends it wherever it
is); the uninterrupted reference and the resume run in-process, and the resume must reproduce the
reference's metrics exactly. The preemption tests (slow) start real ``train.py`` processes."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import ROOT, cli_args, cli_env, read_metrics, run_cli, run_inproc
from test_wandb import _offline_run
from threadpoolctl import threadpool_limits

from mtneuro_lab.cluster.preemption import REQUEUE_FILE

#: on top of +debug=fast: two epochs of 4 batches, last.ckpt every 3 steps (mid-epoch: steps 3 and 6)
RESUME_ARGS = (
    "trainer.max_epochs=2",
    "trainer.limit_train_batches=4",
    "trainer.limit_val_batches=2",
    "trainer.limit_test_batches=2",
    "trainer.deterministic=true",
    "callbacks.last_checkpoint.every_n_train_steps=3",
)

CASES = {
    "supervised": ("task=roi_c1", "model=supervised", "model.mixup_prob=0.5"),
    # EMA target network + online probe + in-fit linear evaluation epoch
    "byol": (
        "task=roi_c1",
        "model=byol",
        "model.linear_eval.epochs=1",
        "trainer.limit_train_batches=4",
        "callbacks.last_checkpoint.every_n_train_steps=2",
    ),
    "unet2d": ("task=seg2d_3class", "model=unet2d", "model.encoder_name=resnet18"),
}
SLOW = {"byol", "unet2d"}


class _ForkedRun:
    """``train.py``'s flow in a child forked from this test process (torch, Lightning and the
    project already imported: no start-up of its own), with the ``Popen`` calls used here."""

    def __init__(self, args: list[str], run_dir: Path, fast: bool | str) -> None:
        self.proc = multiprocessing.get_context("fork").Process(target=self._main, args=(args, run_dir, fast))
        self.proc.start()

    @staticmethod
    def _main(args: list[str], run_dir: Path, fast: bool | str) -> None:
        # an OpenMP pool the parent used does not survive fork (GNU libgomp hangs): one thread
        torch.set_num_threads(1)
        with threadpool_limits(1):
            os._exit(run_inproc("train.py", *args, run_dir=run_dir, fast=fast).returncode)

    def poll(self) -> int | None:
        return self.proc.exitcode

    def send_signal(self, sig: int) -> None:
        os.kill(self.proc.pid, sig)

    def wait(self, timeout: float) -> int | None:
        self.proc.join(timeout)
        return self.proc.exitcode

    def kill(self) -> None:
        self.proc.kill()
        self.proc.join()


def _kill_after_checkpoints(
    args: list[str],
    run_dir: Path,
    writes: int,
    timeout: float = 600,
    sig: int = signal.SIGKILL,
    fast: bool | str = True,
    fork: bool = False,
) -> int | None:
    """Start a run, send ``sig`` right after ``last`` has been (re)written ``writes`` times.

    ``fork``: the run is a child forked from this process (:class:`_ForkedRun`), else a real
    ``train.py`` process (what a DDP run needs: Lightning re-runs the script for rank 1)."""
    proc: _ForkedRun | subprocess.Popen = (
        _ForkedRun(args, run_dir, fast)
        if fork
        else subprocess.Popen(
            [sys.executable, str(ROOT / "train.py"), *cli_args(args, run_dir, fast)],
            cwd=ROOT,
            env=cli_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    )
    last = run_dir / "checkpoints" / "last.ckpt"
    seen, mtime, deadline = 0, None, time.monotonic() + timeout
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if last.is_file():
                current = last.stat().st_mtime_ns
                if current != mtime:
                    seen, mtime = seen + 1, current
                    if seen >= writes:
                        proc.send_signal(sig)
                        break
            time.sleep(0.01)
        return proc.wait(timeout=60 if sig == signal.SIGKILL else timeout)
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in sorted(CASES)])
def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(name: str, tmp_path: Path) -> None:
    args = (*RESUME_ARGS, *CASES[name])
    reference = tmp_path / "reference"  # in-process: only the killed run needs a process of its own
    proc = run_inproc("train.py", *args, run_dir=reference)
    assert proc.returncode == 0, proc.stderr[-3000:]

    crashed = tmp_path / "crashed"
    last = crashed / "checkpoints" / "last.ckpt"
    code = _kill_after_checkpoints(list(args), crashed, writes=1, fork=True)
    assert code == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (crashed / "metrics.json").exists()
    state = torch.load(last, map_location="cpu", weights_only=True)
    assert 0 < state["global_step"] < 8, "expected a mid-epoch checkpoint"
    assert not list((crashed / "checkpoints").glob(".tmp-*")), "half-written checkpoint left"

    proc = run_inproc("train.py", *args, "ckpt_path=last", run_dir=crashed)
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected, resumed = read_metrics(reference), read_metrics(crashed)
    assert resumed.keys() == expected.keys()
    for key, value in expected.items():
        assert resumed[key] == pytest.approx(value, abs=1e-6), key


@pytest.mark.slow
def test_two_processes_preempted_by_sigusr2_requeue_and_end_like_an_uninterrupted_run(tmp_path: Path) -> None:
    """The SLURM pre-timeout signal, rehearsed on CPU: it reaches rank 0 only; both ranks stop
    after the same batch, last.ckpt and requeue.json are written, and running the same command
    again (what the requeued job does: same run directory, no ckpt_path) ends where an
    uninterrupted 2-process run ends."""
    args = (*RESUME_ARGS, *CASES["supervised"], "trainer=ddp_cpu", "callbacks.last_checkpoint.every_n_train_steps=2")
    reference = tmp_path / "reference"
    proc = run_cli("train.py", *args, run_dir=reference, fast=False, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]

    preempted = tmp_path / "preempted"
    last = preempted / "checkpoints" / "last.ckpt"
    code = _kill_after_checkpoints(list(args), preempted, writes=1, sig=signal.SIGUSR2, fast=False)
    assert code == 0, "a preempted run ends cleanly after saving"
    assert not (preempted / "metrics.json").exists()
    record = json.loads((preempted / "requeue.json").read_text())
    assert record["signal"] == "SIGUSR2" and record["requeues"] == 1
    state = torch.load(last, map_location="cpu", weights_only=True)
    assert state["global_step"] == record["global_step"] < 8, "stopped mid-run, checkpoint of that very step"

    proc = run_cli("train.py", *args, run_dir=preempted, fast=False, timeout=900)  # the requeued job
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "requeued after preemption" in (preempted / "cli.log").read_text()
    assert not (preempted / "requeue.json").exists()
    expected, resumed = read_metrics(reference), read_metrics(preempted)
    assert resumed.keys() == expected.keys()
    for key, value in expected.items():
        assert resumed[key] == pytest.approx(value, abs=1e-6), key


def _job_process(controller: int, timeout: float = 60) -> int:
    """The task process a submitit LocalExecutor controller started (its only child)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue  # the process ended while we looked
            if parent == controller:
                return int(stat.parent.name)
        time.sleep(0.05)
    raise AssertionError(f"submitit controller {controller} started no task process")


def _wait_for(path_glob: Callable[[], list[Path]], proc: subprocess.Popen, timeout: float) -> Path:
    """The first path ``path_glob`` finds while ``proc`` runs (fails the test on a deadline)."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        found = path_glob()
        if found:
            return found[0]
        time.sleep(0.01)
    raise AssertionError(f"not written before the run ended or {timeout} s passed (exit {proc.poll()})")


@pytest.mark.slow
def test_submitit_requeues_a_preempted_job_which_resumes_in_its_directory(tmp_path: Path) -> None:
    """submitit's real requeue path on this machine (Hydra's ``submitit_local`` launcher).

    The job's task process gets SIGUSR2 (submitit's preemption signal, what SLURM sends) after
    its first ``last.ckpt``: our callback stops after the next batch and writes ``last.ckpt`` and
    ``requeue.json``, then submitit's own handler (installed before ours) pickles the Hydra
    launcher's ``checkpoint()`` resubmission and exits with LOCAL_REQUEUE_RETURN_CODE; the
    controller starts the task again, which runs in the same job directory, resumes from
    ``last.ckpt`` (and the same W&B run, offline) and ends with the metrics of an uninterrupted run.
    """
    args = (*RESUME_ARGS, *CASES["supervised"], "logger=wandb")
    reference = tmp_path / "reference"
    proc = run_inproc("train.py", *args, run_dir=reference)
    assert proc.returncode == 0, proc.stderr[-3000:]

    outputs = tmp_path / "outputs"  # the default sweep dir: multiruns/${now:...}, resolved by the launcher
    command = [sys.executable, str(ROOT / "train.py"), *cli_args(args, multirun=True)]
    command.insert(3, "hydra/launcher=submitit_local")  # after "-m"
    wandb = {f"WANDB_{key}": str(tmp_path / f"wandb_{key.lower()}") for key in ("DIR", "CONFIG_DIR", "CACHE_DIR")}
    launcher = subprocess.Popen(
        command,
        cwd=ROOT,
        env=cli_env({"MTNEURO_OUTPUTS": str(outputs), "WANDB_MODE": "offline", **wandb}),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        last = _wait_for(lambda: list(outputs.glob("multiruns/*/*/checkpoints/last.ckpt")), launcher, timeout=600)
        job_dir, sweep = last.parents[1], last.parents[2]
        controller = int(next(d.name for d in (sweep / ".submitit").iterdir() if d.name.isdigit()))
        first_task = _job_process(controller)
        os.kill(first_task, signal.SIGUSR2)
        record_path = _wait_for(lambda: sorted(job_dir.glob(REQUEUE_FILE)), launcher, timeout=300)
        record = json.loads(record_path.read_text())  # written atomically; kept until the job ends
        _, stderr = launcher.communicate(timeout=900)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 0, stderr[-3000:]

    # submitit's handler requeued the job and its controller started the task again
    task_log = (sweep / ".submitit" / str(controller) / f"{controller}_0_log.out").read_text()
    submitit_log = "\n".join(line for line in task_log.splitlines() if line.startswith("submitit "))  # its own format
    assert submitit_log.count("Caught signal SIGUSR2 on") == 1, task_log[-3000:]
    assert "this job is preempted" in submitit_log
    assert submitit_log.count(f"Requeued job {controller}") == 1
    assert submitit_log.count("Starting with JobEnvironment") == 2, "the controller restarted the task once"
    assert submitit_log.count("Job completed successfully") == 1

    # our callback stopped mid-run and wrote the checkpoint of that step; the requeued task ran
    # in the same job directory and resumed from it
    assert record["signal"] == "SIGUSR2" and record["requeues"] == 1
    assert 3 <= record["global_step"] < 8, "stopped mid-run, after the first last.ckpt"
    assert list((outputs / "multiruns").iterdir()) == [sweep], "the requeued job resolved the same sweep dir"
    assert [p for p in sweep.iterdir() if not p.name.startswith(".") and p.is_dir()] == [job_dir]
    run_log = (job_dir / "cli.log").read_text()
    assert f"preempted by SIGUSR2 after step {record['global_step']}" in run_log
    assert f"requeued after preemption: resuming from {last}" in run_log
    assert "Restored all states from the checkpoint" in run_log
    assert not (job_dir / REQUEUE_FILE).exists(), "the finished run removes requeue.json"
    assert not list((job_dir / "checkpoints").glob(".tmp-*")), "half-written checkpoint left"

    expected, resumed = read_metrics(reference), read_metrics(job_dir)
    assert resumed.keys() == expected.keys()
    for key, value in expected.items():
        assert resumed[key] == pytest.approx(value, abs=1e-6), key
    tracked = _offline_run(job_dir)  # both tasks logged to one W&B run (its id is kept in the job dir)
    assert len(tracked["ids"]) == 2 and len(set(tracked["ids"])) == 1, tracked["ids"]
    assert tracked["summary"]["test/acc"] == pytest.approx(resumed["test/acc"])


@pytest.mark.slow
def test_a_signal_during_the_final_validation_is_not_lost(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """After the last batch only the final validation, the selection and the test remain, which
    may not end before the job is killed: the fit's end checkpoints and hands over too, and the
    requeued run (the same command, no ``ckpt_path``) only selects and tests."""
    from mtneuro_lab.cluster.preemption import PreemptionCheckpoint

    reference = tmp_path / "reference"
    proc = run_inproc("train.py", "callbacks.progress_log.when=never", run_dir=reference)
    assert proc.returncode == 0, proc.stderr[-3000:]

    def signal_in_last_validation(self: PreemptionCheckpoint, trainer: Any, pl_module: Any) -> None:
        if not trainer.sanity_checking and trainer.current_epoch == trainer.max_epochs - 1:
            signal.raise_signal(signal.SIGUSR2)

    preempted = tmp_path / "preempted"
    with monkeypatch.context() as patched:
        patched.setattr(PreemptionCheckpoint, "on_validation_end", signal_in_last_validation)
        proc = run_inproc("train.py", "callbacks.progress_log.when=never", run_dir=preempted)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((preempted / REQUEUE_FILE).read_text())
    state = torch.load(preempted / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert record["global_step"] == state["global_step"] == 2, "the checkpoint of the finished fit"
    assert not (preempted / "metrics.json").exists()

    proc = run_inproc("train.py", "callbacks.progress_log.when=never", run_dir=preempted)  # the requeued job
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (preempted / REQUEUE_FILE).exists()
    expected, resumed = read_metrics(reference), read_metrics(preempted)
    assert resumed.keys() == expected.keys()
    for key, value in expected.items():
        assert resumed[key] == pytest.approx(value, abs=1e-6), key
