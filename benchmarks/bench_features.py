"""Task 3 feature speed on one core (the read-outs are ``benchmarks/bench_task3.py``).

    .venv/bin/python benchmarks/bench_features.py        # writes docs/task3.md, block task3_features

Semantic features (quadrants) of all 1440 slices of ``task=semantic`` (four 360x256x256 cubes of
set A), labels already in memory, one thread; CPU time is the reproducible figure on a shared
machine. ``main()`` returns the figures as a dict.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def _task_and_source(overrides: list[str]) -> tuple[Any, Any]:
    from conftest import compose

    from mtneuro_lab.data.cubes import catalog_from_config
    from mtneuro_lab.run import instantiate_cfg, instantiate_filtered

    cfg = compose(["task=semantic", *overrides])
    catalog = catalog_from_config(cfg.cubes)
    task = instantiate_cfg(cfg.task, _convert_="all").bind(catalog)
    sets = {k: {r: {"x": list(b.x), "y": list(b.y)} for r, b in v.items()} for k, v in catalog.sets.items()}
    source = instantiate_filtered(
        cfg.source,
        modality="xray",
        cubes=sets,
        regions=list(catalog.regions),
        roi_ids=dict(catalog.roi_ids),
        cache_dir=str(cfg.paths.cache_dir),
    )
    return task, source


def time_features(repeats: int = 3) -> dict[str, float]:
    """Seconds for the features of all 1440 slices (labels already in memory), one thread."""
    import torch

    from mtneuro_lab.data.features import cube_features

    torch.set_num_threads(1)
    task, source = _task_and_source([])
    cubes = [np.ascontiguousarray(source.cutout("pixel_labels", c.x, c.y, z)) for c, z in task._slabs("test")]
    times, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        rows = sum(len(cube_features(c, grid=2)) for c in cubes)
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    # wall time depends on what else runs on the machine; CPU time of this one thread does not
    return {
        "features_slices": float(sum(len(c) for c in cubes)),
        "features_samples": float(rows),
        "features_seconds_best": min(times),
        "features_seconds_median": float(np.median(times)),
        "features_cpu_seconds_best": min(cpu),
        "load_average_1min": os.getloadavg()[0],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--doc", default=str(ROOT / "docs" / "task3.md"), help="'' = print only")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    timing = time_features()
    print(json.dumps(timing, indent=2, sort_keys=True))
    if args.doc:
        from benchmarks.doc_blocks import write_block

        table = (
            "| slices | samples (quadrants) | CPU s, best of 3 | wall s, best of 3 | target |\n"
            "|---|---|---|---|---|\n"
            f"| {timing['features_slices']:.0f} | {timing['features_samples']:.0f} | "
            f"**{timing['features_cpu_seconds_best']:.2f}** | {timing['features_seconds_best']:.2f} | < 60 s |"
        )
        write_block(
            Path(args.doc),
            "task3_features",
            table,
            time.perf_counter() - start,
            {"threads": "1", "load average (1 min)": f"{timing['load_average_1min']:.1f}"},
        )
    return {"timing": timing}


if __name__ == "__main__":
    main()
