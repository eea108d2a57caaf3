"""Launch environment and preemption helpers without a cluster: SLURM/torchrun variables set by
the test, a stand-in trainer for the preemption stop, ``scontrol`` replaced."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf

from mtneuro_lab.cluster import env, preemption
from mtneuro_lab.errors import ConfigError

LAUNCH_VARS = (
    "TORCHELASTIC_RUN_ID",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "RANK",
    "SLURM_JOB_ID",
    "SLURM_STEP_ID",
    "SLURM_JOB_NAME",
    "SLURM_NTASKS",
    "SLURM_PROCID",
    "SLURM_ARRAY_JOB_ID",
    "SLURM_ARRAY_TASK_ID",
    "SLURM_RESTART_COUNT",
)
SLURM = {"_target_": "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"}


@pytest.fixture(autouse=True)
def no_launcher(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in LAUNCH_VARS:
        monkeypatch.delenv(name, raising=False)


def test_srun_steps_name_the_run_dir_and_give_ranks_above_zero_their_own_log(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("SLURM_PROCID", "3")
    assert env.run_stamp() == "slurm_4242_0"
    assert env.external_rank() == 3
    assert env.rank_overrides("evaluate", ["hydra.job.name=mine"]) == ["hydra.output_subdir=null"]
    monkeypatch.setenv("SLURM_JOB_NAME", "interactive")  # salloc shell: not a step of srun
    assert env.external_rank() == 0
    assert env.run_stamp().startswith("20") and "slurm" not in env.run_stamp()


def test_torchrun_without_rendezvous_id_uses_the_agents_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    monkeypatch.setenv("WORLD_SIZE", "2")
    stamp = env.run_stamp()
    assert stamp.startswith("torchrun_20") and stamp.endswith(f"_{os.getppid()}")
    assert env.run_stamp() == stamp  # every worker of one agent: the same directory
    monkeypatch.setattr(env.os, "getppid", lambda: 2**22 + 17)  # no such process in /proc
    assert env.run_stamp() == f"torchrun_{2**22 + 17}"


def test_torchrun_across_nodes_needs_a_rendezvous_id_or_a_shared_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    problem = env.shared_dir_problem([])
    assert problem is not None and problem.startswith("hydra.run.dir: torchrun across nodes")
    assert env.shared_dir_problem(["hydra.run.dir=/shared/run"]) is None
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # one node
    assert env.shared_dir_problem([]) is None


def test_hydra_launcher_is_none_outside_a_hydra_app() -> None:
    assert env.hydra_launcher() is None


@pytest.mark.parametrize(
    ("trainer", "launcher", "gpus", "expected"),
    [
        ({"devices": [0, 1, 2]}, None, 0, 3),
        ({"devices": "0,1,"}, None, 0, 2),
        ({"devices": "auto"}, {**SLURM, "tasks_per_node": 4}, 0, 4),
        ({"devices": "auto", "accelerator": "gpu"}, None, 2, 2),
        ({"devices": -1, "accelerator": "auto"}, None, 3, 3),
        ({"devices": -1, "accelerator": "cpu"}, None, 0, os.cpu_count() or 1),
        ({"devices": "auto", "accelerator": "cpu"}, None, 0, 1),
    ],
)
def test_devices_per_node(
    trainer: dict, launcher: dict | None, gpus: int, expected: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(env, "_gpu_count", lambda: gpus)
    assert env.devices_per_node(trainer, launcher) == expected
    assert env.process_count({**trainer, "num_nodes": 2}, launcher) == 2 * expected


def test_gpu_count_is_what_torch_sees() -> None:
    assert env._gpu_count() == torch.cuda.device_count()


def test_slurm_tasks_per_node_must_match_the_devices() -> None:
    cfg = OmegaConf.create({"trainer": {"accelerator": "cpu", "devices": 2, "num_nodes": 1}, "data": {}})
    with pytest.raises(ConfigError) as err:
        env.check_launch(cfg, {**SLURM, "tasks_per_node": 4})
    assert str(err.value).startswith("trainer.devices: 2 processes per node but hydra.launcher.tasks_per_node: 4")
    env.check_launch(cfg, {**SLURM, "tasks_per_node": 2})


# -- preemption --------------------------------------------------------------------------------
class _Strategy:
    root_device = torch.device("cpu")

    def __init__(self) -> None:
        self.barriers: list[str] = []

    def reduce(self, tensor: torch.Tensor, reduce_op: str) -> torch.Tensor:
        assert reduce_op == "max"
        return tensor

    def barrier(self, name: str) -> None:
        self.barriers.append(name)


class _Trainer:
    """What :meth:`PreemptionCheckpoint._stop_if_signalled` uses of a one-process trainer."""

    def __init__(self) -> None:
        self.strategy = _Strategy()
        self.global_step, self.current_epoch, self.global_rank, self.is_global_zero = 7, 1, 0, True

    def save_checkpoint(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"ckpt")


def test_a_signal_stops_after_the_batch_with_checkpoint_and_requeue_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "99")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    callback, trainer = preemption.PreemptionCheckpoint(tmp_path), _Trainer()
    callback.on_train_batch_end(trainer, None, None, None, 0)  # type: ignore[arg-type]
    assert not (tmp_path / "checkpoints").exists()
    callback.received = signal.SIGUSR2
    for _ in range(2):  # a second stop of a requeued run counts on
        with pytest.raises(preemption.Preempted) as stop:
            callback.on_train_end(trainer, None)  # type: ignore[arg-type]
    assert str(stop.value) == "preempted by SIGUSR2 after step 7" and stop.value.rank == 0
    assert (tmp_path / "checkpoints" / "last.ckpt").read_bytes() == b"ckpt"
    record = json.loads((tmp_path / "requeue.json").read_text())
    assert {k: record[k] for k in ("signal", "global_step", "epoch", "slurm_job_id", "requeues")} == {
        "signal": "SIGUSR2",
        "global_step": 7,
        "epoch": 1,
        "slurm_job_id": "99_3",
        "requeues": 2,
    }
    assert trainer.strategy.barriers == ["preempted", "preempted"]
    assert preemption.requeued_checkpoint(tmp_path) == str(tmp_path / "checkpoints" / "last.ckpt")
    preemption.finished(tmp_path)
    assert preemption.requeued_checkpoint(tmp_path) is None


def test_watching_installs_no_handlers_outside_the_main_thread(tmp_path: Path) -> None:
    callback = preemption.PreemptionCheckpoint(tmp_path)
    seen: list[Any] = []

    def worker() -> None:
        with callback.watching():
            seen.append(signal.getsignal(signal.SIGUSR2))

    before = signal.getsignal(signal.SIGUSR2)
    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert seen == [before] and callback._previous == {}


def test_requeue_outside_slurm_only_logs_and_a_failed_scontrol_is_logged(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    err = preemption.Preempted(signal.SIGUSR1, 5, 0, signal.SIG_DFL)
    calls: list[list[str]] = []

    def scontrol(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess:
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, "", "Invalid job id specified\n")

    monkeypatch.setattr(preemption.subprocess, "run", scontrol)
    with caplog.at_level("WARNING", logger=preemption.__name__):
        preemption.requeue(err)
        assert calls == [] and "run the same command to resume" in caplog.text
        monkeypatch.setenv("SLURM_JOB_ID", "812")
        assert preemption.slurm_job_id() == "812"
        preemption.requeue(err)
    assert calls == [["scontrol", "requeue", "812"]]
    assert "scontrol requeue 812 failed: Invalid job id specified" in caplog.text


def test_unreadable_restart_count_means_no_restart(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURM_RESTART_COUNT", "n/a")
    assert preemption.slurm_restarts() == 0
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    assert preemption.slurm_restarts() == 2
