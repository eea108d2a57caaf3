"""Task 2 benchmark: short CPU runs of the segmentation tasks on the phantom, plus 3D memory.

Figures (all measured in this one invocation, printed as a Markdown table):

* ``seg2d_3class`` / ``seg2d_4class`` with ``unet2d`` (resnet18 encoder, no pretrained weights)
  and ``seg3d_3class`` with a 3D model, each through ``train.py`` (test metrics from
  ``metrics.json``);
* for the 2D 3-class run, ``iou_mean`` pooled over the test split (what we report) next to the
  per-image average (the original code's way), from the same predictions;
* peak RSS of one training step of each 3D model on a ``1x1x8x256x256`` batch, each in a fresh
  subprocess.

Usage: ``.venv/bin/python benchmarks/bench_seg.py [--epochs 2] [--batches 30] [--out /tmp/bench_seg]``
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

#: one intra-op thread per run: on a small shared CPU, OpenMP spin-waiting of 2 threads cost
#: ~10x the CPU time per step in our measurements (set OMP_NUM_THREADS to change it)
THREADS = os.environ.get("OMP_NUM_THREADS", "1")
COMMON = ["task.downsample=4", "logger=none", "trainer=cpu", "trainer.enable_progress_bar=false",
          "data.batch_size=16"]

_MEMORY_SNIPPET = """
import resource, sys, torch
from mtneuro_lab.methods.segmentation import Volumetric3DSegmentation
torch.manual_seed(0)
m = Volumetric3DSegmentation(3, ["bg_axon", "vessel", "cell"], (8, 256, 256), arch=sys.argv[1])
opt = torch.optim.Adam(m.parameters(), lr=1e-3)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
x = torch.randn(1, 1, 8, 256, 256)
y = torch.randint(0, 3, (1, 8, 256, 256))
loss = m.loss(m(x), y)
loss.backward()
opt.step()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(before / 2**20, peak / 2**20, sum(p.numel() for p in m.parameters()))
"""


def train_run(name: str, overrides: list[str], out: Path) -> dict[str, float]:
    run_dir = out / name
    cmd = [sys.executable, str(ROOT / "train.py"), *COMMON, *overrides, f"hydra.run.dir={run_dir}"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": THREADS})
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{proc.stderr[-3000:]}")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    metrics["wall_s"] = time.perf_counter() - start
    metrics["command"] = " ".join(["python train.py", *COMMON, *overrides])  # type: ignore[assignment]
    return metrics


def pooled_vs_per_image(run_dir: Path) -> dict[str, float]:
    """Recompute test IoU from the best checkpoint: pooled confusion vs per-image average."""
    import torch
    from omegaconf import OmegaConf

    from mtneuro_lab.cli import register_resolvers
    from mtneuro_lab.metrics.segmentation import nanmean, scores_from_confusion
    from mtneuro_lab.run import build_components

    register_resolvers()
    cfg = OmegaConf.load(run_dir / "config.yaml")
    comps = build_components(cfg)
    ckpt = sorted((run_dir / "checkpoints").glob("epoch*.ckpt"))[-1]
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    comps.method.load_state_dict(state["state_dict"])
    dm = comps.datamodule
    dm.setup("test")
    arr = dm.arrays["test"]
    preds = comps.method.predict_arrays(arr.images, dm.mean, dm.std, batch=32)
    k = comps.method.num_classes

    def confusion(t: np.ndarray, p: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.bincount(t.ravel().astype(np.int64) * k + p.ravel(), minlength=k * k).reshape(k, k))

    pooled = nanmean(scores_from_confusion(confusion(arr.targets, preds))["iou"]).item()
    per_image = [nanmean(scores_from_confusion(confusion(t, p))["iou"]).item() for t, p in zip(arr.targets, preds)]
    return {"iou_mean_pooled": pooled, "iou_mean_per_image": float(np.nanmean(per_image))}


def memory_3d(arch: str) -> dict[str, float]:
    proc = subprocess.run([sys.executable, "-c", _MEMORY_SNIPPET, arch], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": THREADS})
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1]}  # type: ignore[dict-item]
    before, peak, params = proc.stdout.split()
    return {"rss_before_gib": float(before), "peak_rss_gib": float(peak), "params": int(params)}


def main(argv: list[str] | None = None) -> dict[str, dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batches", type=int, default=30, help="trainer.limit_train_batches per epoch")
    parser.add_argument("--model3d", default="unet3d", choices=["unet3d", "vnet_light", "highresnet"])
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench_seg"))
    parser.add_argument("--skip-train", action="store_true", help="only the memory figures")
    args = parser.parse_args(argv)
    figures: dict[str, dict] = {}
    budget = [f"trainer.max_epochs={args.epochs}", f"trainer.limit_train_batches={args.batches}"]
    if not args.skip_train:
        # ce_dice: with plain cross-entropy, 60 steps on 90 % background collapsed to all-background
        two_d = ["model=unet2d", "model.encoder_name=resnet18", "model.loss=ce_dice", *budget]
        figures["seg2d_3class/unet2d"] = train_run("seg2d_3class_unet2d", ["task=seg2d_3class", *two_d], args.out)
        figures["seg2d_3class/unet2d"].update(pooled_vs_per_image(args.out / "seg2d_3class_unet2d"))
        figures["seg2d_4class/unet2d"] = train_run("seg2d_4class_unet2d", ["task=seg2d_4class", *two_d], args.out)
        three_d = [f"model={args.model3d}", "model.loss=ce_dice", "data.batch_size=4", *budget]
        figures[f"seg3d_3class/{args.model3d}"] = train_run(f"seg3d_3class_{args.model3d}",
                                                            ["task=seg3d_3class", *three_d], args.out)
    for arch in ("unet3d", "vnet_light", "highresnet"):
        figures[f"memory/{arch}"] = memory_3d(arch)
    print_table(figures)
    return figures


def print_table(figures: dict[str, dict]) -> None:
    print("| run | test/iou_mean | test/f1_mean | per-class IoU | wall s |")
    print("|---|---|---|---|---|")
    for name, m in figures.items():
        if name.startswith("memory/"):
            continue
        per_class = ", ".join(f"{k[9:]} {v:.3f}" for k, v in m.items()
                              if k.startswith("test/iou_") and k != "test/iou_mean")
        print(f"| {name} | {m['test/iou_mean']:.3f} | {m['test/f1_mean']:.3f} | {per_class} | {m['wall_s']:.0f} |")
    for name, m in figures.items():
        if "iou_mean_per_image" in m:
            print(f"\n{name}: iou_mean pooled {m['iou_mean_pooled']:.3f} vs per-image average "
                  f"{m['iou_mean_per_image']:.3f}")
    print("\n| 3D model, one step on 1x1x8x256x256 | params | RSS before step GiB | peak RSS GiB |")
    print("|---|---|---|---|")
    for name, m in figures.items():
        if name.startswith("memory/"):
            if "error" in m:
                print(f"| {name[7:]} | - | - | failed: {m['error']} |")
            else:
                print(f"| {name[7:]} | {m['params']:,} | {m['rss_before_gib']:.2f} | {m['peak_rss_gib']:.2f} |")
    for name, m in figures.items():
        if "command" in m:
            print(f"\n{name}: {m['command']}")


if __name__ == "__main__":
    main()
