"""GPU performance options (``perf.*``): channels-last, ``torch.compile``, splits kept on the device.

All are off by default: on CPU they buy nothing (channels-last and compile can even be slower,
and ``torch.compile`` costs tens of seconds of start-up), and a run must give the same numbers
whatever the machine. On a GPU, with ``trainer=gpu`` (bf16 mixed precision):

* ``perf.channels_last=true``: 2D networks and their input batches use NHWC memory, which tensor
  cores want for convolutions (3D networks and batches: ``channels_last_3d``);
* ``perf.compile=true`` (``perf.compile_mode=default|reduce-overhead|max-autotune``): every
  top-level sub-network of the method is compiled in place (``nn.Module.compile``), so parameter
  names, checkpoints and ``evaluate.py`` stay the same as without compiling;
* ``perf.data_on_device=true``: the uint8 splits (Task 1: a few tens of MB) are copied to the
  accelerator once, and batches are gathered there: no host-to-device copy per step.

Everything is applied in one place, :func:`apply`, called by ``run.train``/``run.evaluate``
after the components are built. See docs/gpu.md.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from mtneuro_lab.config.schema import merge_dataclass
from mtneuro_lab.config.sections import PerfConfig
from mtneuro_lab.errors import ConfigError

log = logging.getLogger(__name__)


def as_perf_config(value: Any) -> PerfConfig:
    """``cfg.perf`` (mapping, dataclass or absent, as in configs saved before ``perf`` existed)."""
    if isinstance(value, PerfConfig):
        return value
    if value is None:
        return PerfConfig()
    return merge_dataclass(PerfConfig, value, "perf")


def sub_networks(method: nn.Module) -> list[tuple[str, nn.Module]]:
    """Top-level children that hold parameters: the networks a method's steps call."""
    return [(name, child) for name, child in method.named_children() if any(True for _ in child.parameters())]


def to_channels_last(module: nn.Module) -> None:
    """NHWC (4D) / NDHWC (5D) storage of conv weights, in place; other parameters are untouched."""
    for param in module.parameters():
        if param.dim() == 4:
            param.data = param.data.contiguous(memory_format=torch.channels_last)
        elif param.dim() == 5:
            param.data = param.data.contiguous(memory_format=torch.channels_last_3d)


def apply(perf_cfg: Any, method: nn.Module, datamodule: Any) -> PerfConfig:
    """Apply ``perf.*`` to a built method and datamodule (before ``trainer.fit``/``test``)."""
    perf = as_perf_config(perf_cfg)
    if perf.channels_last:
        to_channels_last(method)
        if hasattr(datamodule, "channels_last"):
            datamodule.channels_last = True
    if perf.data_on_device:
        if not hasattr(datamodule, "data_on_device"):
            raise ConfigError(
                f"perf.data_on_device: not supported by {type(datamodule).__name__}; "
                f"use perf.data_on_device=false with this task"
            )
        datamodule.data_on_device = True
    if perf.compile:
        compiled = []
        for name, child in sub_networks(method):
            child.compile(mode=perf.compile_mode)
            compiled.append(name)
        log.info("perf.compile: compiled %s (mode %s)", ", ".join(compiled) or "nothing", perf.compile_mode)
    return perf
