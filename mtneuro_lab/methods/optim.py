"""Optimiser and schedule construction shared by every method.

Learning-rate scaling happens here and only here: with ``lr_scaling="linear"`` the rate used is
``lr * global_batch / reference_batch`` (Goyal et al. 2017), with ``"sqrt"`` it is
``lr * sqrt(global_batch / reference_batch)``, and with ``"none"`` (default, the paper's
setting) it is ``lr`` unchanged. ``global_batch`` is ``data.batch_size`` (the global batch).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from mtneuro_lab.errors import ConfigError


@dataclass
class OptimizerConfig:
    name: str = "sgd"  # sgd | adam | adamw
    lr: float = 0.03
    weight_decay: float = 5e-4
    momentum: float = 0.9
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    lr_scaling: str = "none"  # none | linear | sqrt
    reference_batch: int = 256

    def __post_init__(self) -> None:
        if self.name not in ("sgd", "adam", "adamw"):
            raise ConfigError(f"model.optimizer.name: must be one of sgd, adam, adamw, got {self.name!r}")
        if not self.lr > 0:
            raise ConfigError(f"model.optimizer.lr: must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ConfigError(f"model.optimizer.weight_decay: must be >= 0, got {self.weight_decay}")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"model.optimizer.momentum: must be in [0, 1), got {self.momentum}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"model.optimizer.betas: must be two values in [0, 1), got {list(self.betas)}")
        if self.lr_scaling not in ("none", "linear", "sqrt"):
            raise ConfigError(f"model.optimizer.lr_scaling: must be none, linear or sqrt, got {self.lr_scaling!r}")
        if self.reference_batch < 1:
            raise ConfigError(f"model.optimizer.reference_batch: must be >= 1, got {self.reference_batch}")


@dataclass
class SchedulerConfig:
    name: str = "cosine"  # none | cosine | step
    warmup_epochs: float = 0.0
    min_lr_ratio: float = 0.0
    step_epochs: int = 30
    gamma: float = 0.1

    def __post_init__(self) -> None:
        if self.name not in ("none", "cosine", "step"):
            raise ConfigError(f"model.scheduler.name: must be none, cosine or step, got {self.name!r}")
        if self.warmup_epochs < 0:
            raise ConfigError(f"model.scheduler.warmup_epochs: must be >= 0, got {self.warmup_epochs}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"model.scheduler.min_lr_ratio: must be in [0, 1], got {self.min_lr_ratio}")


def scaled_lr(cfg: OptimizerConfig, global_batch: int) -> float:
    """The learning rate actually used for ``global_batch`` (see module docstring)."""
    ratio = global_batch / cfg.reference_batch
    if cfg.lr_scaling == "linear":
        return cfg.lr * ratio
    if cfg.lr_scaling == "sqrt":
        return cfg.lr * math.sqrt(ratio)
    return cfg.lr


def build_optimizer(params: Iterable, cfg: OptimizerConfig, global_batch: int) -> torch.optim.Optimizer:
    """Parameter groups may carry ``lr_scale`` (e.g. layer-wise decay): their rate is ``lr * lr_scale``."""
    lr = scaled_lr(cfg, global_batch)
    betas = (cfg.betas[0], cfg.betas[1])  # two values: checked by OptimizerConfig
    opt: torch.optim.Optimizer
    if cfg.name == "sgd":
        opt = torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    elif cfg.name == "adam":
        opt = torch.optim.Adam(params, lr=lr, betas=betas, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=cfg.weight_decay)
    for group in opt.param_groups:
        if "lr_scale" in group:
            group["lr"] = lr * float(group["lr_scale"])
    return opt


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: SchedulerConfig, total_steps: int, steps_per_epoch: int
) -> dict | None:
    """Per-step LambdaLR: linear warm-up then cosine (or step) decay over the real step count."""
    if cfg.name == "none":
        return None
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    total = max(total_steps, 1)

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if cfg.name == "step":
            return cfg.gamma ** ((step // max(steps_per_epoch, 1)) // max(cfg.step_epochs, 1))
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return {"scheduler": scheduler, "interval": "step"}
