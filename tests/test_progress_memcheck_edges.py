"""Edges of the progress lines (:mod:`mtneuro_lab.progress`) and the memory preflight
(:mod:`mtneuro_lab.memcheck`): option errors, terminal handling, fit lengths, probes on the meta
device, the memory of a cgroup, devices the check does not know."""

from __future__ import annotations

import io
import logging
import math
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf

from mtneuro_lab import memcheck, progress
from mtneuro_lab.errors import ConfigError


# -- progress ----------------------------------------------------------------------------------
def test_replaced_stdout_is_not_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdout", object())
    assert progress.stdout_is_terminal() is False


def test_duration_of_an_unknown_and_a_long_time() -> None:
    assert progress.duration(math.nan) == "?"
    assert progress.duration(math.inf) == "?"
    assert progress.duration(86400 + 3661) == "1 days, 1:01:01"
    assert progress.duration(-5) == "0:00:00"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"every_n_steps": -1}, "callbacks.progress_log.every_n_steps: must be >= 0 (0 = once per epoch), got -1"),
        ({"when": "sometimes"}, "callbacks.progress_log.when: must be auto, always or never, got 'sometimes'"),
    ],
)
def test_bad_options_name_their_key(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        progress.ProgressLog(**kwargs)
    assert str(err.value) == message


class _TTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_on_a_terminal_the_lines_stay_off_terminal_handlers_until_teardown(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(progress, "stdout_is_terminal", lambda: True)
    tty, plain = _TTY(), io.StringIO()
    handlers = [logging.StreamHandler(tty), logging.StreamHandler(plain)]
    root = logging.getLogger()
    for handler in handlers:
        root.addHandler(handler)
    level = progress.log.level
    progress.log.setLevel(logging.INFO)
    try:
        callback = progress.ProgressLog()
        assert not callback.hides_progress_bar()
        callback.setup(None, None, "fit")  # type: ignore[arg-type]
        progress.log.info("epoch 1/2 step 3/6")
        logging.getLogger("mtneuro_lab.other").warning("a warning")
        callback.teardown(None, None, "fit")  # type: ignore[arg-type]
        progress.log.info("epoch 2/2 step 6/6")
    finally:
        for handler in handlers:
            root.removeHandler(handler)
        progress.log.setLevel(level)
    assert tty.getvalue().splitlines() == ["a warning", "epoch 2/2 step 6/6"]
    assert plain.getvalue().splitlines() == ["epoch 1/2 step 3/6", "a warning", "epoch 2/2 step 6/6"]
    assert all(not handler.filters for handler in handlers)


def test_chosen_metrics_are_shown_in_their_order_missing_ones_left_out() -> None:
    callback = progress.ProgressLog(metrics=["val/dice", "val/loss", "val/absent"])
    trainer = SimpleNamespace(
        callback_metrics={"val/loss": torch.tensor(0.25), "val/dice": torch.tensor(0.5), "hist": torch.ones(3)}
    )
    assert callback._shown_metrics(trainer, None) == [("val/dice", 0.5), ("val/loss", 0.25)]  # type: ignore[arg-type]


def test_total_batches_from_max_steps_or_unknown() -> None:
    by_steps = SimpleNamespace(num_training_batches=10, max_steps=6, accumulate_grad_batches=2, max_epochs=3)
    assert progress._total_batches(by_steps) == 12  # type: ignore[arg-type]
    endless = SimpleNamespace(num_training_batches=10, max_steps=-1, accumulate_grad_batches=1, max_epochs=-1)
    assert math.isnan(progress._total_batches(endless))  # type: ignore[arg-type]
    by_epochs = SimpleNamespace(num_training_batches=10, max_steps=-1, accumulate_grad_batches=1, max_epochs=3)
    assert progress._total_batches(by_epochs) == 30  # type: ignore[arg-type]


# -- memcheck ----------------------------------------------------------------------------------
def test_a_batch_of_one_is_a_line_through_zero() -> None:
    line = memcheck.fit_line(lambda b: 1000.0 * b, 1)
    assert (line.fixed, line.per_sample) == (0.0, 1000.0)


def _fake_files(monkeypatch: pytest.MonkeyPatch, root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name.lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    monkeypatch.setattr(memcheck, "Path", lambda p: root / str(p).lstrip("/"))


def test_available_memory_is_capped_by_the_cgroup_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = {
        "/proc/meminfo": "MemTotal: 16000000 kB\nMemAvailable: 8000000 kB\n",
        "/sys/fs/cgroup/memory.max": f"{3 * 2**30}\n",
        "/sys/fs/cgroup/memory.current": f"{2**30}\n",
    }
    _fake_files(monkeypatch, tmp_path, files)
    assert memcheck.available_bytes("cpu") == 2 * 2**30
    (tmp_path / "sys/fs/cgroup/memory.max").write_text("max\n")
    assert memcheck.available_bytes("cpu") == 8000000 * 1024


def test_no_meminfo_means_no_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_files(monkeypatch, tmp_path, {})
    assert memcheck.available_bytes("cpu") is None
    cfg = OmegaConf.create({"trainer": {"accelerator": "cpu", "devices": 1}, "data": {"batch_size": 10**9}})

    def never(*args: Any) -> memcheck.Estimate:
        raise AssertionError("probed without knowing the memory")

    monkeypatch.setattr(memcheck, "cached_estimate", never)
    memcheck.check_memory(cfg, torch.nn.Linear(2, 2), (4, 4))


@pytest.mark.parametrize("accelerator", ["gpu", "mps"])
def test_devices_the_check_cannot_measure_are_skipped(
    accelerator: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(memcheck.torch.cuda, "is_available", lambda: False)
    cfg = OmegaConf.create({"trainer": {"accelerator": accelerator, "devices": 1}, "data": {"batch_size": 10**9}})
    with caplog.at_level(logging.INFO, logger=memcheck.__name__):
        memcheck.check_memory(cfg, torch.nn.Linear(2, 2), (4, 4))
    assert f"memory check: skipped for trainer.accelerator={accelerator}" in caplog.text


class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).relu()


def test_mixed_precision_halves_the_activations_per_sample() -> None:
    full = memcheck.estimate(_Net(), (16, 16), 4, 4, mixed=False)
    mixed = memcheck.estimate(_Net(), (16, 16), 4, 4, mixed=True)
    assert full.train.per_sample > 0 and full.infer.per_sample > 0
    assert mixed.train.per_sample == full.train.per_sample / 2
    assert mixed.infer.per_sample == full.infer.per_sample / 2
    assert (
        (mixed.params, mixed.state) == (full.params, full.state) == (160, 160)
    )  # 40 float32; no optim_cfg: SGD, one copy


def test_the_estimate_cache_forgets_its_oldest_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memcheck, "_ESTIMATES", {})
    monkeypatch.setattr(memcheck, "_MAX_ESTIMATES", 2)
    monkeypatch.setattr(
        memcheck, "estimate", lambda m, shape, b, e, mixed: memcheck.Estimate(b, 0, *[memcheck.Line(0, 1)] * 2)
    )
    cfg = OmegaConf.create({"model": None, "task": {"name": "t"}})
    for batch in (1, 2, 3):
        memcheck.cached_estimate(cfg, _Net(), (8, 8), batch, batch, False)
    assert [key[4] for key in memcheck._ESTIMATES] == [2, 3]
