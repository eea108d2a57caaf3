"""Preemption-safe training: stop on the scheduler's warning signal, save, requeue, resume.

SLURM sends ``SIGUSR2`` (submitit's ``--signal=USR2@<signal_delay_s>``) some time before the
time limit, and on preemption; Lightning's own SLURM requeue listens on ``SIGUSR1``. While a run
fits, both only set a flag (:class:`PreemptionCheckpoint`). After every training batch (and at
the end of the fit, for a signal during the final validation) the ranks agree on it (one
all-reduce of the signal number), so all of them stop after the SAME batch:
``checkpoints/last.ckpt`` is written (atomically, with the loader position and RNG states, like
any checkpoint of this project), then ``requeue.json``, and :class:`Preempted` ends the fit on
every rank. :func:`requeue` then hands the job back: submitit's own handler when the job runs
under Hydra's submitit launcher (it resubmits the same job and counts timeouts against
``hydra.launcher.max_num_timeout``), ``scontrol requeue`` in a plain SLURM job, or a log line
saying to run the same command again. The requeued job starts in the same run directory
(:func:`~mtneuro_lab.cluster.env.run_stamp`, or the sweep's job directory), finds
``requeue.json`` and resumes from ``last.ckpt`` (:func:`requeued_checkpoint`), ending where an
uninterrupted run ends.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import threading
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from mtneuro_lab.io import atomic_write_bytes

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)
REQUEUE_FILE = "requeue.json"
LAST_CHECKPOINT = Path("checkpoints") / "last.ckpt"

Handler = Callable[[int, Any], Any] | int | None


class Preempted(Exception):
    """Raised on every rank after the preemption checkpoint is written (ends ``trainer.fit``)."""

    def __init__(self, signum: int, step: int, rank: int, previous: Handler) -> None:
        super().__init__(f"preempted by {signal.Signals(signum).name} after step {step}")
        self.signum, self.step, self.rank, self.previous = signum, step, rank, previous


class PreemptionCheckpoint(pl.Callback):
    """Turns SIGUSR1/SIGUSR2 during ``fit`` into a checkpoint after the same batch on every rank."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.received = 0  # the signal number, 0 while none arrived
        self._previous: dict[int, Handler] = {}

    @contextlib.contextmanager
    def watching(self) -> Iterator[None]:
        """Signal handlers installed around ``trainer.fit`` (main thread only; restored after)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        self._previous = {sig: signal.signal(sig, self._on_signal) for sig in SIGNALS}
        try:
            yield
        finally:
            for sig, handler in self._previous.items():
                signal.signal(sig, handler if handler is not None else signal.SIG_DFL)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.received = signum
        log.warning("received %s: stopping after this batch to checkpoint and requeue", signal.Signals(signum).name)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._stop_if_signalled(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """A signal during the final validation, after the last batch: the fit is done, but the
        selection and test still to run may not fit before the job is killed."""
        self._stop_if_signalled(trainer)

    def _stop_if_signalled(self, trainer: pl.Trainer) -> None:
        flag = torch.tensor(self.received, device=trainer.strategy.root_device)
        agreed = int(trainer.strategy.reduce(flag, reduce_op="max"))  # one signalled rank stops all
        if not agreed:
            return
        trainer.save_checkpoint(self.run_dir / LAST_CHECKPOINT)  # rank 0 writes; every rank waits
        if trainer.is_global_zero:
            write_requeue_record(self.run_dir, agreed, trainer.global_step, trainer.current_epoch)
        trainer.strategy.barrier("preempted")
        raise Preempted(agreed, trainer.global_step, trainer.global_rank, self._previous.get(agreed))


def watching(trainer: pl.Trainer) -> contextlib.AbstractContextManager[None]:
    """The trainer's :meth:`PreemptionCheckpoint.watching` (a no-op context without one)."""
    callbacks = getattr(trainer, "callbacks", [])  # set by the trainer at run time
    callback = next((cb for cb in callbacks if isinstance(cb, PreemptionCheckpoint)), None)
    return callback.watching() if callback is not None else contextlib.nullcontext()


def write_requeue_record(run_dir: Path, signum: int, step: int, epoch: int) -> None:
    """``requeue.json``: why and where the run stopped; counts how often it was requeued."""
    path = run_dir / REQUEUE_FILE
    before = json.loads(path.read_text()).get("requeues", 0) if path.is_file() else 0
    record = {
        "signal": signal.Signals(signum).name,
        "global_step": int(step),
        "epoch": int(epoch),
        "checkpoint": str(LAST_CHECKPOINT),
        "slurm_job_id": slurm_job_id(),
        "requeues": int(before) + 1,
        "time": datetime.now().isoformat(timespec="seconds"),
    }
    atomic_write_bytes(path, (json.dumps(record, indent=2) + "\n").encode())


def slurm_job_id() -> str | None:
    """The id ``scontrol requeue`` takes (``<array job>_<task>`` for array jobs)."""
    env = os.environ
    if "SLURM_ARRAY_JOB_ID" in env and "SLURM_ARRAY_TASK_ID" in env:
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID")


def requeue(err: Preempted) -> None:
    """After every rank saved: give the job back to the scheduler (rank 0; the others just end).

    A callable handler that was installed before ours is submitit's (Hydra's submitit
    launcher): it resubmits the job and exits. Otherwise, in a SLURM job, ``scontrol requeue``.
    """
    if err.rank != 0:
        return
    if callable(err.previous):
        log.warning("%s: handing over to the job's own handler (submitit requeue)", err)
        err.previous(err.signum, None)
        return
    job = slurm_job_id()
    if job is None:
        log.warning("%s: last.ckpt and requeue.json written; run the same command to resume", err)
        return
    done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, check=False)
    if done.returncode:
        log.error("%s: scontrol requeue %s failed: %s", err, job, done.stderr.strip())
    else:
        log.warning("%s: SLURM job %s requeued; it resumes from last.ckpt", err, job)


def requeued_checkpoint(run_dir: Path) -> str | None:
    """``last.ckpt`` of a run that comes back after an interruption (else None): stopped by
    :class:`PreemptionCheckpoint` (``requeue.json``), or requeued by SLURM itself without our
    signal (node failure, a preemption without the warning; ``SLURM_RESTART_COUNT`` > 0), which
    then resumes from the periodic ``last.ckpt`` instead of training again from scratch."""
    last = run_dir / LAST_CHECKPOINT
    if not last.is_file():
        return None
    if (run_dir / REQUEUE_FILE).is_file() or slurm_restarts() > 0:
        return str(last)
    return None


def slurm_restarts() -> int:
    """How often SLURM has restarted this job (``SLURM_RESTART_COUNT``; 0 outside SLURM)."""
    try:
        return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    except ValueError:
        return 0


def finished(run_dir: Path) -> None:
    """The run completed: ``requeue.json`` no longer describes it."""
    (run_dir / REQUEUE_FILE).unlink(missing_ok=True)
