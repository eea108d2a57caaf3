"""Task 2 benchmark: short CPU runs of the segmentation tasks on the phantom, plus 3D memory.

Writes two blocks of ``docs/task2.md`` (``benchmarks/doc_blocks.py``), so no figure there is
typed by hand:

* ``task2_hparams``: the default lr / batch size / optimizer / epochs of every (task, model) pair
  that has a ``mtneuro_lab/conf/paper_hparams/`` file (the paper's Table A4), read from the composed configs;
* ``task2_seg``: per (task, model), through ``train.py`` with a CPU recipe (**not** the defaults:
  resnet18 encoder, small inputs, few epochs), the validation metric that chose the checkpoint
  (``selection/*`` and ``best_epoch`` of ``metrics.json``), test IoU (mean and per class), wall
  time and the command; the pooled-vs-per-image test IoU of the first run's predictions; peak
  RSS of one training step of each 3D model on a ``1x1x8x256x256`` batch, each in a fresh
  subprocess; and, when ``../shared/data/isbi2012`` exists, one real-EM run.

Usage: ``.venv/bin/python benchmarks/bench_seg.py [--seeds 1,2] [--epochs N --batches N --eval-batches N]
[--out DIR] [--doc docs/task2.md] [--hparams-only] [--skip-train]``
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.doc_blocks import write_block  # noqa: E402
from mtneuro_lab.analysis.tables import mean_std  # noqa: E402
from mtneuro_lab.data.sources.phantom_tissue import GENERATOR_REVISION  # noqa: E402

DOC = ROOT / "docs" / "task2.md"
ISBI_DATA = ROOT.parent / "shared" / "data" / "isbi2012"
#: one intra-op thread per run: on a small shared CPU, OpenMP spin-waiting of 2 threads cost
#: ~10x the CPU time per step in our measurements (set OMP_NUM_THREADS to change it)
THREADS = os.environ.get("OMP_NUM_THREADS", "1")
COMMON = ["logger=none", "trainer=cpu", "trainer.enable_progress_bar=false"]
#: the CPU recipe, which replaces the paper's defaults (efficientnet-b7, Table A4 lr and batch):
#: from-scratch resnet18 at the paper's lr 1e-3 for its small batch; ce_dice because plain
#: cross-entropy collapsed to all-background in 60 steps on ~90 % background
RECIPE_2D = ("model.encoder_name=resnet18", "model.loss=ce_dice", "data.batch_size=16", "model.optimizer.lr=0.001")
RECIPE_3D = ("model.loss=ce_dice", "data.batch_size=4", "model.optimizer.lr=0.001")
#: (task, model) pairs whose defaults come from mtneuro_lab/conf/paper_hparams/ (MTNeuro Table A4)
TABLE_A4_TASKS = {"seg2d_3class": "2d", "seg2d_4class": "2d", "seg3d_3class": "3d", "seg3d_4class": "3d"}
MODELS = {"2d": ("unet2d", "manet", "fpn", "unetpp", "pan", "pspnet"), "3d": ("unet3d", "vnet_light", "highresnet")}

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


# -- the defaults table (Table A4), rendered from the composed configs --------------------------
def _compose(overrides: list[str]) -> Any:
    from hydra import compose, initialize_config_dir

    from mtneuro_lab.cli import CONF_DIR, register_resolvers

    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def paper_hparams() -> dict[tuple[str, str], dict[str, Any]]:
    """(task, model) -> lr, batch size, optimizer, epochs and provenance, as a run would get them."""
    out = {}
    for task, dims in TABLE_A4_TASKS.items():
        for model in MODELS[dims]:
            cfg = _compose([f"task={task}", f"model={model}"])
            out[(task, model)] = {
                "lr": float(cfg.model.optimizer.lr),
                "batch_size": int(cfg.data.batch_size),
                "optimizer": str(cfg.model.optimizer.name),
                "max_epochs": int(cfg.trainer.max_epochs),
                "from": cfg.get("hparams_from"),
            }
    return out


def paper_hparams_table(hparams: dict[tuple[str, str], dict[str, Any]] | None = None) -> str:
    """Markdown: one row per model, lr and batch size for 3 and 4 classes (Table A4's layout)."""
    hparams = paper_hparams() if hparams is None else hparams
    lines = [
        "| model | 3 classes: lr, batch size | 4 classes: lr, batch size | optimizer, epochs |",
        "|---|---|---|---|",
    ]
    for dims, models in MODELS.items():
        for model in models:
            cells, rest = [], set()
            for classes in (3, 4):
                h = hparams[(f"seg{dims}_{classes}class", model)]
                cells.append(f"{h['lr']:g}, {h['batch_size']}")
                rest.add(f"{h['optimizer']}, {h['max_epochs']}")
            lines.append(f"| `{model}` ({dims.upper()}) | {' | '.join(cells)} | {'; '.join(sorted(rest))} |")
    return "\n".join(lines)


# -- training runs ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Run:
    """One benchmarked (task, model) with its CPU recipe and budget."""

    task: str
    model: str
    epochs: int
    downsample: int
    recipe: tuple[str, ...]

    def overrides(self, seed: int, limits: Sequence[str]) -> list[str]:
        return [
            f"task={self.task}",
            f"model={self.model}",
            f"task.downsample={self.downsample}",
            f"trainer.max_epochs={self.epochs}",
            *self.recipe,
            *limits,
            f"seed={seed}",
        ]

    def budget(self, limits: Sequence[str]) -> str:
        size = (512 if self.task == "isbi2012" else 256) // self.downsample
        depth = "8x" if self.task.startswith("seg3d") else ""
        epochs = f"{self.epochs} epoch{'s' * (self.epochs != 1)}"
        return ", ".join([epochs, f"{depth}{size}x{size}", *self.recipe, *limits])


RUNS = (
    Run("seg2d_3class", "unet2d", 10, 2, RECIPE_2D),
    Run("seg2d_4class", "unet2d", 6, 4, RECIPE_2D),
    Run("seg3d_3class", "unet3d", 6, 4, RECIPE_3D),
)
ISBI_RUN = Run("isbi2012", "unet2d", 12, 4, ("model.encoder_name=resnet18", "model.loss=ce", "data.batch_size=4"))


def train_run(run_dir: Path, overrides: list[str]) -> dict[str, Any]:
    """``train.py`` in a subprocess; its ``metrics.json`` plus wall time."""
    cmd = [sys.executable, str(ROOT / "train.py"), *COMMON, *overrides, f"hydra.run.dir={run_dir}"]
    start = time.perf_counter()
    proc = subprocess.run(
        cmd,
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": THREADS},
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{run_dir.name} failed:\n{proc.stderr[-3000:]}")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    metrics["wall_s"] = time.perf_counter() - start
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


def memory_3d(arch: str) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-c", _MEMORY_SNIPPET, arch],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": THREADS},
    )
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1]}
    before, peak, params = proc.stdout.split()
    return {"rss_before_gib": float(before), "peak_rss_gib": float(peak), "params": int(params)}


