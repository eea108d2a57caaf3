"""Framework overhead: Lightning + Hydra training step vs a plain PyTorch loop; CLI cold start.

(a) **Step time.** The real config is composed with Hydra (``task=roi_c1 model=supervised
task.downsample=4`` -> 64x64 tiles, phantom source, ``data.batch_size=64``, no logger, no
checkpoint callbacks) and built with ``run.build_components``/``run.build_trainer``. Inside
``trainer.fit`` the time of one step is the gap between consecutive ``on_train_batch_start``
hooks (data gather, on-device augmentation, forward, backward, optimiser, logging). The plain
loop runs the same model class from the same seed, the same SGD settings, the same batches
(same loader, same permutation) with the same augmentation functions. Rounds alternate
framework / plain so machine load hits both alike. On CPU the step is timed in process CPU
time with one torch thread (other jobs on the machine do not inflate it); on a GPU in wall
time with ``cuda.synchronize``. Target: framework / plain <= 1.10.

(b) **Cold start.** Median wall time of ``python train.py --cfg job`` (compose and print the
config) vs ``python -c "import torch, pytorch_lightning"``, alternated. Target: <= 2.0.

``MTNEURO_BENCH_QUICK=1`` shortens both. ``MTNEURO_BENCH_OVERRIDES="trainer=gpu perf.channels_last=true"``
adds overrides to the step-time config; the plain loop then uses the same ``perf.*`` options and
bf16 autocast when ``trainer.precision`` is ``bf16-mixed`` (see docs/gpu.md).
``main()`` returns the figures and a ``checks`` list.
"""

from __future__ import annotations

import itertools
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
QUICK = os.environ.get("MTNEURO_BENCH_QUICK") == "1"
OVERRIDES = [
    "task=roi_c1",
    "model=supervised",
    "task.downsample=4",
    "source=phantom",
    "data.batch_size=64",
    "logger=none",
    "callbacks=none",
    "trainer.enable_progress_bar=false",
    "trainer.limit_val_batches=0",
    "trainer.num_sanity_val_steps=0",
    "trainer.enable_model_summary=false",
    "seed=0",
]


def _compose(overrides: list[str]) -> Any:
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    from mtneuro_lab.cli import CONF_DIR, register_resolvers

    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    return cfg


class _Clock:
    """``now()`` in the unit the step is timed in (see module docstring)."""

    def __init__(self, device: torch.device, wall: bool = False) -> None:
        self.cuda = device.type == "cuda"
        self.wall = wall  # wall seconds even on CPU (what a user waits for)

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter() if self.cuda or self.wall else time.process_time()


def _framework_steps(cfg: Any, steps: int, warmup: int, clock: _Clock, run_dir: Path) -> list[float]:
    import pytorch_lightning as pl

    from mtneuro_lab import run

    stamps: list[float] = []

    class StepTimer(pl.Callback):
        def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
            stamps.append(clock.now())

        def on_train_end(self, trainer: pl.Trainer, *args: Any) -> None:
            stamps.append(clock.now())

    torch.manual_seed(0)
    comps = run.build_components(cfg)
    cfg.trainer.max_steps = warmup + steps
    trainer = run.build_trainer(cfg, run_dir, comps.method)
    trainer.callbacks.append(StepTimer())
    trainer.fit(comps.method, datamodule=comps.datamodule)
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    return gaps[warmup:]


