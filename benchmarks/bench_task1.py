"""Task 1 model figures: (a) test accuracy on the phantom ROI-C1/C2, (b) BYOL / supervised step time.

(a) HEAVY (about an hour on 2 cores): trains BYOL, MYOW-m, supervised, PCA and texture through
    ``train.py`` on ROI-C1 and ROI-C2 (phantom, downsample 4) for seeds 1 and 2 with a short CPU
    budget, ``--jobs`` runs at once, and writes a Markdown table (mean ± std over seeds of
    ``test/acc`` and of the validation value that chose each checkpoint, the gaps to PCA, to
    texture and to the stronger of the two) into docs/task1.md.
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
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.cli_runs import run_many  # noqa: E402
from benchmarks.doc_blocks import write_block  # noqa: E402
from mtneuro_lab.analysis.tables import fmt, mean_std  # noqa: E402
from mtneuro_lab.data.sources.phantom_tissue import GENERATOR_REVISION  # noqa: E402
from mtneuro_lab.methods.byol import BYOL  # noqa: E402
from mtneuro_lab.methods.optim import OptimizerConfig, build_optimizer  # noqa: E402
from mtneuro_lab.methods.supervised import SupervisedClassifier  # noqa: E402

CLASSES = ["cortex", "striatum", "vp", "zi"]
#: longest first: the SSL runs start before the cheap ones
MODELS = ("byol", "myow_m", "supervised", "pca", "texture")


# -- (b) step time ---------------------------------------------------------------------------
def _supervised_step(model: SupervisedClassifier, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()


def _byol_step(
    model: BYOL, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, ids: torch.Tensor, step: int
) -> None:
    """What BYOL.training_step does in its SSL phase, without a Trainer around it."""
    loss, _, rep = model.ssl_step(model.make_view(x), model.make_view(x), {"index": ids})
    loss = loss + F.cross_entropy(model.online_probe(rep.detach()), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    model.update_targets(model.ema_momentum(step))


def step_time(batch_size: int = 32, tile: int = 64, repeats: int = 5, seed: int = 0) -> dict[str, float]:
    """Median seconds per training step of both models on one batch, and their ratio."""
    begin = time.perf_counter()
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
    wall = time.perf_counter() - begin
    return {
        "batch_size": batch_size,
        "tile": tile,
        "supervised_step_s": sup_s,
        "byol_step_s": byol_s,
        "wall_s": wall,
        "byol_over_supervised": byol_s / sup_s,
    }


# -- (a) accuracy ----------------------------------------------------------------------------
BASELINES = ("pca", "texture")


def _overrides(
    task: str,
    model: str,
    seed: int,
    epochs: int,
    linear_epochs: int,
    batch_size: int,
    limit_train_batches: int | None,
    stem: str,
) -> list[str]:
    common = [
        f"model={model}",
        f"task={task}",
        "source=phantom",
        "task.downsample=4",
        f"data.batch_size={batch_size}",
        f"trainer.max_epochs={epochs}",
        "logger=none",
        "trainer.enable_progress_bar=false",
        "trainer.accelerator=cpu",
        f"seed={seed}",
    ]
    if limit_train_batches:
        common.append(f"trainer.limit_train_batches={limit_train_batches}")
    if model in ("byol", "myow", "myow_m"):
        common += [f"model.linear_eval.epochs={linear_epochs}", f"model.stem={stem}"]
    return common


def training_signature(task: str) -> str:
    """What a task trains on (its config without ``name`` and the test split): tasks with the same
    signature train bit-identical models for one seed (ROI-C2 trains exactly as ROI-C1)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from mtneuro_lab.cli import CONF_DIR, register_resolvers

    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"task={task}"])
    section = OmegaConf.to_container(cfg.task, resolve=True)
    section.pop("name", None)
    section["splits"].pop("test", None)
    return json.dumps(section, sort_keys=True)


