"""Post-processing + metrics on a 100x256x256 EM volume, one CPU thread.

Prediction stand-ins are made from the EM phantom's ground truth, degraded so that the
post-processing has real work to do (not a trivial copy): targets from the labels, in-plane
Gaussian blur (sigma 0.5 voxel) and uniform noise (+-0.2), clipped to [0, 1]. Times are wall
and CPU (process) seconds; on a shared machine the CPU time is the stable figure.

* affinity: 3-channel nearest-neighbour affinities of the neuron labels -> waterz -> metrics
* bc: foreground/contour of the mitochondria -> seeded watershed -> metrics

Run: ``python benchmarks/bench_watershed.py`` (prints JSON). ``main()`` returns the dict.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from scipy import ndimage  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mtneuro_lab.data import targets  # noqa: E402
from mtneuro_lab.data.sources.phantom_em import PhantomEMSource  # noqa: E402
from mtneuro_lab.decoding.postprocess import PostprocessConfig, instance_scores, segment  # noqa: E402
from mtneuro_lab.metrics.em import evaluate_instances  # noqa: E402

SHAPE = (100, 256, 256)


def _degrade(target: torch.Tensor, rng: np.random.Generator) -> np.ndarray:
    arr = target[0].numpy().astype(np.float32)
    arr = ndimage.gaussian_filter(arr, (0, 0, 0.5, 0.5))
    arr += rng.uniform(-0.2, 0.2, arr.shape).astype(np.float32)
    return np.clip(arr, 0.0, 1.0)


def main(shape: tuple[int, int, int] = SHAPE, cache_dir: str | None = None) -> dict[str, float]:
    torch.set_num_threads(1)
    root = Path(__file__).resolve().parent.parent
    source = PhantomEMSource(
        seed=0, cache_dir=cache_dir or os.environ.get("MTNEURO_CACHE", str(root / ".cache")), shape=shape
    )
    box = [(0, shape[2]), (0, shape[1]), (0, shape[0])]
    neurons = np.array(source.cutout("labels", *box)).astype(np.int64)
    mito = np.array(source.cutout("mito", *box)).astype(np.int64)
    rng = np.random.default_rng(0)
    out: dict[str, float] = {"voxels": float(np.prod(shape))}

    aff, _ = targets.affinities(torch.from_numpy(neurons)[None], targets.NEAREST_OFFSETS)
    pred = _degrade(aff, rng)
    t0, c0 = time.perf_counter(), time.process_time()
    seg = segment(pred, "affinity", PostprocessConfig(threshold=0.5, min_size=50))
    t1 = time.perf_counter()
    scores = instance_scores(seg, pred.mean(axis=0))
    metrics = evaluate_instances(seg, neurons, ignore_zero=True, scores=scores)
    t2, c2 = time.perf_counter(), time.process_time()
    out.update(
        {
            "affinity_waterz_s": t1 - t0,
            "affinity_metrics_s": t2 - t1,
            "affinity_total_s": t2 - t0,
            "affinity_total_cpu_s": c2 - c0,
        }
    )
    out.update({f"affinity_{k}": v for k, v in metrics.items()})

    bc, _ = targets.compute_targets("bc", torch.from_numpy(mito)[None])
    pred = _degrade(bc, rng)
    t0, c0 = time.perf_counter(), time.process_time()
    seg = segment(pred, "bc", PostprocessConfig(min_size=64))
    t1 = time.perf_counter()
    metrics = evaluate_instances(seg, mito, ignore_zero=False, scores=instance_scores(seg, pred[0]))
    t2, c2 = time.perf_counter(), time.process_time()
    out.update({"bc_watershed_s": t1 - t0, "bc_metrics_s": t2 - t1, "bc_total_s": t2 - t0, "bc_total_cpu_s": c2 - c0})
    out.update({f"bc_{k}": v for k, v in metrics.items()})
    return out


if __name__ == "__main__":
    print(json.dumps(main(), indent=1))
