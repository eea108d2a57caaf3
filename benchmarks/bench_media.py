"""What the dashboard figures cost: wall time of a run with ``callbacks.media`` on vs off.

Task 1 is ``make run``'s experiment (``experiment=quickstart``: ROI-C1, ResNet-18, the first run
a user makes), Task 2 a short ``seg2d_3class`` ``unet2d`` run; both CLI runs with ``logger=csv``
(the figures are rendered and written as PNGs) and validation every epoch, so every validation
and the test draw figures (the default cadence). Per task: one warm-up run, then ``rounds`` rounds of one
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

#: a short Task 2 run (the machine is shared: small enough to repeat), every validation drawing
SHORT = [
    "trainer.max_epochs=2",
    "trainer.limit_train_batches=20",
    "trainer.limit_val_batches=4",
    "trainer.limit_test_batches=4",
    "data.batch_size=16",
    "task.downsample=4",
]
COMMON = ["trainer.enable_progress_bar=false", "logger=csv", "seed=1"]
TASKS = {
    "Task 1 (`make run`: experiment=quickstart, ROI-C1 ResNet-18)": ["experiment=quickstart", *COMMON],
    "Task 2 (seg2d_3class, unet2d, short recipe)": ["task=seg2d_3class", "model=unet2d", *SHORT, *COMMON],
}
ARMS = {"off": ["callbacks.media=null"], "on": []}


def measure(rounds: int, threads: int, work: Path, done: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """``done(results so far)`` after each task: an interrupted benchmark keeps its finished tasks."""
    out: dict[str, Any] = {}
    for label, choice in TASKS.items():
        walls: dict[str, list[float]] = {"off": [], "on": []}
        # warm-up, not counted (file caches, phantom cache, imports)
        run_cli(work / f"{label[:6]}-warm".replace(" ", ""), [*choice, *ARMS["on"]], threads)
        for r in range(rounds):
            order = ("off", "on") if r % 2 == 0 else ("on", "off")
            for arm in order:
                run_dir = work / f"{label[:6]}-{arm}-{r}".replace(" ", "")
                walls[arm].append(run_cli(run_dir, [*choice, *ARMS[arm]], threads)["wall_s"])
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
            "recipes": "; ".join(f"{label}: {' '.join(o)}" for label, o in TASKS.items())
            + f"; {rounds} rounds (media on: the default callbacks.media)",
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
