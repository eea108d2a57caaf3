"""What a first run costs: ``make run``'s experiment against one plain epoch of 128x128 tiles.

Issue 17 asks that the first run (``python train.py experiment=quickstart``) keep
``test/acc >= 0.90`` on ROI-C1 while costing at most two epochs' worth of ResNet-18 training
on 128x128 ROI-C1 tiles. The yardstick is measured here, in the same process and on the same
machine: a plain PyTorch loop (no Lightning, no Hydra) over one epoch of the ROI-C1 training
tiles at 128x128 (``task.downsample=2``), batch 32, the same ResNet-18 class, SGD settings and
augmentation as the default supervised model, default torch threads. The quickstart is timed
end to end as the user runs it (a fresh ``train.py`` process: start-up, training, validation,
test on the best checkpoint, ``metrics.json``), with the phantom already cached. Order:
plain, quickstart, plain; the yardstick is the mean of the two plain epochs, so load that
drifts during the run hits both sides alike. The same experiment with other seeds
(``--seeds``, not timed) shows how much ``test/acc`` depends on the seed; ``--untimed`` runs
only those seeds (no yardstick), to check ``test/acc`` on a loaded machine: with ``--doc`` it
writes the ``quickstart_seeds`` block and leaves the timed ``quickstart`` block as it is. Both
blocks name the phantom generator revision they were measured on.

    python -m benchmarks.bench_quickstart [--doc README.md] [--untimed --seeds 1 2 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.bench_framework import _Clock, _compose, _plain_steps
from benchmarks.cli_runs import ROOT, run_cli
from benchmarks.doc_blocks import write_block
from mtneuro_lab.data.sources.phantom_tissue import GENERATOR_REVISION

#: the yardstick: ROI-C1 at 128x128 tiles, the quickstart's batch, the default supervised model
PLAIN = ["task=roi_c1", "model=supervised", "task.downsample=2", "source=phantom", "data.batch_size=32", "seed=1"]
QUICKSTART = ["experiment=quickstart", "seed=1"]
TARGET_RATIO = 2.0
TARGET_ACC = 0.90
PHANTOM = f"source.generator=v2, revision {GENERATOR_REVISION} (the default)"


def plain_epoch() -> dict[str, Any]:
    """Wall time of one plain-PyTorch epoch over the 128x128 ROI-C1 training tiles."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = _compose(PLAIN + (["trainer=cpu"] if device.type == "cpu" else []))
    gaps = _plain_steps(cfg, steps=10**9, warmup=0, clock=_Clock(device, wall=True), device=device)
    return {"steps": len(gaps), "wall_s": sum(gaps)}


def measure(work: Path, other_seeds: list[int]) -> dict[str, Any]:
    first = plain_epoch()
    run = run_cli(work / "quickstart", QUICKSTART, threads=torch.get_num_threads())
    second = plain_epoch()
    epoch = (first["wall_s"] + second["wall_s"]) / 2
    others = {  # not timed: how much test/acc depends on the seed
        seed: run_cli(work / f"seed{seed}", ["experiment=quickstart", f"seed={seed}"], torch.get_num_threads())
        for seed in other_seeds
    }
    return {
        "other seeds test/acc": {s: m["test/acc"] for s, m in others.items()},
        "other seeds val/acc": {s: m["val/acc"] for s, m in others.items()},
        "plain epoch, 128x128 (s)": [round(first["wall_s"], 1), round(second["wall_s"], 1)],
        "plain steps per epoch": first["steps"],
        "quickstart wall (s)": round(run["wall_s"], 1),
        "quickstart test/acc": run["test/acc"],
        "ratio quickstart / plain epoch": run["wall_s"] / epoch,
    }


