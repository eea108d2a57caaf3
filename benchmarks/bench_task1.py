"""Task 1 model figures: (a) test accuracy on the phantom ROI-C1, (b) BYOL / supervised step time.

(a) HEAVY (minutes to hours on a shared CPU): trains supervised, BYOL, MYOW-m and PCA through
    ``train.py`` on ROI-C1 (phantom, downsample 4) with a short CPU budget and prints a Markdown
    table of ``test/acc`` with the difference to PCA's linear read-out.
(b) Seconds: one training step (forward, backward, optimiser step; for BYOL also views and the
    EMA update) of BYOL and of the supervised model on the SAME batch, interleaved in one
    process; prints the ratio of the medians (timings on a shared machine are noisy, ratios
    measured together are not).

    .venv/bin/python benchmarks/bench_task1.py --part step            # (b) only
    .venv/bin/python benchmarks/bench_task1.py --part accuracy        # (a) only
    .venv/bin/python benchmarks/bench_task1.py                        # both
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mtneuro_lab.methods.byol import BYOL  # noqa: E402
from mtneuro_lab.methods.optim import OptimizerConfig, build_optimizer  # noqa: E402
from mtneuro_lab.methods.supervised import SupervisedClassifier  # noqa: E402

CLASSES = ["cortex", "striatum", "vp", "zi"]
MODELS = ("supervised", "byol", "myow_m", "pca")


# -- (b) step time ---------------------------------------------------------------------------
def _supervised_step(model: SupervisedClassifier, opt: torch.optim.Optimizer, x: torch.Tensor,
                     y: torch.Tensor) -> None:
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()


def _byol_step(model: BYOL, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
               ids: torch.Tensor, step: int) -> None:
    """What BYOL.training_step does in its SSL phase, without a Trainer around it."""
    loss, _, rep = model.ssl_step(model.make_view(x), model.make_view(x), {"index": ids})
    loss = loss + F.cross_entropy(model.online_probe(rep.detach()), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    model.update_targets(model.ema_momentum(step))


def step_time(batch_size: int = 32, tile: int = 64, repeats: int = 5, seed: int = 0) -> dict[str, float]:
    """Median seconds per training step of both models on one batch, and their ratio."""
    torch.manual_seed(seed)
    x = torch.randn(batch_size, 1, tile, tile)
    y = torch.randint(0, len(CLASSES), (batch_size,))
    ids = torch.arange(batch_size)
    sup = SupervisedClassifier(len(CLASSES), CLASSES, (tile, tile)).train()
    byol = BYOL(len(CLASSES), CLASSES, (tile, tile)).train()
    cfg = OptimizerConfig()
    sup_opt = build_optimizer(sup.optimizer_parameters(), cfg, batch_size)
    byol_opt = build_optimizer(byol.ssl_parameters(), cfg, batch_size)
    times: dict[str, list[float]] = {"supervised": [], "byol": []}
    for i in range(repeats + 1):  # first round is warm-up
        for name in ("supervised", "byol"):
            start = time.perf_counter()
            if name == "supervised":
                _supervised_step(sup, sup_opt, x, y)
            else:
                _byol_step(byol, byol_opt, x, y, ids, i)
            if i:
                times[name].append(time.perf_counter() - start)
    sup_s, byol_s = statistics.median(times["supervised"]), statistics.median(times["byol"])
    return {"batch_size": batch_size, "tile": tile, "supervised_step_s": sup_s, "byol_step_s": byol_s,
            "byol_over_supervised": byol_s / sup_s}


# -- (a) accuracy ----------------------------------------------------------------------------
def _overrides(model: str, epochs: int, linear_epochs: int, batch_size: int,
               limit_train_batches: int | None, stem: str) -> list[str]:
    common = [f"model={model}", "task=roi_c1", "source=phantom", "task.downsample=4", f"data.batch_size={batch_size}",
              f"trainer.max_epochs={epochs}", "logger=none", "trainer.enable_progress_bar=false",
              "trainer.accelerator=cpu", "seed=1"]
    if limit_train_batches:
        common.append(f"trainer.limit_train_batches={limit_train_batches}")
    if model in ("byol", "myow", "myow_m"):
        common += [f"model.linear_eval.epochs={linear_epochs}", f"model.stem={stem}"]
    return common


def accuracy(out_dir: Path, epochs: int = 10, linear_epochs: int = 10, batch_size: int = 64,
             limit_train_batches: int | None = None, stem: str = "auto",
             models: tuple[str, ...] = MODELS) -> dict[str, float]:
    """Train each model through the CLI; returns ``{model: test/acc}``."""
    results: dict[str, float] = {}
    for model in models:
        run_dir = out_dir / model
        metrics_file = run_dir / "metrics.json"
        if not metrics_file.is_file():
            args = [sys.executable, str(ROOT / "train.py"),
                    *_overrides(model, epochs, linear_epochs, batch_size, limit_train_batches, stem),
                    f"hydra.run.dir={run_dir}"]
            start = time.perf_counter()
            proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True)
            if proc.returncode:
                raise RuntimeError(f"{model} failed:\n{proc.stderr[-3000:]}")
            print(f"{model}: {time.perf_counter() - start:.0f} s", flush=True)
        results[model] = json.loads(metrics_file.read_text())["test/acc"]
    return results


def accuracy_table(results: dict[str, float], reference: str = "pca") -> str:
    lines = ["| model | test/acc | vs PCA |", "|---|---|---|"]
    for model, acc in results.items():
        diff = "" if model == reference else f"{acc - results[reference]:+.3f}"
        lines.append(f"| {model} | {acc:.3f} | {diff} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("all", "step", "accuracy"), default="all")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--linear-epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench_task1")
    parser.add_argument("--limit-train-batches", type=int, default=None,
                        help="training batches per epoch (CPU budget); default: the whole split")
    parser.add_argument("--ssl-stem", default="auto", choices=("auto", "imagenet", "small", "tiny"),
                        help="ResNet stem of the SSL encoders (small = 4x cheaper on 32 px crops)")
    parser.add_argument("--step-batch", type=int, default=32)
    args = parser.parse_args(argv)
    figures: dict[str, object] = {}
    if args.part in ("all", "step"):
        figures["step_time"] = step_time(batch_size=args.step_batch)
        st = figures["step_time"]
        print(f"step time, batch {st['batch_size']} of {st['tile']}x{st['tile']}: supervised "
              f"{st['supervised_step_s']:.3f} s, BYOL {st['byol_step_s']:.3f} s, "
              f"ratio {st['byol_over_supervised']:.2f}x", flush=True)
    if args.part in ("all", "accuracy"):
        results = accuracy(args.out, args.epochs, args.linear_epochs, args.batch_size,
                           args.limit_train_batches, args.ssl_stem)
        figures["accuracy"] = results
        print(accuracy_table(results))
    return figures


if __name__ == "__main__":
    main()
