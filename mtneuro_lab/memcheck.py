"""Peak memory of one training step, estimated before any work (``perf.memory_check``).

A run whose batch does not fit is ended by the kernel's OOM killer (on CPU) or by a CUDA
out-of-memory error, minutes or hours after it started. The preflight instead runs the method's
forward and backward on the *meta* device (shapes only: no data, no arithmetic) with the
configured batch and half of it, and follows every tensor's storage from allocation to release
(:class:`PeakTracker`): the peak of live bytes is what the step needs besides the parameters.
Parameters, their gradients and the optimiser's state (SGD momentum: one copy, Adam: two) are
added, and the sum is scaled by :data:`ALLOCATOR_OVERHEAD` (the allocator keeps freed blocks;
measured by ``benchmarks/bench_memcheck.py``). The two batch sizes give a line
``bytes = fixed + per_sample * batch``, hence the largest batch that fits. Inference
(validation/test, ``data.eval_batch_size``) is checked the same way without gradients.

A method the probe cannot run on the meta device (data-dependent shapes, ``.item()``) is
skipped with a warning. Opt out with ``perf.memory_check=false``.

The probe costs about a second of CPU; its estimate is kept per process for the same network,
model and task settings, sample shape and batches (:func:`cached_estimate`), so the jobs of a
sweep that differ only in seed or learning rate pay it once.
"""

from __future__ import annotations

import logging
import math
import os
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from mtneuro_lab.errors import ConfigError

log = logging.getLogger(__name__)

#: measured peak RSS growth of a CPU training step / the tracked tensor bytes, rounded up above the
#: largest ratio bench_memcheck.py measured (an estimate that runs low lets the OOM killer in)
ALLOCATOR_OVERHEAD = 1.6
#: share of the available memory a run may plan to use (the data splits, Python and libraries need the rest)
USABLE = 0.9
#: optimiser state, in copies of the parameters
OPTIMIZER_COPIES = {"sgd": 1, "adam": 2, "adamw": 2}


class PeakTracker(TorchDispatchMode):
    """Live bytes of every tensor storage created inside the mode, and their peak."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self._sizes: dict[int, int] = {}

    def _track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = id(storage)
        if key in self._sizes:  # a view of a storage already counted
            return
        size = storage.nbytes()
        self._sizes[key] = size
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._release, key)

    def _release(self, key: int) -> None:
        self.live -= self._sizes.pop(key, 0)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for item in tree_flatten(out)[0]:
            if isinstance(item, torch.Tensor):
                self._track(item)
        return out


def _loss_of(output: Any) -> torch.Tensor:
    """A scalar that depends on every floating output (MAE returns ``(loss, pred, mask)``)."""
    floats = [t for t in tree_flatten(output)[0] if isinstance(t, torch.Tensor) and t.is_floating_point()]
    return torch.stack([t.float().sum() for t in floats]).sum() if floats else torch.zeros(())


def probe_bytes(method: torch.nn.Module, batch: int, sample_shape: tuple[int, ...], train: bool) -> int:
    """Peak bytes created by one forward (+ backward when ``train``) of ``batch`` samples on the
    meta device; ``method`` must already live there."""
    x = torch.empty((batch, 1, *sample_shape), device="meta")
    method.train(train)
    for p in method.parameters():
        p.grad = None
    with torch.set_grad_enabled(train), PeakTracker() as tracker:
        out = method(x)
        if train:
            _loss_of(out).backward()
        del out
    for p in method.parameters():
        p.grad = None
    return tracker.peak


@dataclass
class Line:
    """``bytes(batch) = fixed + per_sample * batch`` (fitted on two probes)."""

    fixed: float
    per_sample: float

    def at(self, batch: float) -> float:
        return self.fixed + self.per_sample * batch

    def largest(self, budget: float) -> int:
        return int(math.floor((budget - self.fixed) / self.per_sample)) if self.per_sample > 0 else 0


def fit_line(probe: Callable[[int], float], batch: int) -> Line:
    half = max(batch // 2, 1)
    hi, lo = probe(batch), probe(half)
    if batch == half:
        return Line(0.0, hi / batch)
    slope = max((hi - lo) / (batch - half), 0.0)
    return Line(hi - slope * batch, slope)


def available_bytes(device: str) -> int | None:
    """Free memory of the device: CUDA's free bytes, else MemAvailable within any cgroup limit."""
    if device == "cuda":
        cuda_free, _ = torch.cuda.mem_get_info()
        return int(cuda_free)
    try:
        meminfo = Path("/proc/meminfo").read_text()
    except OSError:
        return None
    free = next((int(ln.split()[1]) * 1024 for ln in meminfo.splitlines() if ln.startswith("MemAvailable:")), None)
    limit_file, usage_file = Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory.current")
    try:
        limit = limit_file.read_text().strip()
        if limit != "max" and free is not None:
            free = min(free, int(limit) - int(usage_file.read_text().strip()))
    except (OSError, ValueError):
        pass
    return free


def _device_and_ranks(trainer_cfg: Any) -> tuple[str | None, int]:
    """``cuda`` or ``cpu`` (None: a device this check does not know) and the processes per device pool."""
    accel = str(trainer_cfg.get("accelerator", "auto"))
    devices = trainer_cfg.get("devices", 1)
    cuda = torch.cuda.is_available()
    if accel in ("gpu", "cuda") or (accel == "auto" and cuda):
        return ("cuda", 1) if cuda else (None, 1)
    if accel not in ("cpu", "auto"):
        return None, 1
    ranks = int(devices) if isinstance(devices, int) and devices > 0 else os.cpu_count() or 1
    return "cpu", ranks if str(trainer_cfg.get("strategy", "auto")).startswith("ddp") else 1