def accuracy(
    out_dir: Path,
    tasks: Sequence[str] = ("roi_c1", "roi_c2"),
    seeds: Sequence[int] = (1, 2),
    models: Sequence[str] = MODELS,
    epochs: int = 10,
    linear_epochs: int = 5,
    batch_size: int = 64,
    limit_train_batches: int | None = None,
    stem: str = "small",
    jobs: int = 2,
    keep_going: bool = True,
    extra: Sequence[str] = (),
) -> list[dict[str, Any]]:
    """Train every (task, model, seed) through the CLI, ``jobs`` at once, seeds in order (all
    models of the first seed before the second); one row per finished run. ``extra`` overrides
    are added to every training run (a non-default recipe: the caller says so next to its figures).

    A task that trains exactly like an earlier one (same training and validation splits) is not
    trained again: the earlier run's validation-chosen checkpoint is tested on its test split with
    ``evaluate.py task=<task>``; the row keeps the training run's ``val/*``/``selection/*``.
    """
    signature = {t: training_signature(t) for t in tasks}
    trained_as = {t: next(u for u in tasks if signature[u] == signature[t]) for t in tasks}
    runs = {
        (task, model, seed): (
            out_dir / task / model / f"seed{seed}",
            [*_overrides(task, model, seed, epochs, linear_epochs, batch_size, limit_train_batches, stem), *extra],
        )
        for seed in seeds
        for task in tasks
        for model in models
        if trained_as[task] == task
    }
    results = run_many(runs, jobs=jobs, keep_going=keep_going)
    tested = {}
    for task, model, seed in ((t, m, s) for s in seeds for t in tasks for m in models if trained_as[t] != t):
        source = results.get((trained_as[task], model, seed))
        if source is None:
            continue
        ckpt = (
            out_dir
            / trained_as[task]
            / model
            / f"seed{seed}"
            / "checkpoints"
            / f"epoch{int(source['best_epoch']):03d}.ckpt"
        )
        tested[task, model, seed] = (
            out_dir / task / model / f"seed{seed}",
            [
                f"ckpt_path={ckpt}",
                f"task={task}",
                "task.downsample=4",
                "logger=none",
                "trainer.enable_progress_bar=false",
                "trainer.accelerator=cpu",
            ],
        )
    for key, metrics in run_many(tested, jobs=jobs, script="evaluate.py", keep_going=keep_going).items():
        source = results[trained_as[key[0]], key[1], key[2]]
        results[key] = {
            **{k: v for k, v in source.items() if not k.startswith("test/")},
            **{k: v for k, v in metrics.items() if k.startswith("test/")},
            "trained_as": trained_as[key[0]],
            "wall_s": source["wall_s"],
        }
    return [
        {"task": t, "model": m, "seed": s, **results[t, m, s]}
        for s in seeds
        for t in tasks
        for m in models
        if (t, m, s) in results
    ]


def _mean_std(values: Sequence[float]) -> str:
    """``mean ± sample std`` over seeds (the report's own formatting); one value alone."""
    return fmt(*mean_std(values)[:2]) if values else "—"


