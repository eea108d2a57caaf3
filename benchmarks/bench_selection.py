"""Choosing on validation: an Optuna sweep of tiny trials, and what each trial scored.

Runs ``train.py -m +sweep=optuna`` (ROI-C1 on the phantom, tiny budget) and writes a table into
docs/sweeps.md: every trial's parameters, the validation value that the sweep optimised
(``selection/value`` = ``val/acc``), its test accuracy (read only, never used to choose), and
which trial the study chose; below it, whether choosing by test would have picked another trial.

    python benchmarks/bench_selection.py [--trials 4] [--out DIR] [--doc docs/sweeps.md]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.doc_blocks import write_block  # noqa: E402

BUDGET = (
    "task=roi_c1",
    "source=phantom",
    "task.downsample=4",
    "trainer.max_epochs=2",
    "trainer.limit_train_batches=4",
    "data.eval_batch_size=120",
    "logger=none",
    "trainer.enable_progress_bar=false",
    "trainer.accelerator=cpu",
)


def run_sweep(out: Path, trials: int) -> list[dict[str, Any]]:
    """One Optuna sweep of ``trials`` trials; per trial its overrides and metrics.json."""
    args = [
        sys.executable,
        str(ROOT / "train.py"),
        "-m",
        "+sweep=optuna",
        f"hydra.sweeper.n_trials={trials}",
        *BUDGET,
        f"hydra.sweep.dir={out}",
    ]
    proc = subprocess.run(
        args,
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "PYTHONHASHSEED": "0", "WANDB_MODE": "disabled"},
    )
    if proc.returncode:
        raise RuntimeError(f"optuna sweep failed:\n{proc.stderr[-3000:]}")
    chosen = yaml.safe_load((out / "optimization_results.yaml").read_text())
    rows = []
    for metrics_file in sorted(out.glob("*/metrics.json")):
        overrides = yaml.safe_load((metrics_file.parent / ".hydra" / "overrides.yaml").read_text())
        params = {k: v for k, v in (o.split("=", 1) for o in overrides) if k in chosen["best_params"]}
        rows.append({"params": params, **json.loads(metrics_file.read_text())})
    for r in rows:
        r["chosen"] = all(float(r["params"][k]) == float(v) for k, v in chosen["best_params"].items())
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    """Trials by val/acc (Optuna's pick first among ties), and whether a test-split choice would agree."""
    keys = sorted(rows[0]["params"])
    lines = [
        "| rank by val/acc | " + " | ".join(keys) + " | val/acc (objective) | test/acc (not used) | chosen |",
        "|---" * (len(keys) + 4) + "|",
    ]
    for i, r in enumerate(sorted(rows, key=lambda r: (-r["selection/value"], not r["chosen"])), 1):
        values = " | ".join(f"{float(r['params'][k]):.4g}" for k in keys)
        lines.append(
            f"| {i} | {values} | {r['selection/value']:.3f} | {r['test/acc']:.3f} | "
            f"{'**yes**' if r['chosen'] else ''} |"
        )
    chosen = next((r for r in rows if r["chosen"]), max(rows, key=lambda r: r["selection/value"]))
    by_test = max(rows, key=lambda r: r["test/acc"])
    agree = (
        "the same trial"
        if by_test["test/acc"] == chosen["test/acc"]
        else (
            f"a different trial (test/acc {by_test['test/acc']:.3f} instead of {chosen['test/acc']:.3f}): "
            "a test-split choice would look better than it is"
        )
    )
    tied = sum(r["selection/value"] == chosen["selection/value"] for r in rows)
    tie = f" {tied} trials tie on val/acc; the chosen one is Optuna's pick among them." if tied > 1 else ""
    lines += [
        "",
        f"The study chose a trial with the highest val/acc; choosing by test/acc would have picked {agree}.{tie}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--out", type=Path, default=None, help="keep the sweep here (default: a temp dir)")
    parser.add_argument("--doc", default=str(ROOT / "docs" / "sweeps.md"), help="'' = print only")
    args = parser.parse_args(argv)
    if args.trials < 1:
        parser.error(f"--trials: must be >= 1, got {args.trials}")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_selection_") as tmp:
        rows = run_sweep(args.out or Path(tmp) / "optuna", args.trials)
    text = table(rows)
    print(text)
    if args.doc:
        write_block(
            Path(args.doc),
            "optuna_selection",
            text,
            time.perf_counter() - start,
            {"budget": " ".join(BUDGET) + f", {args.trials} trials (Optuna TPE, sampler seed 1)"},
        )
    return {"trials": rows}


if __name__ == "__main__":
    main()
