"""The memory check's estimate against the memory a CPU training step really takes.

For each batch size, a fresh process builds the configured method (default: ROI-C1 supervised
ResNet-18, 128x128 tiles, SGD with momentum), measures its resident memory, runs three training
steps (forward, cross-entropy, backward, optimiser step) on random tiles and reads the peak
resident memory (``ru_maxrss``), after a warm-up forward/backward of two tiles that loads the
kernels; the growth is what the step needs beyond the built model. The
estimate of :mod:`mtneuro_lab.memcheck` for the same method and batch is computed on the meta
device in the parent. ``tracked`` is the estimate before :data:`ALLOCATOR_OVERHEAD`; the ratio
measured / tracked is what that constant should be.

    python -m benchmarks.bench_memcheck [--batches 32,64,128] [--doc docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.doc_blocks import ROOT, write_block

OVERRIDES = ["task=roi_c1", "model=supervised", "seed=0"]


def _method_and_shape(batch: int) -> tuple[Any, tuple[int, ...]]:
    from hydra import compose, initialize_config_dir

    from mtneuro_lab.build import build_method, build_task, task_facts
    from mtneuro_lab.cli import CONF_DIR, register_resolvers
    from mtneuro_lab.data.cubes import catalog_from_config

    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[*OVERRIDES, f"data.batch_size={batch}"])
    task = build_task(cfg, catalog_from_config(cfg.cubes))
    return build_method(cfg, task_facts(task)), tuple(task.sample_shape())


def _rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure_child(batch: int) -> dict[str, Any]:
    """In a fresh process: peak resident growth of three training steps at ``batch``."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    method, shape = _method_and_shape(batch)
    method.train()
    cfg = method.optim_cfg
    opt = torch.optim.SGD(method.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    x = torch.randn(batch, 1, *shape)
    y = torch.randint(0, method.num_classes, (batch,))
    # libraries load their kernels on first use: one small forward/backward first (no optimiser
    # step, so no momentum yet), its gradients released, then the baseline
    F.cross_entropy(method(x[:2]), y[:2]).backward()
    method.zero_grad(set_to_none=True)
    before = _rss_bytes()
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    for _ in range(3):
        loss = F.cross_entropy(method(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"growth": peak - before, "reliable": peak > peak_before, "input": x.numel() * x.element_size()}


def estimate_bytes(batch: int) -> dict[str, float]:
    from mtneuro_lab import memcheck

    method, shape = _method_and_shape(batch)
    est = memcheck.estimate(method, shape, batch, batch)
    tracked = est.train.at(batch) + est.state
    return {"tracked": tracked, "estimate": est.train_bytes(batch) - est.params}


def main(batches: tuple[int, ...] = (32, 64, 128), doc: Path | None = None) -> dict[str, Any]:
    start = time.perf_counter()
    rows = []
    for batch in batches:
        proc = subprocess.run(
            [sys.executable, "-m", "benchmarks.bench_memcheck", "--child", str(batch)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "OMP_NUM_THREADS": "2"},
        )
        measured = json.loads(proc.stdout.strip().splitlines()[-1])
        est = estimate_bytes(batch)
        # the input batch exists before the baseline is read; the estimate counts it (probe input)
        rows.append(
            {
                "batch": batch,
                "measured MB": round((measured["growth"] + measured["input"]) / 2**20),
                "tracked MB": round(est["tracked"] / 2**20),
                "estimate MB": round(est["estimate"] / 2**20),
                "measured / tracked": round((measured["growth"] + measured["input"]) / est["tracked"], 3),
                "estimate / measured": round(est["estimate"] / (measured["growth"] + measured["input"]), 3),
                "peak above earlier peak": measured["reliable"],
            }
        )
    wall = time.perf_counter() - start
    if doc is not None:
        lines = [
            "| batch | measured growth (MB) | tracked on meta (MB) | estimate (MB) "
            "| measured / tracked | estimate / measured |",
            "|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['batch']} | {r['measured MB']} | {r['tracked MB']} | {r['estimate MB']} | {r['measured / tracked']} "
            f"| {r['estimate / measured']} |"
            for r in rows
        ]
        extra = {"model": "ROI-C1 supervised ResNet-18, 128x128 tiles, SGD momentum, 3 CPU steps, 2 threads"}
        write_block(doc, "memcheck", "\n".join(lines), wall, extra)
    return {"rows": rows}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--batches", default="32,64,128")
    parser.add_argument("--doc", type=Path, default=None)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(measure_child(args.child)))
    else:
        batches = tuple(int(b) for b in args.batches.split(","))
        print(json.dumps(main(batches, args.doc and ROOT / args.doc), indent=2))