def accuracy_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown: per task and model, mean ± std over seeds of ``test/acc`` and of the validation
    metric that chose each run's checkpoint, and the gap to each baseline and to the stronger one."""
    lines = [
        "| task | model | seeds | chosen by (validation, mean) | best epoch | test/acc | vs PCA | vs texture "
        "| vs stronger baseline | wall min/run |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    by: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        by.setdefault((r["task"], r["model"]), []).append(r)
    for task in dict.fromkeys(r["task"] for r in rows):
        base = {b: statistics.fmean(r["test/acc"] for r in by[task, b]) for b in BASELINES if (task, b) in by}
        strongest = max(base, key=base.__getitem__) if base else None
        for (t, model), group in by.items():
            if t != task:
                continue
            acc = [r["test/acc"] for r in group]
            mean = statistics.fmean(acc)
            metric = group[0].get("selection/metric", "?")
            chosen = _mean_std([float(r["selection/value"]) for r in group if "selection/value" in r])
            epochs = "/".join(str(r.get("best_epoch", "?")) for r in group)
            diffs = [("" if b == model or b not in base else f"{mean - base[b]:+.3f}") for b in BASELINES]
            stronger = (
                ""
                if strongest in (None, model) or model in BASELINES
                else f"{mean - base[strongest]:+.3f} ({strongest})"
            )
            timed = [r["wall_s"] for r in group if r.get("wall_s") == r.get("wall_s")]  # NaN: not timed
            wall = statistics.fmean(timed) / 60 if timed else float("nan")
            shown = task if "trained_as" not in group[0] else f"{task} (the {group[0]['trained_as']} runs' checkpoints)"
            lines.append(
                f"| {shown} | {model} | {', '.join(str(r['seed']) for r in group)} | {metric} {chosen} | "
                f"{epochs} | {_mean_std(acc)} | {diffs[0]} | {diffs[1]} | {stronger} | {wall:.1f} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("all", "step", "accuracy"), default="all")
    parser.add_argument("--tasks", nargs="+", default=["roi_c1", "roi_c2"])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--linear-epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--jobs", type=int, default=2, help="CLI runs at once (torch threads = cores // jobs)")
    parser.add_argument(
        "--out",
        type=Path,
        default=ROOT / "outputs" / "bench_task1",
        help="run directories <out>/<task>/<model>/seed<N> (finished runs are reused)",
    )
    parser.add_argument(
        "--limit-train-batches",
        type=int,
        default=None,
        help="training batches per epoch (CPU budget); default: the whole split",
    )
    parser.add_argument(
        "--ssl-stem",
        default="small",
        choices=("auto", "imagenet", "small", "tiny"),
        help="ResNet stem of the SSL encoders (small = 4x cheaper on 32 px crops)",
    )
    parser.add_argument("--step-batch", type=int, default=32)
    parser.add_argument(
        "--doc",
        default=str(ROOT / "docs" / "task1.md"),
        help="write the accuracy table into this doc's --block ('' = don't)",
    )
    parser.add_argument(
        "--block",
        default="task1_accuracy_v2",
        help="bench block of --doc for the accuracy table (default: the v2 phantom's; another name keeps its figures)",
    )
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs: must be >= 1, got {args.jobs}")
    figures: dict[str, object] = {}
    if args.part in ("all", "step"):
        figures["step_time"] = step_time(batch_size=args.step_batch)
        st = figures["step_time"]
        print(
            f"step time, batch {st['batch_size']} of {st['tile']}x{st['tile']}: supervised "
            f"{st['supervised_step_s']:.3f} s, BYOL {st['byol_step_s']:.3f} s, "
            f"ratio {st['byol_over_supervised']:.2f}x",
            flush=True,
        )
        if args.doc:
            table = (
                "| | s / step |\n|---|---|\n"
                f"| supervised | {st['supervised_step_s']:.3f} |\n| BYOL | {st['byol_step_s']:.3f} |\n"
                f"| **ratio** | **{st['byol_over_supervised']:.2f}x** (bound: 3.5x) |"
            )
            write_block(
                Path(args.doc),
                "task1_step",
                table,
                st["wall_s"],
                {"batch": f"{st['batch_size']} tiles of {st['tile']}x{st['tile']}"},
            )
    if args.part in ("all", "accuracy"):
        start = time.perf_counter()
        rows = accuracy(
            args.out,
            args.tasks,
            args.seeds,
            args.models,
            args.epochs,
            args.linear_epochs,
            args.batch_size,
            args.limit_train_batches,
            args.ssl_stem,
            args.jobs,
        )
        figures["accuracy"] = rows
        table = accuracy_table(rows)
        print(table)
        budget = (
            f"phantom (generator v2 revision {GENERATOR_REVISION}), task.downsample=4 (64x64 tiles), "
            f"data.batch_size={args.batch_size}, "
            f"trainer.max_epochs={args.epochs}"
            + (f", limit_train_batches={args.limit_train_batches}" if args.limit_train_batches else "")
            + f"; SSL: model.stem={args.ssl_stem}, model.linear_eval.epochs={args.linear_epochs}; "
            f"{args.jobs} runs at once"
        )
        if args.doc:
            timed = [r["wall_s"] for r in rows if r.get("wall_s") == r.get("wall_s") and "trained_as" not in r]
            write_block(
                Path(args.doc),
                args.block,
                table,
                time.perf_counter() - start,
                {
                    "budget (non-default CPU recipe)": budget,
                    "training runs": f"{len(timed)} timed, {sum(timed) / 3600:.1f} h of wall time in all "
                    "(earlier invocations; finished runs are reused)",
                },
            )
    return figures


if __name__ == "__main__":
    main()
