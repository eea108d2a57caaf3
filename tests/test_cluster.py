"""Cluster launches: the sbatch script submitit would submit (rendered, never submitted), the
launch checks that fail before any process group forms, and run directories shared by ranks."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import compose, run_inproc
from hydra.utils import instantiate

from mtneuro_lab.cluster import env
from mtneuro_lab.errors import ConfigError

SLURM_2x4 = (
    "hydra/launcher=slurm",
    "trainer=ddp",
    "trainer.num_nodes=2",
    "hydra.launcher.nodes=2",
    "hydra.launcher.gpus_per_node=4",
)


class Rendered(Exception):
    """Raised instead of calling sbatch; carries the script."""


def test_two_node_sbatch_script_is_rendered_as_submitted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from submitit.slurm.slurm import SlurmExecutor

    def render(self: SlurmExecutor, command: str) -> None:
        raise Rendered(self._make_submission_file_text(command, "uid"))

    monkeypatch.setattr(SlurmExecutor, "_submit_command", render)
    monkeypatch.setattr(SlurmExecutor, "affinity", classmethod(lambda cls: 1))  # no srun on this machine
    cfg = compose([*SLURM_2x4, f"hydra.sweep.dir={tmp_path}"], return_hydra_config=True)
    env.check_launch(cfg, env.hydra_launcher())  # the configuration is consistent
    launcher = instantiate(cfg.hydra.launcher)
    launcher.config, launcher.task_function, launcher.hydra_context = cfg, None, None
    with pytest.raises(Rendered) as got:
        launcher.launch([["seed=1"]], initial_job_idx=0)
    lines = set(str(got.value).splitlines())
    for directive in (
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=4",
        "#SBATCH --gpus-per-node=4",
        "#SBATCH --time=240",
        "#SBATCH --signal=USR2@120",  # checkpoint-and-requeue warning, 2 minutes before the limit
        "#SBATCH --requeue",
    ):
        assert directive in lines, directive
    assert cfg.hydra.launcher.max_num_timeout == 3


@pytest.mark.parametrize(
    ("overrides", "environ", "launcher", "key"),
    [
        (["trainer=ddp_cpu", "data.batch_size=7"], {}, None, "data.batch_size: global batch 7"),
        (["trainer=ddp_cpu", "data.eval_batch_size=9"], {}, None, "data.eval_batch_size: global batch 9"),
        (["trainer=ddp", "trainer.devices=2"], {}, None, "trainer.accelerator: gpu"),
        (
            ["trainer=ddp", "trainer.num_nodes=2"],
            {},
            {"_target_": "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher", "nodes": 1},
            "trainer.num_nodes: 2 but hydra.launcher.nodes: 1",
        ),
        (
            ["trainer=ddp_cpu"],
            {},
            {"_target_": "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher", "nodes": 1},
            "trainer.devices: 2 DDP processes per job, but hydra/launcher=submitit_local",
        ),
        (
            ["trainer=ddp_cpu"],
            {"TORCHELASTIC_RUN_ID": "x", "WORLD_SIZE": "3", "RANK": "0"},
            None,
            "trainer.devices: torchrun started 3 processes",
        ),
    ],
)
def test_launch_checks_name_the_keys(
    overrides: list[str], environ: dict[str, str], launcher: dict | None, key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(env, "_gpu_count", lambda: 0)
    with pytest.raises(ConfigError) as err:
        env.check_launch(compose(overrides), launcher)
    assert key in str(err.value) and "\n" not in str(err.value)


def test_launch_checks_accept_what_works(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(env, "_gpu_count", lambda: 0)
    env.check_launch(compose(["trainer=ddp_cpu", "data.batch_size=8"]))
    local = {"_target_": "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher", "nodes": 1}
    env.check_launch(compose(["trainer=cpu"]), local)  # one process per submitit task
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "abc")
    monkeypatch.setenv("WORLD_SIZE", "2")
    env.check_launch(compose(["trainer=ddp_cpu", "data.batch_size=8"]))
    assert env.run_stamp() == "torchrun_abc"  # every rank of the launch: one run directory


def test_ranks_above_zero_write_no_hydra_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "abc")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert env.rank_overrides("train", []) == ["hydra.output_subdir=null", "hydra.job.name=train_rank_1"]
    monkeypatch.setenv("RANK", "0")
    assert env.rank_overrides("train", []) == []


def test_cli_refuses_mismatched_nodes_before_any_work(tmp_path: Path) -> None:
    run_dir = tmp_path / "sweep"
    proc = run_inproc("train.py", *SLURM_2x4[:3], "hydra.launcher.nodes=1", run_dir=run_dir, multirun=True)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: trainer.num_nodes: 2 but hydra.launcher.nodes: 1"), last
    assert not run_dir.exists()


def test_requeue_hands_over_to_submitit_or_scontrol(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import signal

    from mtneuro_lab.cluster import preemption

    calls: list[int] = []
    preemption.requeue(preemption.Preempted(signal.SIGUSR2, 5, 0, lambda signum, frame: calls.append(signum)))
    assert calls == [signal.SIGUSR2]  # the handler installed before ours: submitit's
    preemption.requeue(preemption.Preempted(signal.SIGUSR2, 5, 1, lambda signum, frame: calls.append(signum)))
    assert calls == [signal.SIGUSR2], "only rank 0 requeues"

    fake = tmp_path / "scontrol"  # a plain sbatch job: scontrol requeue <array job>_<task>
    fake.write_text(f'#!/bin/sh\necho "$@" > {tmp_path / "args"}\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "70")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    preemption.requeue(preemption.Preempted(signal.SIGUSR2, 5, 0, signal.SIG_DFL))
    assert (tmp_path / "args").read_text().split() == ["requeue", "70_3"]


def test_our_handler_chains_to_submitits_real_handler(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """submitit's own SignalHandler (as its job runner installs it) under our callback: a
    preemption resubmits the Hydra launcher's ``checkpoint()`` and exits with the local requeue
    code; timeouts beyond ``max_num_timeout`` end the job with submitit's error instead."""
    import signal

    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import LocalLauncher
    from submitit.core import utils
    from submitit.core.job_environment import JobEnvironment
    from submitit.local.local import LOCAL_REQUEUE_RETURN_CODE

    from mtneuro_lab.cluster import preemption

    for name, value in {
        "SUBMITIT_EXECUTOR": "local",
        "SUBMITIT_LOCAL_JOB_ID": "77",
        "SUBMITIT_LOCAL_GLOBALID": "0",
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("SUBMITIT_FOLDER", str(tmp_path))
    paths = utils.JobPaths(tmp_path, job_id="77", task_id=0)
    job_args = (["seed=2"], "hydra.sweep.dir", 0, "job_id_for_0", {})
    signals = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGCONT)
    saved = {s: signal.getsignal(s) for s in signals}

    def preempt(timeout_min: float, max_num_timeout: int) -> preemption.Preempted:
        delayed = utils.DelayedSubmission(LocalLauncher(submitit_folder=str(tmp_path)), *job_args)
        delayed.set_timeout(timeout_min, max_num_timeout)  # type: ignore[arg-type]
        JobEnvironment()._handle_signals(paths, delayed)  # what submitit's job runner does first
        callback = preemption.PreemptionCheckpoint(tmp_path)
        with callback.watching():
            signal.raise_signal(signal.SIGUSR2)  # only flags: the batch ends, then we checkpoint
            assert callback.received == signal.SIGUSR2 and not paths.submitted_pickle.exists()
        assert signal.getsignal(signal.SIGUSR2) == callback._previous[signal.SIGUSR2], "submitit's handler restored"
        return preemption.Preempted(signal.SIGUSR2, 5, 0, callback._previous[signal.SIGUSR2])

    try:
        with pytest.raises(SystemExit) as exited:  # preempted well before the time limit
            preemption.requeue(preempt(timeout_min=60, max_num_timeout=3))
        assert exited.value.code == LOCAL_REQUEUE_RETURN_CODE
        resubmitted = utils.DelayedSubmission.load(paths.submitted_pickle)
        assert isinstance(resubmitted.function, LocalLauncher) and resubmitted.args == job_args
        assert resubmitted._timeout_countdown == 3, "a preemption uses up no timeout"

        paths.submitted_pickle.unlink()
        with pytest.raises(utils.UncompletedJobError, match="timed-out too many times"):  # past the limit
            preemption.requeue(preempt(timeout_min=0.001, max_num_timeout=0))
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def test_a_job_requeued_by_slurm_itself_resumes_from_last_ckpt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Node failure or a preemption without the warning signal: no requeue.json, but SLURM counts
    the restart, and the run resumes from its periodic last.ckpt rather than from scratch."""
    from mtneuro_lab.cluster import preemption

    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    assert preemption.requeued_checkpoint(tmp_path) is None
    last = tmp_path / "checkpoints" / "last.ckpt"
    last.parent.mkdir()
    last.write_bytes(b"weights")
    assert preemption.requeued_checkpoint(tmp_path) is None, "a first attempt never resumes by itself"
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    assert preemption.requeued_checkpoint(tmp_path) is None
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    assert preemption.requeued_checkpoint(tmp_path) == str(last)
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    (tmp_path / preemption.REQUEUE_FILE).write_text("{}")  # stopped by our own callback
    assert preemption.requeued_checkpoint(tmp_path) == str(last)
    last.unlink()
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert preemption.requeued_checkpoint(tmp_path) is None, "restarted before any checkpoint: train from scratch"
