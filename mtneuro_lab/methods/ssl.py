"""What the self-supervised Task 1 methods share: views, online/target pairs, EMA, probes, and
the linear evaluation that turns an SSL encoder into a region classifier.

One ``trainer.fit`` runs two phases, so that checkpoints, exact resume, multirun and
``evaluate.py`` work exactly as for the supervised model:

* **SSL phase** (epochs ``[0, trainer.max_epochs)``): the method's SSL loss (BYOL, MYOW, ...)
  on two views of each tile; an *online probe* (linear layer on detached features, encoder in
  train mode) is trained alongside for monitoring only (``val/online_acc``).
* **Linear phase** (``model.linear_eval.epochs`` more epochs, added to ``trainer.max_epochs``):
  the encoder is frozen and kept in eval mode (batch-norm statistics fixed); a fresh linear head
  is trained on random crops of the size the encoder saw. ``val/acc`` and ``test/acc`` score this
  head with the paper's four-corner protocol. During the SSL phase ``val/acc`` is logged as NaN
  (there is no evaluation head yet), so the best checkpoint always comes from the linear phase.

Manual optimisation with two optimisers (SSL parameters, linear head) keeps each phase's
learning-rate schedule on its own real step count; the target network moves only by EMA, once
per optimiser step, with momentum following a cosine from ``ema_start`` to ``ema_end``.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from lightly.loss import NegativeCosineSimilarity
from lightly.models.utils import deactivate_requires_grad, update_momentum
from lightly.utils.scheduler import cosine_schedule
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from mtneuro_lab.data import augment
from mtneuro_lab.data.augment import AugmentConfig
from mtneuro_lab.errors import ConfigError
from mtneuro_lab.methods.base import BaseMethod, as_dataclass
from mtneuro_lab.methods.optim import OptimizerConfig, SchedulerConfig, build_optimizer, build_scheduler
from mtneuro_lab.metrics.classification import ClassificationMetrics
from mtneuro_lab.nets.resnet import ResNet18Encoder, Stem

log = logging.getLogger(__name__)


@dataclass
class ViewConfig:
    """``model.views``: how the two SSL views are drawn from a tile (per view, independently).

    The paper's only augmentation is a random crop of half the tile's width and height; the
    other switches add per-view flips, 90-degree turns and contrast/brightness jitter.
    """

    crop_fraction: float = 0.5
    hflip: bool = False
    vflip: bool = False
    rot90: bool = False
    intensity_jitter: float = 0.0

    def __post_init__(self) -> None:
        if not 0 < self.crop_fraction <= 1:
            raise ConfigError(f"model.views.crop_fraction: must be in (0, 1], got {self.crop_fraction}")
        if self.intensity_jitter < 0:
            raise ConfigError(f"model.views.intensity_jitter: must be >= 0, got {self.intensity_jitter}")


@dataclass
class LinearEvalConfig:
    """``model.linear_eval``: the frozen-encoder linear classifier trained after SSL."""

    epochs: int = 10
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 0.0
    batchnorm: bool = True  # BatchNorm1d(affine=False) before the linear layer (still linear at test)

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ConfigError(f"model.linear_eval.epochs: must be >= 1, got {self.epochs}")
        if not self.lr > 0:
            raise ConfigError(f"model.linear_eval.lr: must be > 0, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"model.linear_eval.momentum: must be in [0, 1), got {self.momentum}")
        if self.weight_decay < 0:
            raise ConfigError(f"model.linear_eval.weight_decay: must be >= 0, got {self.weight_decay}")


def make_target(module: nn.Module) -> nn.Module:
    """A frozen copy of ``module`` that only ever moves by EMA (no gradient, not optimised)."""
    target = copy.deepcopy(module)
    deactivate_requires_grad(target)
    return target


_negative_cosine = NegativeCosineSimilarity()


def regression_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """BYOL's ``2 - 2 cos(p, z)``, averaged over the batch; ``z`` is a target (no gradient)."""
    return 2 + 2 * _negative_cosine(p, z.detach())


