"""What the dashboard figures cost: wall time of a run with ``callbacks.media`` on vs off.

Task 1 (ROI-C1, ``model=supervised``) and Task 2 (``seg2d_3class``, ``model=unet2d``), each a
short CLI run (``logger=csv``: the figures are rendered and written as PNGs) with validation
every epoch, so every validation and the test draw figures (the default cadence). Per task: one
warm-up run of each arm (file caches, phantom cache, imports), then ``rounds`` rounds of one
"off" and one "on" run, alternating which goes first. The ratio is the sum of "on" walls over
the sum of "off" walls, measured in this one process on this machine; the per-round ratios show
the noise of a shared machine.

    python -m benchmarks.bench_media [--rounds 2] [--doc README.md]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.cli_runs import ROOT, run_cli
from benchmarks.doc_blocks import write_block

TASKS = {
    "Task 1 (roi_c1, supervised ResNet-18)": ["task=roi_c1", "model=supervised"],
    "Task 2 (seg2d_3class, unet2d)": ["task=seg2d_3class", "model=unet2d"],
}
#: a short run (the machine is shared: small enough to repeat), every validation drawing
RECIPE = [
    "trainer.max_epochs=2",
    "trainer.limit_train_batches=6",
    "trainer.limit_val_batches=2",
    "trainer.limit_test_batches=2",
    "trainer.enable_progress_bar=false",
    "data.batch_size=8",
    "task.downsample=4",
    "logger=csv",
    "seed=1",
]
ARMS = {"off": ["callbacks.media=null"], "on": []}


def measure(rounds: int, threads: int, work: Path, done: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """``done(results so far)`` after each task: an interrupted benchmark keeps its finished tasks."""
    out: dict[str, Any] = {}
    for label, choice in TASKS.items():
        walls: dict[str, list[float]] = {"off": [], "on": []}
        for arm in ("off", "on"):  # warm-up, not counted
            run_cli(work / f"{label[:6]}-warm-{arm}".replace(" ", ""), [*choice, *RECIPE, *ARMS[arm]], threads)
        for r in range(rounds):
            order = ("off", "on") if r % 2 == 0 else ("on", "off")
            for arm in order:
                run_dir = work / f"{label[:6]}-{arm}-{r}".replace(" ", "")
                walls[arm].append(run_cli(run_dir, [*choice, *RECIPE, *ARMS[arm]], threads)["wall_s"])
                pngs = len(list((run_dir / "media").rglob("*.png"))) if (run_dir / "media").is_dir() else 0
                if arm == "on":
                    out.setdefault(label, {})["pngs per run"] = pngs
                shutil.rmtree(run_dir)
        per_round = [on / off for on, off in zip(walls["on"], walls["off"])]
        out.setdefault(label, {}).update(
            {
                "wall off (s)": [round(w, 1) for w in walls["off"]],
                "wall on (s)": [round(w, 1) for w in walls["on"]],
                "ratio on/off": sum(walls["on"]) / sum(walls["off"]),
                "per-round ratios": [round(x, 3) for x in per_round],
                "per-round spread": round(statistics.pstdev(per_round), 3),
            }
        )
        done(out)
    return out


def markdown(results: dict[str, Any]) -> str:
    lines = [
        "| run | wall, media off (s) | wall, media on (s) | on / off (sum) | per-round on / off | PNGs per run |",
        "|---|---|---|---|---|---|",
    ]
    for label, r in results.items():
        lines.append(
            f"| {label} | {', '.join(map(str, r['wall off (s)']))} | {', '.join(map(str, r['wall on (s)']))} "
            f"| {r['ratio on/off']:.3f} | {', '.join(map(str, r['per-round ratios']))} | {r['pngs per run']} |"
        )
    return "\n".join(lines)


def main(rounds: int = 2, doc: Path | None = None) -> dict[str, Any]:
    start = time.perf_counter()
    load_before = os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="bench-media-"))

    def write(results: dict[str, Any]) -> None:
        if doc is None:
            return
        extra = {
            "recipe": " ".join(RECIPE) + f", {rounds} rounds (media on: the default callbacks.media)",
            "load average (1 min) at start/now": f"{load_before:.1f}/{os.getloadavg()[0]:.1f}",
        }
        write_block(doc, "media_cost", markdown(results), time.perf_counter() - start, extra)

    try:
        results = measure(rounds, threads=2, work=work, done=write)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    load_after = os.getloadavg()[0]
    checks = [
        {
            "name": f"media on / off wall time, {label}",
            "value": r["ratio on/off"],
            "target": "<= 1.05",
            "passed": r["ratio on/off"] <= 1.05,
        }
        for label, r in results.items()
    ]
    return {"runs": results, "load average before/after": [load_before, load_after], "checks": checks}


if __name__ == "__main__":
    import json

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--doc", type=Path, default=None, help="write the table into this doc's bench:media_cost block")
    args = parser.parse_args()
    print(
        json.dumps(
            main(args.rounds, args.doc and (ROOT / args.doc if not args.doc.is_absolute() else args.doc)), indent=2
        )
    )
