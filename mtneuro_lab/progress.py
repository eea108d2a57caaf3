"""Progress lines that read well in a log file (``callbacks.progress_log``).

A progress bar redrawn in place is noise in a SLURM log or a piped file. This callback writes
one line per training epoch (and one every ``every_n_steps`` batches inside long epochs)::

    epoch 3/6 step 120/240 | train/loss 0.412 val/loss 0.288 val/acc 0.95 | 245 samples/s | elapsed 0:01:10 left 0:01:20

through the ``mtneuro_lab.progress`` logger, so the same lines land in the run's ``cli.log``.
On a terminal (``when: auto``) the progress bar stays and the lines go to the log file only; in
a sweep every line starts with the job's overrides (``[model.optimizer.lr=0.1,seed=2]``).
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Sequence
from typing import Any, Literal

import pytorch_lightning as pl
import torch

from mtneuro_lab.errors import ConfigError

log = logging.getLogger("mtneuro_lab.progress")

When = Literal["auto", "always", "never"]


def stdout_is_terminal() -> bool:
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):  # replaced or closed stdout
        return False


def duration(seconds: float) -> str:
    """``H:MM:SS`` (``D days, H:MM:SS`` past a day)."""
    if not math.isfinite(seconds):
        return "?"
    seconds = int(max(seconds, 0))
    days, rest = divmod(seconds, 86400)
    text = f"{rest // 3600}:{rest % 3600 // 60:02d}:{rest % 60:02d}"
    return f"{days} days, {text}" if days else text


def number(value: float) -> str:
    return (
        f"{value:.4g}"
        if math.isfinite(value) and abs(value) < 1e4
        else f"{value:.0f}"
        if math.isfinite(value)
        else str(value)
    )


def sweep_job_label() -> str:
    """``[<the job's overrides>] `` inside a Hydra multirun, else an empty string."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
        if hc.mode != RunMode.MULTIRUN:
            return ""
        return f"[{hc.job.override_dirname or hc.job.num}] "
    except Exception:  # noqa: BLE001 - outside Hydra (tests, notebooks)
        return ""


class _DropOnTerminal(logging.Filter):
    """Keeps progress lines off handlers that write to a terminal (the bar shows progress there)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.name != log.name


class ProgressLog(pl.Callback):
    """One line per epoch (and every ``every_n_steps`` batches, 0 = per epoch only).

    ``metrics``: the logged metrics shown, in order (missing ones are left out); null = the
    training loss averaged over the epoch's batches, ``val/loss`` and the method's selection
    metric. ``when``: ``auto`` = lines on the console only when stdout is not a terminal (always
    in the log file), ``always``, or ``never``.
    """

    def __init__(self, every_n_steps: int = 0, metrics: Sequence[str] | None = None, when: When = "auto") -> None:
        if every_n_steps < 0:
            raise ConfigError(
                f"callbacks.progress_log.every_n_steps: must be >= 0 (0 = once per epoch), got {every_n_steps}"
            )
        if when not in ("auto", "always", "never"):
            raise ConfigError(f"callbacks.progress_log.when: must be auto, always or never, got {when!r}")
        self.every_n_steps = int(every_n_steps)
        self.metrics = list(metrics) if metrics is not None else None
        self.when = when
        self._filtered: list[logging.Handler] = []
        self._prefix = ""
        self._fit_start = self._epoch_start = 0.0
        self._batches_done = 0  # since this fit (or resume) started: the rate behind "left"
        self._epoch_batches = self._epoch_samples = 0
        self._loss_sum, self._loss_count = 0.0, 0

    @property
    def active(self) -> bool:
        return self.when != "never"

    def hides_progress_bar(self) -> bool:
        """Whether the run should switch Lightning's progress bar off (the lines replace it)."""
        return self.when == "always" or (self.when == "auto" and not stdout_is_terminal())

    # -- set-up ------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._prefix = sweep_job_label()
        if self.when == "auto" and stdout_is_terminal():
            for handler in logging.getLogger().handlers:
                stream = getattr(handler, "stream", None)
                if stream is not None and getattr(stream, "isatty", lambda: False)():
                    handler.addFilter(_DropOnTerminal())
                    self._filtered.append(handler)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for handler in self._filtered:
            for f in [f for f in handler.filters if isinstance(f, _DropOnTerminal)]:
                handler.removeFilter(f)
        self._filtered = []

    # -- counting ----------------------------------------------------------------------------
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fit_start = time.perf_counter()
        self._batches_done = 0
        # a fit resumed mid-epoch (a requeued job) gets no on_train_epoch_start for that epoch:
        # its rate counts from here, its position from the batches the checkpoint had done
        self.on_train_epoch_start(trainer, pl_module)
        self._epoch_batches = int(trainer.fit_loop.epoch_loop.batch_progress.current.completed)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_start = time.perf_counter()
        self._epoch_batches = self._epoch_samples = 0
        self._loss_sum, self._loss_count = 0.0, 0

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._batches_done += 1
        self._epoch_batches += 1
        self._epoch_samples += _batch_samples(batch, trainer)
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            self._loss_sum += float(loss.detach())
            self._loss_count += 1
        if self.active and self.every_n_steps and (batch_idx + 1) % self.every_n_steps == 0:
            batches = trainer.num_training_batches
            if not (math.isfinite(batches) and batch_idx + 1 >= batches):  # the epoch line follows
                self._emit(trainer, pl_module, f"batch {batch_idx + 1}/{_count(batches)}")

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.active and trainer.is_global_zero:
            self._emit(trainer, pl_module, None)

    # -- the line ----------------------------------------------------------------------------
    def _shown_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[tuple[str, float]]:
        logged = {k: v for k, v in trainer.callback_metrics.items() if isinstance(v, torch.Tensor) and v.numel() == 1}
        if self.metrics is None:
            selection = getattr(pl_module, "monitor", ("val/loss", "min"))[0]
            names = ["val/loss", *([selection] if selection != "val/loss" else [])]
            shown = [("train/loss", self._loss_sum / self._loss_count)] if self._loss_count else []
        else:
            names, shown = self.metrics, []
        return shown + [(name, float(logged[name])) for name in names if name in logged]

    def line(self, trainer: pl.Trainer, pl_module: pl.LightningModule, within: str | None) -> str:
        """The progress line at this point of the fit (``within``: position inside the epoch)."""
        now = time.perf_counter()
        epoch = f"epoch {trainer.current_epoch + 1}/{_count(trainer.max_epochs)}"
        steps = trainer.estimated_stepping_batches
        parts = [f"{epoch}{' ' + within if within else ''} step {trainer.global_step}/{_count(steps)}"]
        metrics = " ".join(f"{k} {number(v)}" for k, v in self._shown_metrics(trainer, pl_module))
        if metrics:
            parts.append(metrics)
        epoch_time = now - self._epoch_start
        if self._epoch_samples and epoch_time > 0:
            parts.append(f"{number(self._epoch_samples / epoch_time)} samples/s")
        elapsed = now - self._fit_start
        position = trainer.current_epoch * float(trainer.num_training_batches) + self._epoch_batches
        remaining = _total_batches(trainer) - position
        left = elapsed / self._batches_done * remaining if self._batches_done else math.nan
        parts.append(f"elapsed {duration(elapsed)} left {duration(left)}")
        return self._prefix + " | ".join(parts)

    def _emit(self, trainer: pl.Trainer, pl_module: pl.LightningModule, within: str | None) -> None:
        log.info(self.line(trainer, pl_module, within))


def _count(value: float | int | None) -> str:
    return "?" if value is None or not math.isfinite(value) or value < 0 else str(int(value))


def _batch_samples(batch: Any, trainer: pl.Trainer) -> int:
    """Samples of one batch over all ranks (the global batch) from its ``image`` tensor."""
    image = batch.get("image") if isinstance(batch, dict) else batch[0] if isinstance(batch, list | tuple) else batch
    local = int(image.shape[0]) if isinstance(image, torch.Tensor) else 0
    return local * max(int(trainer.world_size), 1)


def _total_batches(trainer: pl.Trainer) -> float:
    """Training batches of the whole fit (``max_steps`` or ``max_epochs`` worth), NaN if unknown."""
    per_epoch = float(trainer.num_training_batches)
    if trainer.max_steps and trainer.max_steps > 0:
        return trainer.max_steps * trainer.accumulate_grad_batches
    if trainer.max_epochs is None or trainer.max_epochs < 0 or not math.isfinite(per_epoch):
        return math.nan
    return per_epoch * trainer.max_epochs
