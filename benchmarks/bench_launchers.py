"""Launchers and report: wall time of 4 tiny jobs, sequential vs joblib (2 workers), and the
time ``python -m mtneuro_lab.report`` takes on a 5-seed sweep.

The machine is shared, so absolute times are noise; the figure is the ratio of the two
launchers measured back to back in one run. The 5-seed sweep is the sequential one resumed
with a fifth seed (the rerun skips the 4 finished jobs), which also times the skip path.

Usage: ``python -m benchmarks.bench_launchers [--out DIR]``
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TINY = (
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=1",
    "trainer.enable_progress_bar=false",
    "data.batch_size=8",
    "task.downsample=4",
    "logger=none",
    "callbacks=none",
    "test_after_fit=true",
)
SEEDS4 = "seed=1,100,350,631"


def _multirun(sweep_dir: Path, *overrides: str) -> float:
    """Wall time of one ``train.py -m`` command (seconds); raises if it fails."""
    cmd = [sys.executable, str(ROOT / "train.py"), "-m", *TINY, *overrides, f"hydra.sweep.dir={sweep_dir}"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    return elapsed


def main(out: Path | None = None) -> dict[str, float]:
    base = Path(out) if out else Path(tempfile.mkdtemp(prefix="bench_launchers_"))
    seq_dir, par_dir = base / "sequential", base / "parallel"
    sequential = _multirun(seq_dir, SEEDS4, "hydra/launcher=basic")
    parallel = _multirun(par_dir, SEEDS4, "hydra/launcher=parallel", "hydra.launcher.n_jobs=2")
    resumed = _multirun(seq_dir, "seed=1,100,350,631,872", "hydra/launcher=basic")
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "mtneuro_lab.report", str(seq_dir)], cwd=ROOT, capture_output=True, text=True
    )
    report = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr)
    n_done = len(list(seq_dir.glob("*/metrics.json")))
    result = {
        "sequential_s": sequential,
        "parallel_s": parallel,
        "ratio": parallel / sequential,
        "resume_1_of_5_s": resumed,
        "report_5_seeds_s": report,
        "runs_in_report": float(n_done),
    }
    print("| measure | value |\n|---|---|")
    print(f"| 4 tiny jobs, basic launcher (s) | {sequential:.1f} |")
    print(f"| 4 tiny jobs, joblib launcher, 2 workers (s) | {parallel:.1f} |")
    print(f"| parallel / sequential | {result['ratio']:.2f} |")
    print(f"| rerun with a 5th seed: 4 skipped + 1 run (s) | {resumed:.1f} |")
    print(f"| report of the 5-seed sweep, whole command (s) | {report:.2f} |")
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    main(parser.parse_args().out)
