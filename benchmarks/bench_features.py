"""Task 3 benchmark: feature speed on one core, and encoder vs PCA read-outs on the phantom.

    .venv/bin/python benchmarks/bench_features.py                      # timing only
    .venv/bin/python benchmarks/bench_features.py --ckpt <Task 1 ckpt> # + read-outs

Timing: semantic features (quadrants) of all 1440 slices of ``task=semantic`` (four 360x256x256
cubes of set A), one thread. Read-outs: ``evaluate.py task=semantic ckpt_path=<ckpt>`` (the
user's command, UMAP off) against a PCA baseline computed here with scikit-learn: PCA fitted on
the quadrant crops of the ``fit_samples`` slices (ROI-C1 training slices) at the encoder's
resolution, 256 components (the paper's), then the same linear read-out. ``main()`` returns every figure as a dict.
"""
from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse
import json
import subprocess
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
    source = instantiate_filtered(cfg.source, modality="xray", cubes=sets, regions=list(catalog.regions),
                                  roi_ids=dict(catalog.roi_ids), cache_dir=str(cfg.paths.cache_dir))
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
    return {"features_slices": float(sum(len(c) for c in cubes)), "features_samples": float(rows),
            "features_seconds_best": min(times), "features_seconds_median": float(np.median(times)),
            "features_cpu_seconds_best": min(cpu), "load_average_1min": os.getloadavg()[0]}


def encoder_readout(ckpt: str, out: Path, extra: list[str]) -> dict[str, float]:
    """The user's command on a Task 1 checkpoint; returns its metrics.json."""
    cmd = [sys.executable, str(ROOT / "evaluate.py"), "task=semantic", f"ckpt_path={ckpt}", "task.umap=false",
           "logger=none", f"hydra.run.dir={out}", *extra]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    return json.loads((out / "metrics.json").read_text())


def pca_readout(downsample: int, n_components: int, seed: int, extra: list[str]) -> dict[str, float]:
    """PCA baseline: fit on the fit_samples quadrants, read out all samples like an encoder."""
    from sklearn.decomposition import PCA

    from mtneuro_lab.analysis.embeddings import split_tiles
    from mtneuro_lab.analysis.readout import linear_readout, metrics_of

    task, source = _task_and_source([f"task.downsample={downsample}", *extra])
    fit = split_tiles(task.build("train", source).images, task.grid)
    fit = fit.reshape(len(fit), -1).astype(np.float32) / 255.0
    test = split_tiles(task.build("test", source).images, task.grid)
    test = test.reshape(len(test), -1).astype(np.float32) / 255.0
    pca = PCA(n_components=min(n_components, fit.shape[1]), random_state=seed).fit(fit)
    res = linear_readout(pca.transform(test), task.features(source), task.folds, task.cv, seed, task.alpha)
    return metrics_of(res)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", help="Task 1 checkpoint to read out (skip read-outs if absent)")
    parser.add_argument("--out", default=str(ROOT / "outputs" / "bench_task3"))
    parser.add_argument("--cv", default="shuffled", choices=["shuffled", "blocked"])
    args = parser.parse_args(argv)
    result: dict[str, Any] = {"timing": time_features()}
    if args.ckpt:
        from omegaconf import OmegaConf

        from mtneuro_lab.checkpoints import run_dir_of

        saved = OmegaConf.load(run_dir_of(args.ckpt) / "config.yaml")
        downsample, seed = int(saved.task.downsample), int(saved.seed)
        extra = [f"task.cv={args.cv}"]
        out = Path(args.out) / f"readout_{Path(args.ckpt).parent.parent.name}_{args.cv}"
        result["encoder"] = encoder_readout(args.ckpt, out, extra)
        result["pca"] = pca_readout(downsample, 256, seed, extra)
    print(json.dumps(result, indent=2, sort_keys=True))
    return result


if __name__ == "__main__":
    main()