class SSLMethod(BaseMethod):
    """Base class: subclasses define their heads, ``ema_pairs()`` and ``ssl_step()``."""

    monitor = ("val/acc", "max")
    task_kinds = ("classification",)

    def __init__(
        self,
        num_classes: int,
        class_names: Sequence[str],
        input_shape: Sequence[int],
        *,
        stem: Stem = "auto",
        width: int = 64,
        views: ViewConfig | Mapping[str, Any] | None = None,
        linear_eval: LinearEvalConfig | Mapping[str, Any] | None = None,
        ema_start: float = 0.996,
        ema_end: float = 1.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(num_classes, class_names, input_shape, **kwargs)
        if not 0 <= ema_start <= ema_end <= 1:
            raise ConfigError(
                f"model.ema_start/ema_end: need 0 <= ema_start <= ema_end <= 1, got {ema_start} and {ema_end}"
            )
        self.views_cfg = as_dataclass(ViewConfig, views, "model.views")
        self.linear_cfg = as_dataclass(LinearEvalConfig, linear_eval, "model.linear_eval")
        h, w = self.input_shape[-2:]
        self.crop_size = (
            max(1, round(h * self.views_cfg.crop_fraction)),
            max(1, round(w * self.views_cfg.crop_fraction)),
        )
        if min(self.crop_size) < 8:
            raise ConfigError(
                f"model.views.crop_fraction: crops of {self.crop_size} px from {h}x{w} tiles "
                "are too small for ResNet-18 (need >= 8 px)"
            )
        self.ema_start, self.ema_end = float(ema_start), float(ema_end)
        self._view_workspace = augment.Workspace()  # the views' gather index, reused per batch
        # the stem follows the size the encoder actually sees (crops), see nets/resnet.py
        self.encoder = ResNet18Encoder(in_channels=1, stem=stem, tile_size=min(self.crop_size), width=width)
        dim = self.encoder.out_dim
        self.online_probe = nn.Linear(dim, self.num_classes)
        norm: nn.Module = nn.BatchNorm1d(dim, affine=False) if self.linear_cfg.batchnorm else nn.Identity()
        self.linear = nn.Sequential(norm, nn.Linear(dim, self.num_classes))
        self.metrics = ClassificationMetrics(self.class_names)
        self.probe_metrics = ClassificationMetrics(self.class_names, prefix="online_")
        self.corner_acc = nn.ModuleDict(
            {s: MulticlassAccuracy(num_classes=self.num_classes, average="micro") for s in ("val", "test")}
        )
        self.automatic_optimization = False
        self.ssl_epochs: int | None = None  # trainer.max_epochs as configured, set in setup("fit")
        self._steps_per_epoch = 1
        self._frozen = False

    # -- to be provided by each method ---------------------------------------------------------
    def ema_pairs(self) -> list[tuple[nn.Module, nn.Module]]:  # pragma: no cover - abstract
        """(online, target) module pairs the EMA updates."""
        raise NotImplementedError

    def ssl_step(
        self, v1: torch.Tensor, v2: torch.Tensor, batch: dict[str, Any]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        """SSL loss on two views -> ``(loss, things to log, online representation of v1)``."""
        raise NotImplementedError  # pragma: no cover - abstract

    # -- phases ----------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if stage != "fit":
            return
        trainer = self.trainer
        if trainer.max_epochs is None or trainer.max_epochs < 1:
            raise ConfigError(
                f"trainer.max_epochs: SSL methods need a number of SSL epochs >= 1, got {trainer.max_epochs}"
            )
        if trainer.max_steps not in (-1, None):
            raise ConfigError(
                "trainer.max_steps: SSL methods run trainer.max_epochs SSL epochs plus "
                f"model.linear_eval.epochs linear epochs; set trainer.max_steps=-1, got "
                f"{trainer.max_steps}"
            )
        if self.ssl_epochs is None:
            self.ssl_epochs = int(trainer.max_epochs)
            trainer.fit_loop.max_epochs = self.ssl_epochs + self.linear_cfg.epochs
            log.info(
                "SSL for %d epochs, then linear evaluation for %d epochs (encoder frozen)",
                self.ssl_epochs,
                self.linear_cfg.epochs,
            )

    @property
    def in_linear_phase(self) -> bool:
        return self.ssl_epochs is not None and self._trainer is not None and self.current_epoch >= self.ssl_epochs

    def train(self, mode: bool = True) -> SSLMethod:
        """Keep the frozen encoder in eval mode whatever Lightning switches (fixed BN statistics)."""
        super().train(mode)
        if mode and self._frozen:
            self.encoder.eval()
        return self

    def on_train_epoch_start(self) -> None:
        self._frozen = self.in_linear_phase
        if self._frozen:
            self.encoder.eval()

    # -- optimisation ----------------------------------------------------------------------------
    def ssl_parameters(self) -> list[nn.Parameter]:
        """Everything trained by the SSL optimiser: not the targets, not the linear head."""
        linear = {id(p) for p in self.linear.parameters()}
        return [p for p in self.parameters() if p.requires_grad and id(p) not in linear]

    def configure_optimizers(self) -> Any:
        total = int(self.trainer.estimated_stepping_batches)
        epochs = max(int(self.trainer.max_epochs or 1), 1)
        self._steps_per_epoch = max(total // epochs, 1)
        ssl_epochs = self.ssl_epochs or epochs
        ssl_steps = self._steps_per_epoch * ssl_epochs
        ssl_opt = build_optimizer(self.ssl_parameters(), self.optim_cfg, self.global_batch_size)
        lin_cfg = OptimizerConfig(
            name="sgd",
            lr=self.linear_cfg.lr,
            momentum=self.linear_cfg.momentum,
            weight_decay=self.linear_cfg.weight_decay,
        )
        lin_opt = build_optimizer(self.linear.parameters(), lin_cfg, self.global_batch_size)
        ssl_sched = build_scheduler(ssl_opt, self.sched_cfg, ssl_steps, self._steps_per_epoch)
        lin_sched = build_scheduler(
            lin_opt,
            SchedulerConfig(name="cosine"),
            self._steps_per_epoch * self.linear_cfg.epochs,
            self._steps_per_epoch,
        )
        # scheduler.name=none still gets a (constant) scheduler so both phases index alike
        schedulers = [
            s["scheduler"] if s is not None else torch.optim.lr_scheduler.LambdaLR(o, lambda _: 1.0)
            for s, o in ((ssl_sched, ssl_opt), (lin_sched, lin_opt))
        ]
        return [ssl_opt, lin_opt], schedulers

    @property
    def ssl_total_steps(self) -> int:
        return self._steps_per_epoch * (self.ssl_epochs or 1)

    def ema_momentum(self, step: int) -> float:
        """Target momentum after SSL optimiser step ``step`` (0-based): cosine ema_start -> ema_end."""
        return cosine_schedule(min(step, self.ssl_total_steps), self.ssl_total_steps, self.ema_start, self.ema_end)

    @torch.no_grad()
    def update_targets(self, momentum: float) -> None:
        for online, target in self.ema_pairs():
            update_momentum(online, target, momentum)

    # -- views -----------------------------------------------------------------------------------
    def make_view(self, x: torch.Tensor) -> torch.Tensor:
        """One random crop (``crop_fraction`` of the tile) plus the configured per-view extras."""
        cfg = self.views_cfg
        geometry = AugmentConfig(hflip=cfg.hflip, vflip=cfg.vflip, rot90=cfg.rot90)
        samples = torch.arange(x.shape[0], device=x.device)
        # crop + flips + rot90 of every sample as ONE gather (same draws as random_crop, geometric)
        view, _ = augment.gather_augmented(
            x.contiguous(), samples, self.crop_size, geometry, workspace=self._view_workspace
        )
        return augment.intensity_jitter(view, cfg.intensity_jitter)

    # -- training --------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        x, y = batch["image"], batch["target"]
        optimizers, schedulers = self.optimizers(), self.lr_schedulers()
        # configure_optimizers returns two optimisers, each with a per-step LRScheduler
        assert isinstance(optimizers, list) and isinstance(schedulers, list)
        ssl_opt, lin_opt = optimizers
        ssl_sched, lin_sched = schedulers
        assert isinstance(ssl_sched, torch.optim.lr_scheduler.LRScheduler)
        if self.in_linear_phase:
            return self._linear_step(x, y, lin_opt, lin_sched)
        loss, logs, rep1 = self.ssl_step(self.make_view(x), self.make_view(x), batch)
        probe_logits = self.online_probe(rep1.detach())
        probe_loss = F.cross_entropy(probe_logits, y)
        step = self.global_step
        ssl_opt.zero_grad()
        self.manual_backward(loss + probe_loss)
        ssl_opt.step()
        ssl_sched.step()
        momentum = self.ema_momentum(step)
        self.update_targets(momentum)
        n = len(y)
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        self.log_dict(logs, batch_size=n)
        self.log("train/ema_momentum", momentum, batch_size=n)
        self.log("train/online_loss", probe_loss, batch_size=n)
        self.log("train/online_acc", (probe_logits.argmax(1) == y).float().mean(), batch_size=n)
        return loss.detach()

    def _linear_step(self, x: torch.Tensor, y: torch.Tensor, opt: Any, sched: Any) -> torch.Tensor:
        (crop,) = augment.random_crop([x], self.crop_size)
        with torch.no_grad():
            feats = self.encoder(crop)
        logits = self.linear(feats)
        loss = F.cross_entropy(logits, y)
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()
        sched.step()
        self.log("train/linear_loss", loss, prog_bar=True, batch_size=len(y))
        self.log("train/linear_acc", (logits.argmax(1) == y).float().mean(), batch_size=len(y))
        return loss.detach()

    # -- evaluation: four corner crops per tile --------------------------------------------------
    def corner_features(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder features of the four corner crops: ``(4, B, dim)``."""
        corners = torch.cat(augment.corner_crops(x, self.crop_size), dim=0)
        return self.encoder(corners).view(4, x.shape[0], -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Tile-level class probabilities: linear head on each corner crop, softmax averaged."""
        return self.linear(self.corner_features(x).flatten(0, 1)).view(4, x.shape[0], -1).softmax(-1).mean(0)

    def _corner_acc(self, stage: str) -> MulticlassAccuracy:
        # nn.ModuleDict is typed as holding any Module; this one holds only accuracies
        return cast(MulticlassAccuracy, self.corner_acc[stage])

    def _eval_step(self, stage: str, batch: dict[str, Any]) -> None:
        x, y = batch["image"], batch["target"]
        feats = self.corner_features(x)
        logits = self.linear(feats.flatten(0, 1))
        loss = F.cross_entropy(logits, y.repeat(4))
        probs = logits.view(4, len(y), -1).softmax(-1).mean(0)
        self._add_eval_loss(stage, loss, len(y))  # logged per epoch: the mean over every sample of every rank
        self.metrics.update(stage, probs, y)
        self._corner_acc(stage).update(logits.argmax(1), y.repeat(4))
        if stage == "val":
            probe = self.online_probe(feats.flatten(0, 1)).view(4, len(y), -1).softmax(-1).mean(0)
            self.probe_metrics.update(stage, probe, y)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step("val", batch)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step("test", batch)

    def _log_epoch(self, stage: str) -> None:
        self._log_loss(stage)
        values = self.metrics.compute(stage)
        values[f"{stage}/acc_corners"] = self._corner_acc(stage).compute()
        self._corner_acc(stage).reset()
        if stage == "val":
            values.update(self.probe_metrics.compute(stage))
            if not self.in_linear_phase and self._trainer is not None and self.trainer.state.fn == "fit":
                # no evaluation head yet: NaN keeps the SSL-phase checkpoints out of "best"
                values = {k: (torch.tensor(float("nan")) if k.startswith("val/acc") else v) for k, v in values.items()}
        self.log_dict(values, prog_bar=stage != "test")

    def validation_metrics(self) -> set[str]:
        return {"val/loss", "val/acc_corners", *self.metrics.names("val"), *self.probe_metrics.names("val")}

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")
