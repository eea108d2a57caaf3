"""What every method shares: optimiser/schedule from config, stage bookkeeping, injected facts,
and the contract the run relies on (``task_kinds``, ``monitor``, ``validation_metrics``,
``bind_task``, ``after_evaluate``).

Constructor convention: the run's facts (``num_classes``, ``class_names``, ``input_shape``,
never in the YAML) come positionally; each class declares only its OWN options, keyword-only,
and passes everything else up with ``**kwargs``. The schema
(:func:`mtneuro_lab.config.schema.target_options`) follows those ``**kwargs`` up the class
hierarchy, so an option is declared once and a typo in any of them is still one line.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Protocol, TypeVar

import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mtneuro_lab.config.schema import one_line_omegaconf_error
from mtneuro_lab.data.contract import Task
from mtneuro_lab.errors import ConfigError
from mtneuro_lab.methods.optim import OptimizerConfig, SchedulerConfig, build_optimizer, build_scheduler

T = TypeVar("T")


def as_dataclass(cls: type[T], value: Any, key: str) -> T:
    """Turn a mapping (dict or DictConfig) into dataclass ``cls``, rejecting unknown keys."""
    if isinstance(value, cls):
        return value
    if value is None:
        return cls()
    try:
        merged = OmegaConf.merge(OmegaConf.structured(cls), OmegaConf.create(dict(value)))
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except OmegaConfBaseException as err:
        raise ConfigError(one_line_omegaconf_error(err, key, cls)) from None


class BaseMethod(pl.LightningModule):
    """Optimiser, schedule and the facts every method gets from the run."""

    #: metric watched by checkpointing / early stopping, and its direction
    monitor: ClassVar[tuple[str, str]] = ("val/loss", "min")
    #: the task kinds (:attr:`mtneuro_lab.data.contract.Task.kind`) this method runs on
    task_kinds: ClassVar[tuple[str, ...]] = ("classification",)

    def __init__(
        self,
        num_classes: int,
        class_names: Sequence[str],
        input_shape: Sequence[int],
        *,
        optimizer: OptimizerConfig | Mapping[str, Any] | None = None,
        scheduler: SchedulerConfig | Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.num_classes = int(num_classes)
        self.class_names = list(class_names)
        self.input_shape = tuple(int(s) for s in input_shape)
        self.optim_cfg = as_dataclass(OptimizerConfig, optimizer, "model.optimizer")
        self.sched_cfg = as_dataclass(SchedulerConfig, scheduler, "model.scheduler")

    def validation_metrics(self) -> set[str]:
        """Every ``val/`` key this method logs: what checkpoint selection and sweeps may choose by."""
        return {"val/loss"}

    # -- evaluation loss -------------------------------------------------------------------------
    def _add_eval_loss(self, stage: str, loss: torch.Tensor, samples: int) -> None:
        """Count a batch's mean loss over its ``samples`` towards ``<stage>/loss`` (:meth:`_log_loss`)."""
        loss = loss.detach().double()
        self._loss_sum(stage, loss.device).add_(torch.stack([loss * samples, loss.new_tensor(samples)]))

    def _loss_sum(self, stage: str, device: torch.device) -> torch.Tensor:
        """(sum of sample losses, samples) of this stage on this rank, since the epoch began."""
        sums: dict[str, torch.Tensor] = self.__dict__.setdefault("_eval_loss_sums", {})
        return sums.setdefault(stage, torch.zeros(2, dtype=torch.float64, device=device))

    def _log_loss(self, stage: str) -> None:
        """``<stage>/loss``: the mean over every sample of every rank. Lightning's ``sync_dist``
        would average the ranks' means, which differs when ranks scored unequal counts."""
        total = self._loss_sum(stage, self.device)
        self.__dict__["_eval_loss_sums"].pop(stage)
        total = self.trainer.strategy.reduce(total, reduce_op="sum")  # every rank, even one with no batch
        if total[1] > 0:
            self.log(f"{stage}/loss", (total[0] / total[1]).float(), rank_zero_only=False)

    # -- hooks the run calls ---------------------------------------------------------------------
    def bind_task(self, task: Task) -> None:
        """Take what the method needs from the task beyond the facts (the builder calls it once,
        right after construction, before any data is read); nothing by default."""

    def after_evaluate(self, datamodule: Any, run_dir: Path) -> dict[str, float]:
        """``evaluate.py``, after the test: write extra outputs into ``run_dir``; returns extra
        metrics for ``metrics.json`` (none by default)."""
        return {}

    def check_trainer(self, trainer_cfg: Any) -> None:
        """One line if the ``trainer`` section cannot serve this method (called by the builder after
        :meth:`bind_task`, before any data is read); nothing by default."""

    # -- figures ---------------------------------------------------------------------------------
    #: the media callback (``callbacks.media``) while one is attached; see :meth:`offer_media`
    media_sink: Any = None

    def offer_media(self, stage: str, kind: str, arrays: Callable[[], Mapping[str, Any]]) -> None:
        """Hand arrays already at hand in a step (volumes, reconstructions) to the media callback.

        ``arrays`` is called only when the callback wants this ``kind`` at this ``stage`` now (its
        epoch cadence, first batch only), so a step pays nothing otherwise.
        """
        sink = self.media_sink
        if sink is not None and sink.wants(stage, kind):
            sink.take(stage, kind, arrays())

    # -- optimisation --------------------------------------------------------------------------
    @property
    def global_batch_size(self) -> int:
        """``data.batch_size`` as configured: the global batch over all DDP ranks."""
        dm = getattr(self.trainer, "datamodule", None)
        return int(getattr(dm, "batch_size", 1))

    def optimizer_parameters(self) -> Any:
        """Parameters (or parameter groups) to optimise; methods override to exclude targets."""
        return [p for p in self.parameters() if p.requires_grad]

    def configure_optimizers(self) -> Any:
        optimizer = build_optimizer(self.optimizer_parameters(), self.optim_cfg, self.global_batch_size)
        total = int(self.trainer.estimated_stepping_batches)
        epochs = max(int(self.trainer.max_epochs or 1), 1)
        scheduler = build_scheduler(optimizer, self.sched_cfg, total, max(total // epochs, 1))
        if scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": scheduler}


class StageMetrics(Protocol):
    """What :class:`ScoredMethod` uses of ``self.metrics``: metrics pooled per stage (train/val/test)."""

    def names(self, stage: str) -> list[str]: ...

    def update(self, stage: str, logits: torch.Tensor, target: torch.Tensor) -> None: ...

    def has_data(self, stage: str) -> bool: ...

    def compute(self, stage: str) -> dict[str, torch.Tensor]: ...


class ScoredMethod(BaseMethod):
    """A method whose validation/test score logits against ``batch["target"]``.

    Subclasses provide ``forward``, ``loss(logits, target)`` and ``self.metrics`` (an object with
    ``update(stage, logits, target)``, ``has_data(stage)`` and ``compute(stage)``, pooled over
    the whole stage); this class supplies the evaluation steps and the per-epoch logging.
    """

    metrics: StageMetrics

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def validation_metrics(self) -> set[str]:
        return super().validation_metrics() | set(self.metrics.names("val"))

    def _eval_step(self, stage: str, batch: dict[str, Any]) -> None:
        logits = self(batch["image"])
        self._add_eval_loss(stage, self.loss(logits, batch["target"]), len(logits))
        self.metrics.update(stage, logits, batch["target"])

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step("val", batch)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step("test", batch)

    def _log_epoch(self, stage: str) -> None:
        if self.metrics.has_data(stage):
            self.log_dict(self.metrics.compute(stage), prog_bar=stage == "val")

    def on_train_epoch_end(self) -> None:
        self._log_epoch("train")

    def on_validation_epoch_end(self) -> None:
        self._log_loss("val")
        self._log_epoch("val")

    def on_test_epoch_end(self) -> None:
        self._log_loss("test")
        self._log_epoch("test")
