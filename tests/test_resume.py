"""Exact resume: a run killed with SIGKILL mid-epoch and resumed ends like an uninterrupted one.

The killed run is a real process (SIGKILL); so is the uninterrupted reference, whose metrics the
in-process resume must reproduce exactly (which also checks that an in-process run computes what
a real ``train.py`` computes)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, cli_args, cli_env, read_metrics, run_cli, run_inproc

#: on top of +debug=fast: two epochs of 8 batches, last.ckpt every 3 steps (mid-epoch)
RESUME_ARGS = (
    "trainer.max_epochs=2",
    "trainer.limit_train_batches=8",
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


def _kill_after_checkpoints(args: list[str], run_dir: Path, writes: int, timeout: float = 600) -> int:
    """Start a run, SIGKILL it right after ``last`` has been (re)written ``writes`` times."""
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *cli_args(args, run_dir)],
        cwd=ROOT,
        env=cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
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
                        proc.send_signal(signal.SIGKILL)
                        break
            time.sleep(0.01)
        return proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in sorted(CASES)])
def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(name: str, tmp_path: Path) -> None:
    args = (*RESUME_ARGS, *CASES[name])
    reference = tmp_path / "reference"
    proc = run_cli("train.py", *args, run_dir=reference)
    assert proc.returncode == 0, proc.stderr[-3000:]

    crashed = tmp_path / "crashed"
    last = crashed / "checkpoints" / "last.ckpt"
    code = _kill_after_checkpoints(list(args), crashed, writes=1)
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