def markdown(r: dict[str, Any]) -> str:
    return "\n".join(
        [
            "| what | measured |",
            "|---|---|",
            f"| one plain PyTorch epoch, ROI-C1 128x128 tiles, batch 32 ({r['plain steps per epoch']} steps; "
            f"before / after) | {r['plain epoch, 128x128 (s)'][0]} s / {r['plain epoch, 128x128 (s)'][1]} s |",
            f"| `make run` (`train.py experiment=quickstart`, phantom cached, end to end) | "
            f"{r['quickstart wall (s)']} s, `test/acc` = {r['quickstart test/acc']:.3f} |",
            f"| ratio: `make run` / one plain 128x128 epoch (target <= {TARGET_RATIO:g}) | "
            f"{r['ratio quickstart / plain epoch']:.2f} |",
            *(
                f"| the same experiment with `seed={seed}` (not timed) | `test/acc` = {acc:.3f} "
                f"(`val/acc` {r['other seeds val/acc'][seed]:.3f}) |"
                for seed, acc in r["other seeds test/acc"].items()
            ),
        ]
    )


def seeds_markdown(r: dict[str, Any]) -> str:
    """The untimed seeds as a table: ``test/acc`` against the target, and the ``val/acc`` that chose it."""
    return "\n".join(
        [
            f"| `make run` with | `test/acc` (target >= {TARGET_ACC:.2f}) | `val/acc` (chose the checkpoint) |",
            "|---|---|---|",
            *(f"| `seed={s}` | {acc:.3f} | {r['val/acc'][s]:.3f} |" for s, acc in r["test/acc"].items()),
        ]
    )


def seeds_only(seeds: list[int]) -> dict[str, Any]:
    """``make run``'s experiment per seed, untimed: ``test/acc``, ``val/acc`` and the target check."""
    work = Path(tempfile.mkdtemp(prefix="bench-quickstart-"))
    try:
        runs = {
            s: run_cli(
                work / f"seed{s}",
                [*(o for o in QUICKSTART if not o.startswith("seed=")), f"seed={s}"],
                torch.get_num_threads(),
            )
            for s in seeds
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {
        "test/acc": {s: m["test/acc"] for s, m in runs.items()},
        "val/acc": {s: m["val/acc"] for s, m in runs.items()},
        "passed (test/acc >= target)": all(m["test/acc"] >= TARGET_ACC for m in runs.values()),
        "load average (1 min) at end": round(os.getloadavg()[0], 1),
    }


def main(doc: Path | None = None, other_seeds: list[int] | None = None) -> dict[str, Any]:
    start = time.perf_counter()
    load_before = os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="bench-quickstart-"))
    try:
        results = measure(work, other_seeds or [])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    load_after = os.getloadavg()[0]
    if doc is not None:
        extra = {
            "phantom": PHANTOM,
            "yardstick": " ".join(PLAIN) + " (plain loop, SGD, default augmentation)",
            "load average (1 min) at start/end": f"{load_before:.1f}/{load_after:.1f}",
        }
        write_block(doc, "quickstart", markdown(results), time.perf_counter() - start, extra)
    ratio, acc = results["ratio quickstart / plain epoch"], results["quickstart test/acc"]
    checks = [
        {
            "name": "`make run` wall / one plain epoch of 128x128 ROI-C1 tiles",
            "value": ratio,
            "target": f"<= {TARGET_RATIO:g}",
            "passed": ratio <= TARGET_RATIO,
        },
        {"name": "`make run` test/acc", "value": acc, "target": f">= {TARGET_ACC}", "passed": acc >= TARGET_ACC},
    ]
    return {**results, "load average before/after": [load_before, load_after], "checks": checks}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--doc", type=Path, default=None, help="write the table into this doc's bench:quickstart block")
    parser.add_argument("--seeds", type=int, nargs="*", default=[2, 3], help="other seeds run for test/acc only")
    parser.add_argument(
        "--untimed", action="store_true", help="only run --seeds (untimed); --doc gets the quickstart_seeds block"
    )
    args = parser.parse_args()
    doc = None if args.doc is None else (args.doc if args.doc.is_absolute() else ROOT / args.doc)
    if args.untimed:
        start, load = time.perf_counter(), os.getloadavg()[0]
        result = seeds_only(args.seeds)
        if doc is not None:
            facts = {
                "phantom": PHANTOM,
                "not timed": "a loaded machine; the wall time above is the whole call",
                "load average (1 min) at start/end": f"{load:.1f}/{result['load average (1 min) at end']:.1f}",
            }
            write_block(doc, "quickstart_seeds", seeds_markdown(result), time.perf_counter() - start, facts)
        print(json.dumps(result, indent=2))
    else:
        print(json.dumps(main(doc, args.seeds), indent=2))