def _gb(n: float) -> str:
    return f"{n / 2**30:.1f} GB" if n >= 2**30 else f"{n / 2**20:.0f} MB"


@dataclass
class Estimate:
    """Bytes of one process: parameters, optimiser state and the two fitted activation lines."""

    params: int
    state: int
    train: Line
    infer: Line

    def train_bytes(self, batch: int) -> float:
        return self.params + ALLOCATOR_OVERHEAD * (self.train.at(batch) + self.state)

    def infer_bytes(self, batch: int) -> float:
        return self.params + ALLOCATOR_OVERHEAD * self.infer.at(batch)


def estimate(
    method: torch.nn.Module, sample_shape: tuple[int, ...], batch: int, eval_batch: int, mixed: bool = False
) -> Estimate:
    """Probe ``method`` (moved to the meta device) at ``batch``/``eval_batch`` and half of each.

    Raises whatever the method raises on the meta device (data-dependent code).
    """
    method.to("meta")
    train = fit_line(lambda b: probe_bytes(method, b, sample_shape, True), batch)
    infer = fit_line(lambda b: probe_bytes(method, b, sample_shape, False), eval_batch)
    params = sum(p.numel() * p.element_size() for p in method.parameters())
    params += sum(b.numel() * b.element_size() for b in method.buffers())
    name = str(getattr(getattr(method, "optim_cfg", None), "name", "sgd"))
    if mixed:  # 16-bit activations
        train = Line(train.fixed, train.per_sample / 2)
        infer = Line(infer.fixed, infer.per_sample / 2)
    return Estimate(params, params * OPTIMIZER_COPIES.get(name, 2), train, infer)


#: estimates of this process, by what determines them (:func:`cached_estimate`)
_ESTIMATES: dict[tuple, Estimate] = {}
_MAX_ESTIMATES = 64


def cached_estimate(
    cfg: Any, method: torch.nn.Module, sample_shape: tuple[int, ...], batch: int, eval_batch: int, mixed: bool
) -> Estimate:
    """:func:`estimate`, kept per process. The key is what the activations depend on: the network
    (``repr`` names every layer with its sizes and strides), the model and task settings (options
    that are attributes, not layers, such as a mask ratio), the sample shape and the batches."""
    settings = tuple(
        OmegaConf.to_yaml(cfg[k], resolve=True) if k in cfg and cfg[k] is not None else "" for k in ("model", "task")
    )
    key = (type(method).__qualname__, repr(method), settings, tuple(sample_shape), batch, eval_batch, mixed)
    if key not in _ESTIMATES:
        if len(_ESTIMATES) >= _MAX_ESTIMATES:
            _ESTIMATES.pop(next(iter(_ESTIMATES)))
        _ESTIMATES[key] = estimate(method, sample_shape, batch, eval_batch, mixed)
    return _ESTIMATES[key]


def check_memory(cfg: Any, method: torch.nn.Module, sample_shape: tuple[int, ...]) -> None:
    """Refuse (one line naming the batch key) a batch whose training or inference step does not fit.

    ``method`` is moved to the meta device: pass the preflight's own, throw-away instance.
    """
    device, ranks = _device_and_ranks(cfg.trainer)
    if device is None:
        log.info("memory check: skipped for trainer.accelerator=%s", cfg.trainer.get("accelerator"))
        return
    available = available_bytes(device)
    if available is None:
        return
    budget = available * USABLE
    batch = int(cfg.data.batch_size)
    eval_batch = int(cfg.data.get("eval_batch_size") or batch)
    per_rank, eval_per_rank = max(batch // ranks, 1), max(eval_batch // ranks, 1)
    mixed = str(cfg.trainer.get("precision", "32")).endswith("-mixed")
    try:
        est = cached_estimate(cfg, method, sample_shape, per_rank, eval_per_rank, mixed)
    except Exception as err:  # noqa: BLE001 - data-dependent code: the probe cannot tell, the run may
        log.warning(
            "memory check: skipped, %s cannot run on the meta device (%s: %s)",
            type(method).__name__,
            type(err).__name__,
            str(err).splitlines()[0] if str(err) else "",
        )
        return
    # every rank holds its own copy of the model; all ranks share the machine's memory on CPU
    need_train = ranks * est.train_bytes(per_rank)
    need_infer = ranks * est.infer_bytes(eval_per_rank)
    log.info(
        "memory check: one training step ~%s, inference ~%s, %s available",
        _gb(need_train),
        _gb(need_infer),
        _gb(budget),
    )
    shape = "x".join(map(str, sample_shape))
    for key, need, line, fixed, size in (
        ("data.batch_size", need_train, est.train, est.params + ALLOCATOR_OVERHEAD * est.state, batch),
        ("data.eval_batch_size", need_infer, est.infer, est.params, eval_batch),
    ):
        if need <= budget:
            continue
        per_rank_budget = budget / ranks - fixed
        largest = max(
            Line(ALLOCATOR_OVERHEAD * line.fixed, ALLOCATOR_OVERHEAD * line.per_sample).largest(per_rank_budget), 0
        )
        largest *= ranks
        what = "one training step" if key == "data.batch_size" else "one inference batch"
        hint = (
            f"the largest batch that fits is about {largest}"
            if largest >= 1
            else "not even one sample fits: use a larger task.downsample or a smaller model"
        )
        raise ConfigError(
            f"{key}: {what} of {size} samples of {shape} needs about {_gb(need)} but {_gb(budget)} are "
            f"available; {hint} (perf.memory_check=false skips this check)"
        )
