"""Training runs as CLI processes, several at once: what the training benchmarks share.

Each run is ``train.py`` (or ``evaluate.py``) in its own process with ``threads`` torch threads,
so ``jobs`` runs share the machine's cores evenly; a run whose directory already holds
``metrics.json`` is not run again (a benchmark can be resumed after an interruption).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from mtneuro_lab.io import atomic_write_bytes

ROOT = Path(__file__).resolve().parent.parent


def run_cli(
    run_dir: Path,
    overrides: Sequence[str],
    threads: int = 1,
    script: str = "train.py",
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """One run; its ``metrics.json`` plus ``wall_s`` and ``started_unix`` (``wall_s`` NaN when it was
    finished before and recorded no time)."""
    metrics_file = run_dir / "metrics.json"
    if metrics_file.is_file():
        metrics = json.loads(metrics_file.read_text())
        metrics.setdefault("wall_s", float("nan"))
        return metrics
    args = [sys.executable, str(ROOT / script), *overrides, f"hydra.run.dir={run_dir}"]
    env = {
        **os.environ,
        "PYTHONHASHSEED": "0",
        "WANDB_MODE": "disabled",
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
    }
    started, start = time.time(), time.perf_counter()
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{script} {' '.join(overrides)} failed:\n{proc.stderr[-3000:]}")
    metrics = json.loads(metrics_file.read_text())
    metrics["wall_s"] = time.perf_counter() - start
    metrics["started_unix"] = started  # when: which runs shared the machine (bench_em.at_once)
    # the wall time belongs to the run record too: a resumed benchmark still reports it
    atomic_write_bytes(metrics_file, (json.dumps(metrics, indent=2) + "\n").encode())
    if log is not None:
        log(f"{'/'.join(run_dir.parts[-3:])}: {metrics['wall_s']:.0f} s")
    return metrics


def run_many(
    runs: dict[Any, tuple[Path, Sequence[str]]], jobs: int = 2, script: str = "train.py", keep_going: bool = False
) -> dict[Any, dict[str, Any]]:
    """``{key: (run_dir, overrides)}`` -> ``{key: metrics}``, ``jobs`` one-thread-each at a time.

    Torch threads per run = cores // jobs. Runs start in the order given (put the longest
    first). A failed run cancels the queued ones, unless ``keep_going``: then its key is missing
    from the result and the error is printed.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = max(1, cores // jobs)
    pool = ThreadPoolExecutor(max_workers=jobs)  # the threads only wait on CLI processes
    futures = {
        key: pool.submit(run_cli, run_dir, overrides, threads, script, lambda text: print(text, flush=True))
        for key, (run_dir, overrides) in runs.items()
    }
    results: dict[Any, dict[str, Any]] = {}
    try:
        for key, future in futures.items():
            try:
                results[key] = future.result()
            except RuntimeError as err:
                if not keep_going:
                    raise
                print(f"failed: {key}: {str(err).splitlines()[0]}", flush=True)
    finally:
        pool.shutdown(cancel_futures=True)
    return results
