"""3D MAE figures: (a) step-time ratio mask 0.9 / 0.0; (b) MAE fine-tuning vs from scratch.

(a) One process, one thread, one model, one batch: training steps (forward, backward, AdamW
    step) at mask ratio 0.9 and 0.0 are interleaved and the median CPU time of each (process
    time, which other jobs on a shared machine barely disturb) is compared; the wall-clock
    ratio is printed too. Only ratios are meaningful; absolute times are for orientation.
(b) On the phantom EM volume (``task=snemi3d source=phantom``): a short MAE pretraining run
    through the CLI, then two fine-tuning runs with identical budgets and seeds, one from the
    pretrained ``encoder.pt`` and one from scratch; their ``test/*`` metrics are printed.

Usage::

    python benchmarks/bench_mae.py              # both parts
    python benchmarks/bench_mae.py speed        # (a) only
    python benchmarks/bench_mae.py finetune     # (b) only

``main()`` returns the figures as a dict.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from mtneuro_lab.methods.mae_pretrain import MAEPretrain
from mtneuro_lab.methods.optim import OptimizerConfig, build_optimizer

ROOT = Path(__file__).resolve().parent.parent

# (b): the short CPU budget shared by both fine-tuning runs
PRESET = "tiny"
CROP = "[6,64,64]"
PATCH = "[1,16,16]"
PRETRAIN_STEPS = 600
FINETUNE_STEPS = 150
BATCH = 4
COMMON = ("task=snemi3d", "source=phantom", f"task.crop={CROP}", f"data.batch_size={BATCH}",
          f"model.preset={PRESET}", f"model.patch_size={PATCH}", "logger=none", "trainer=cpu",
          "trainer.enable_progress_bar=false", "trainer.limit_val_batches=0", "task.eval_overlap=0.25", "seed=1")


def step_time_ratio(preset: str = "base", crop: tuple[int, int, int] = (6, 96, 96), batch: int = 4,
                    repeats: int = 4) -> dict[str, float]:
    """Median step seconds at mask 0.9 and 0.0 of one model on one batch, interleaved."""
    torch.manual_seed(0)
    model = MAEPretrain(num_classes=3, class_names=["aff_z", "aff_y", "aff_x"], input_shape=crop,
                        preset=preset, mask_ratio=0.9)
    opt = build_optimizer(model.optimizer_parameters(), OptimizerConfig(name="adamw", lr=1e-4), batch)
    x = torch.randn(batch, 1, *crop)

    def step(ratio: float) -> tuple[float, float]:
        model.mask_ratio = ratio
        cpu, wall = time.process_time(), time.perf_counter()
        loss, _, _ = model(x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return time.process_time() - cpu, time.perf_counter() - wall

    step(0.9), step(0.0)  # warm-up (allocator, kernels)
    times: dict[float, list[tuple[float, float]]] = {0.9: [], 0.0: []}
    for _ in range(repeats):
        for ratio in (0.9, 0.0):
            times[ratio].append(step(ratio))
    med = {r: [statistics.median(t[i] for t in times[r]) for i in (0, 1)] for r in times}
    return {"preset": preset, "crop": list(crop), "batch": batch, "tokens": model.encoder.num_tokens,
            "cpu_s_mask0.9": med[0.9][0], "cpu_s_mask0.0": med[0.0][0], "ratio": med[0.9][0] / med[0.0][0],
            "wall_ratio": med[0.9][1] / med[0.0][1]}


def _train(run_dir: Path, *overrides: str) -> dict[str, float]:
    args = [sys.executable, str(ROOT / "train.py"), *COMMON, *overrides, f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "PYTHONHASHSEED": "0", "WANDB_MODE": "disabled"}
    start = time.perf_counter()
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"train.py {' '.join(overrides)} failed:\n{proc.stderr[-3000:]}")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    metrics["wall_s"] = time.perf_counter() - start
    return metrics


def finetune_comparison(workdir: Path) -> dict[str, Any]:
    """Pretrain briefly, then fine-tune from the encoder and from scratch with the same budget."""
    pre = _train(workdir / "pretrain", "model=mae_pretrain", f"trainer.max_steps={PRETRAIN_STEPS}", "callbacks=none",
                 "trainer.max_epochs=-1", "model.optimizer.lr=1.5e-3", "model.optimizer.lr_scaling=none",
                 "model.scheduler.warmup_epochs=0.2", "model.decoder_dim=128", "model.decoder_heads=8")
    budget = (f"trainer.max_steps={FINETUNE_STEPS}", "trainer.max_epochs=-1", "model.optimizer.lr=1e-3",
              "model.optimizer.lr_scaling=none", "model.scheduler.warmup_epochs=0.1", "model.feature_size=16",
              "callbacks=none")
    mae = _train(workdir / "ft_mae", "model=mae_finetune", *budget,
                 f"model.pretrained={workdir / 'pretrain' / 'encoder.pt'}")
    scratch = _train(workdir / "ft_scratch", "model=mae_finetune", *budget, "model.pretrained=null")
    return {"pretrain": pre, "finetune_mae": mae, "finetune_scratch": scratch,
            "budget": {"preset": PRESET, "crop": CROP, "patch": PATCH, "batch": BATCH,
                       "pretrain_steps": PRETRAIN_STEPS, "finetune_steps": FINETUNE_STEPS}}


def main(parts: tuple[str, ...] = ("speed", "finetune")) -> dict[str, Any]:
    torch.set_num_threads(1)  # CPU time of one thread: stable under other jobs
    out: dict[str, Any] = {}
    if "speed" in parts:
        out["speed"] = [step_time_ratio("base"), step_time_ratio("base", batch=8), step_time_ratio("tiny")]
        print("## MAE step time, mask 0.9 vs 0.0 (same model, same batch, one run)\n")
        print("| preset | crop | batch | tokens | CPU s/step mask 0.9 | CPU s/step mask 0.0 | CPU ratio | wall ratio |")
        print("|---|---|---|---|---|---|---|---|")
        for r in out["speed"]:
            print(f"| {r['preset']} | {'x'.join(map(str, r['crop']))} | {r['batch']} | {r['tokens']} | "
                  f"{r['cpu_s_mask0.9']:.2f} | {r['cpu_s_mask0.0']:.2f} | **{r['ratio']:.3f}** | {r['wall_ratio']:.3f} |")
        print()
    if "finetune" in parts:
        with tempfile.TemporaryDirectory(prefix="bench_mae_") as tmp:
            res = finetune_comparison(Path(tmp))
        out["finetune"] = res
        print("## Phantom EM: fine-tuning from the MAE encoder vs from scratch\n")
        print(f"budget: {json.dumps(res['budget'])}; pretrain test/loss {res['pretrain'].get('test/loss', float('nan')):.4f}"
              f" ({res['pretrain']['wall_s']:.0f} s)\n")
        keys = ["test/arand", "test/voi_split", "test/voi_merge", "test/ap50", "test/ap75"]
        print("| init | " + " | ".join(keys) + " | wall s |")
        print("|---" * (len(keys) + 2) + "|")
        for name in ("finetune_mae", "finetune_scratch"):
            m = res[name]
            print(f"| {name.split('_')[1]} | " + " | ".join(f"{m.get(k, float('nan')):.4f}" for k in keys)
                  + f" | {m['wall_s']:.0f} |")
    return out


if __name__ == "__main__":
    main(tuple(sys.argv[1:]) or ("speed", "finetune"))