def _plain_steps(cfg: Any, steps: int, warmup: int, clock: _Clock, device: torch.device) -> list[float]:
    """The same work without Lightning or Hydra in the loop: model, SGD, loader, augmentation."""
    from mtneuro_lab import run
    from mtneuro_lab.data import augment

    torch.manual_seed(0)
    comps = run.build_components(cfg)  # same classes and init seed; only the loop differs
    from mtneuro_lab import perf

    perf.apply(cfg.get("perf"), comps.method, comps.datamodule)
    dm, model = comps.datamodule, comps.method.to(device).train()
    bf16 = "bf16" in str(cfg.trainer.precision)
    dm.setup("fit")
    opt_cfg = model.optim_cfg
    opt = torch.optim.SGD(
        model.parameters(), lr=opt_cfg.lr, momentum=opt_cfg.momentum, weight_decay=opt_cfg.weight_decay
    )
    loader = dm.train_dataloader()
    stamps: list[float] = []
    for i, raw in enumerate(loader):
        if i >= warmup + steps:
            break
        stamps.append(clock.now())
        batch = {k: v.to(device, non_blocking=True) for k, v in raw.items()}
        x = augment.to_float(batch["image"], dm.mean, dm.std)
        x = augment.geometric([x], dm.augment_cfg)[0]
        x = augment.intensity_jitter(x, dm.augment_cfg.intensity_jitter)
        if dm.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(x), batch["target"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    stamps.append(clock.now())
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    return gaps[warmup:]


def step_time(steps: int = 10, warmup: int = 3, rounds: int = 3) -> dict[str, Any]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(1)
    clock = _Clock(device)
    overrides = OVERRIDES + ([] if device.type == "cuda" else ["trainer=cpu"])
    overrides += os.environ.get("MTNEURO_BENCH_OVERRIDES", "").split()
    cfg = _compose(overrides)
    framework: list[float] = []
    plain: list[float] = []
    with tempfile.TemporaryDirectory(prefix="bench_framework_") as tmp:
        for r in range(rounds):
            order = ("framework", "plain") if r % 2 == 0 else ("plain", "framework")
            for which in order:
                if which == "framework":
                    framework += _framework_steps(cfg, steps, warmup, clock, Path(tmp) / f"r{r}")
                else:
                    plain += _plain_steps(cfg, steps, warmup, clock, device)
    fw, pl_ = statistics.median(framework), statistics.median(plain)
    return {
        "device": device.type,
        "timing": "wall (cuda sync)" if device.type == "cuda" else "CPU, 1 thread",
        "tile": 64,
        "batch_size": 64,
        "steps_timed_each": len(framework),
        "overrides": " ".join(overrides[len(OVERRIDES) :]),
        "framework_s_per_step": fw,
        "plain_s_per_step": pl_,
        "ratio": fw / pl_,
        "framework_samples_per_s": 64 / fw,
    }


def _wall(cmd: list[str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, check=False, env={**os.environ, "PYTHONHASHSEED": "0"}
    )
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr.strip().splitlines()[-1:]}")
    return elapsed


def cold_start(repeats: int = 5) -> dict[str, Any]:
    cfg_cmd = [sys.executable, str(ROOT / "train.py"), "--cfg", "job"]
    import_cmd = [sys.executable, "-c", "import torch, pytorch_lightning"]
    _wall(import_cmd)  # warm the OS file cache for both
    _wall(cfg_cmd)
    cfg_t, imp_t = [], []
    for _ in range(repeats):
        cfg_t.append(_wall(cfg_cmd))
        imp_t.append(_wall(import_cmd))
    c, i = statistics.median(cfg_t), statistics.median(imp_t)
    return {"repeats": repeats, "train_cfg_job_s": c, "import_torch_lightning_s": i, "ratio": c / i}


def main() -> dict[str, Any]:
    step = step_time(steps=5, warmup=2, rounds=2) if QUICK else step_time()
    cold = cold_start(3 if QUICK else 5)
    checks = [
        {
            "name": "training step, framework vs plain PyTorch loop (ResNet-18, 64x64, batch 64)",
            "value": step["ratio"],
            "target": "<= 1.10",
            "passed": step["ratio"] <= 1.10,
        },
        {
            "name": "cold start, `train.py --cfg job` vs `import torch, pytorch_lightning`",
            "value": cold["ratio"],
            "target": "<= 2.0",
            "passed": cold["ratio"] <= 2.0,
        },
    ]
    return {"step_time": step, "cold_start": cold, "checks": checks}


if __name__ == "__main__":
    import json

    print(json.dumps(main(), indent=2))