# -- Markdown ---------------------------------------------------------------------------------
def _stat(values: Sequence[Any], digits: int = 3) -> str:
    """``mean`` for one seed, ``mean ± std`` for more; ``-`` when no run recorded the value."""
    nums = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if not nums:
        return "-"
    mean, std, n = mean_std(nums)
    return f"{mean:.{digits}f}" if n < 2 or math.isnan(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def result_row(run: Run, seeds: Sequence[int], results: list[dict[str, Any]], limits: Sequence[str]) -> str:
    """One table row over the seeds of ``run``; selection keys read with .get() (older runs lack them)."""
    metric = sorted({str(r.get("selection/metric", "-")) for r in results})
    classes = [k for k in results[0] if k.startswith("test/iou_") and k != "test/iou_mean"]
    per_class = ", ".join(f"{k[9:]} {_stat([r.get(k) for r in results])}" for k in classes)
    best_epochs = ", ".join(str(r.get("best_epoch", "-")) for r in results)
    return (
        f"| `{run.model}` | `{run.task}` | {run.budget(limits)} | {', '.join(map(str, seeds))} | "
        f"{', '.join(metric)} {_stat([r.get('selection/value') for r in results])} | {best_epochs} | "
        f"**{_stat([r.get('test/iou_mean') for r in results])}** | {per_class} | "
        f"{_stat([r['wall_s'] / 60 for r in results], 1)} min |"
    )


def results_markdown(figures: dict[str, Any]) -> str:
    lines = [
        "CPU recipe, **not the defaults** (those are the paper's: efficientnet-b7, Table A4 lr and "
        "batch size, 20 epochs, 128x128): the overrides are listed per row; `COMMON` "
        f"= `{' '.join(COMMON)}`; phantom data, no pretrained weights.",
        "",
        "| model | task | budget and recipe | seeds | checkpoint chosen by (val) | best epoch | test/iou_mean "
        "| per-class test IoU | wall time per run |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [row["row"] for row in figures["runs"].values()]
    pooled = figures.get("pooled_vs_per_image")
    if pooled:
        lines += [
            "",
            f"Same predictions ({pooled['run']}, best checkpoint, whole test split): test `iou_mean` pooled "
            f"{pooled['iou_mean_pooled']:.3f} (what we report) vs per-image average "
            f"{pooled['iou_mean_per_image']:.3f} (the original code's way).",
        ]
    lines += [
        "",
        "| 3D model, one training step on 1x1x8x256x256 | parameters | RSS before the step | peak RSS |",
        "|---|---|---|---|",
    ]
    for arch, m in figures["memory"].items():
        if "error" in m:
            lines.append(f"| {arch} | - | - | failed: {m['error']} |")
        else:
            lines.append(f"| {arch} | {m['params']:,} | {m['rss_before_gib']:.2f} GiB | {m['peak_rss_gib']:.2f} GiB |")
    lines += ["", "Commands (`python train.py ...`; shown for the first seed, the others differ in `seed=`):", ""]
    lines += [f"* `{' '.join([*COMMON, *row['command']])}`" for row in figures["runs"].values()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="1", help="comma-separated training seeds, e.g. 1,100,350")
    parser.add_argument("--epochs", type=int, default=None, help="replace every run's epochs (a quick check)")
    parser.add_argument("--batches", type=int, default=None, help="trainer.limit_train_batches per epoch")
    parser.add_argument("--eval-batches", type=int, default=None, help="trainer.limit_{val,test}_batches")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="keep the run directories here (default: a temporary directory, deleted at the end)",
    )
    parser.add_argument("--doc", type=Path, default=DOC, help="Markdown file that gets the tables")
    parser.add_argument("--hparams-only", action="store_true", help="only the defaults table (no training)")
    parser.add_argument("--skip-train", action="store_true", help="only the memory figures, printed")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    table = paper_hparams_table()
    write_block(
        args.doc,
        "task2_hparams",
        table,
        time.perf_counter() - start,
        {"source": "the composed configs of mtneuro_lab/conf/paper_hparams/ (MTNeuro Table A4)"},
    )
    figures: dict[str, Any] = {"hparams_table": table, "runs": {}}
    if args.hparams_only:
        print(table)
        return figures
    seeds = [int(s) for s in args.seeds.split(",")]
    quick = bool(os.environ.get("MTNEURO_BENCH_QUICK"))  # make bench --quick: printed, not written to the doc
    if quick:
        args.epochs, args.batches, args.eval_batches = args.epochs or 1, args.batches or 2, args.eval_batches or 1
    limits = [f"trainer.limit_train_batches={args.batches}"] if args.batches else []
    if args.eval_batches:
        limits += [f"trainer.limit_val_batches={args.eval_batches}", f"trainer.limit_test_batches={args.eval_batches}"]
    runs = list(RUNS) + ([ISBI_RUN] if ISBI_DATA.is_dir() else [])
    if args.epochs:
        runs = [Run(r.task, r.model, args.epochs, r.downsample, r.recipe) for r in runs]
    out = args.out or Path(tempfile.mkdtemp(prefix="bench_seg-"))
    start = time.perf_counter()
    try:
        for run in [] if args.skip_train else runs:
            results = [train_run(out / f"{run.task}_{run.model}_seed{s}", run.overrides(s, limits)) for s in seeds]
            figures["runs"][f"{run.task}/{run.model}"] = {
                "results": results,
                "row": result_row(run, seeds, results, limits),
                "command": run.overrides(seeds[0], limits),
            }
            if "pooled_vs_per_image" not in figures and run.task.startswith("seg2d"):
                figures["pooled_vs_per_image"] = {
                    "run": f"`{run.task}`/`{run.model}` seed {seeds[0]}",
                    **pooled_vs_per_image(out / f"{run.task}_{run.model}_seed{seeds[0]}"),
                }
        figures["memory"] = {arch: memory_3d(arch) for arch in MODELS["3d"]}
    finally:
        if args.out is None:
            shutil.rmtree(out, ignore_errors=True)
    markdown = results_markdown(figures)
    print(markdown)
    if not args.skip_train and not quick:
        write_block(
            args.doc,
            "task2_seg",
            markdown,
            time.perf_counter() - start,
            {
                "seeds": args.seeds,
                "recipe": "CPU, not the defaults (see the table)",
                "phantom": f"source.generator=v2, revision {GENERATOR_REVISION} (the default)",
            },
        )
    return figures


if __name__ == "__main__":
    main()
