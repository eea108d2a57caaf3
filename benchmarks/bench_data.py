"""Data path: throughput of batched on-device augmentation, and memory of holding ROI-C3.

1. Throughput of augmented 128x128 ROI tiles (the phantom/BossDB ROI tile at downsample 2).
   Ours is the datamodule's real training path: ``ArrayBatchLoader`` gathers a batch of uint8
   tiles, then ``datamodules.augment_training_batch`` (what ``on_after_batch_transfer`` runs in
   training) flips and rotates every tile by 90 degrees, casts and normalises it in ONE gather
   (``augment.gather_crop_augment``). Against it: a per-item torchvision ``Dataset``/``DataLoader``
   doing the same work item by item (``transforms.v2`` flips, a random rot90, ``ToDtype``,
   ``Normalize``), with ``num_workers`` 0 and 2; the speed-up is against the faster of the two.
   The previous batched path (``to_float`` then ``geometric``: one pass per transform group) is
   timed too, for reference. Same tiles, same batch size, same number of samples, measured
   alternately in one run (median of ``--repeats``), once with one thread each and once with the
   whole machine (see ``throughput``).
2. Memory. A fresh subprocess builds every ROI-C3 split at downsample 1 (full 256x256 tiles)
   through the real task + datamodule code (``setup`` and all three loaders) from a cheap
   synthetic source that returns freshly allocated uint8 cutouts (like a download would), and
   reports peak RSS (``VmHWM``, reset after imports) above the interpreter's baseline divided
   by the splits' uint8 image bytes.

Usage: ``python -m benchmarks.bench_data [--tiles N] [--batch B] [--repeats R] [--skip-memory]``.
``main()`` returns the figures and a ``checks`` list (for ``make bench``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

ROOT = Path(__file__).resolve().parent.parent
TILE = 128
THROUGHPUT_TARGET, MEMORY_TARGET = 5.0, 1.3


# -- 1. throughput ----------------------------------------------------------------------------
def _batches(tiles: torch.Tensor, batch: int):
    """The datamodule's training loader over ``tiles`` (uint8 tiles, labels, sample ids)."""
    import torch

    from mtneuro_lab.data.datamodules import ArrayBatchLoader

    n = len(tiles)
    return ArrayBatchLoader(
        {
            "image": tiles,
            "target": torch.zeros(n, dtype=torch.long),
            "region": torch.zeros(n, dtype=torch.long),
            "index": torch.arange(n),
        },
        batch,
        shuffle=True,
        drop_last=True,
    )


def _ours(tiles: torch.Tensor, batch: int, mean: float, std: float) -> Callable[[], int]:
    """The real training path: loader batch -> one fused flip/rot90/cast/normalise gather."""
    from mtneuro_lab.data import augment
    from mtneuro_lab.data.augment import AugmentConfig
    from mtneuro_lab.data.datamodules import augment_training_batch

    loader, cfg, workspace = _batches(tiles, batch), AugmentConfig(), augment.Workspace()

    def epoch() -> int:
        return sum(augment_training_batch(b, cfg, mean, std, workspace)["image"].shape[0] for b in loader)

    return epoch


def _ours_sequential(tiles: torch.Tensor, batch: int, mean: float, std: float) -> Callable[[], int]:
    """The previous batched path, for reference: cast + normalise, then flips/rot90 by groups."""
    from mtneuro_lab.data import augment
    from mtneuro_lab.data.augment import AugmentConfig

    loader, cfg = _batches(tiles, batch), AugmentConfig()

    def epoch() -> int:
        seen = 0
        for b in loader:
            (x,) = augment.geometric([augment.to_float(b["image"], mean, std)], cfg)
            seen += x.shape[0]
        return seen

    return epoch


class _RandomRot90:
    """Per-item rot90 by a random multiple of 90 degrees (torchvision has no such transform)."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        import torch

        return torch.rot90(x, int(torch.randint(0, 4, ())), dims=(-2, -1))


def _torchvision(tiles: torch.Tensor, batch: int, mean: float, std: float, num_workers: int = 0) -> Callable[[], int]:
    import torch
    from torch.utils.data import DataLoader, Dataset
    from torchvision.transforms import v2

    transform = v2.Compose(
        [
            v2.RandomHorizontalFlip(),
            v2.RandomVerticalFlip(),
            _RandomRot90(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize([mean], [std]),
        ]
    )

    class Tiles(Dataset):
        def __len__(self) -> int:
            return len(tiles)

        def __getitem__(self, i: int) -> torch.Tensor:
            return transform(tiles[i].unsqueeze(0))

    # persistent workers: worker start-up is paid once (in the warm-up), not every epoch
    loader = DataLoader(
        Tiles(),
        batch_size=batch,
        shuffle=True,
        drop_last=True,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
    )

    def epoch() -> int:
        return sum(x.shape[0] for x in loader)

    return epoch


def throughput(n_tiles: int = 1024, batch: int = 64, repeats: int = 3) -> dict[str, Any]:
    """Batches/s of the pipelines over the same tiles, timed alternately in this process.

    Two comparisons from the same run:

    * one core each: ours with one torch thread against torchvision with ``num_workers=0`` and
      one thread (both a single thread of work);
    * the whole machine: ours with ``torch.get_num_threads()`` intra-op threads (what a training
      process uses by default) against the faster of torchvision with ``num_workers=0`` at the
      same thread count and ``num_workers=2`` (persistent workers, one thread each). The target
      ratio is checked on this one.
    """
    import numpy as np
    import torch

    all_threads = torch.get_num_threads()
    rng = np.random.default_rng(0)
    tiles = torch.from_numpy(rng.integers(0, 256, (n_tiles, TILE, TILE), dtype=np.uint8))
    mean, std = 0.5, 0.25
    runs: dict[str, tuple[Callable[[], int], int]] = {
        "ours_1t": (_ours(tiles, batch, mean, std), 1),
        "ours": (_ours(tiles, batch, mean, std), all_threads),
        "ours_sequential_1t": (_ours_sequential(tiles, batch, mean, std), 1),
        "torchvision_w0_1t": (_torchvision(tiles, batch, mean, std, num_workers=0), 1),
        "torchvision_w0": (_torchvision(tiles, batch, mean, std, num_workers=0), all_threads),
        "torchvision_w2": (_torchvision(tiles, batch, mean, std, num_workers=2), all_threads),
    }

    def timed(run: Callable[[], int], threads: int) -> tuple[int, float, float]:
        torch.set_num_threads(threads)
        start, start_cpu = time.perf_counter(), time.process_time()
        seen = run()
        return seen, time.perf_counter() - start, time.process_time() - start_cpu

    for run, threads in runs.values():  # warm-up (allocator, lazy imports, worker start-up)
        timed(run, threads)
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    cpu: dict[str, list[float]] = {name: [] for name in runs}
    samples: dict[str, int] = {}
    for _ in range(repeats):
        for name, (run, threads) in runs.items():
            samples[name], wall, cpu_s = timed(run, threads)
            seconds[name].append(wall)
            cpu[name].append(cpu_s)
    torch.set_num_threads(all_threads)
    assert len(set(samples.values())) == 1, samples
    n_batches = samples["ours"] // batch
    rate = {name: n_batches / statistics.median(s) for name, s in seconds.items()}
    # CPU ms per batch of the single-thread runs of this process: a second view of the one-core
    # comparison that a loaded machine distorts less than wall time
    cpu_ms = {
        name: 1e3 * statistics.median(cpu[name]) / n_batches
        for name in ("ours_1t", "ours_sequential_1t", "torchvision_w0_1t")
    }
    best_tv = max(("torchvision_w0", "torchvision_w2"), key=rate.__getitem__)
    return {
        "tiles": n_tiles,
        "batch": batch,
        "batches_per_epoch": n_batches,
        "threads": all_threads,
        "batches_per_s": rate,
        "torchvision_best": best_tv,
        "speedup": rate["ours"] / rate[best_tv],
        "speedup_one_core": rate["ours_1t"] / rate["torchvision_w0_1t"],
        "speedup_vs_sequential_one_core": rate["ours_1t"] / rate["ours_sequential_1t"],
        "cpu_ms_per_batch": cpu_ms,
        "cpu_speedup_one_core": cpu_ms["torchvision_w0_1t"] / cpu_ms["ours_1t"],
    }


# -- 2. memory --------------------------------------------------------------------------------
def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _memory_child(task_name: str, downsample: int) -> dict[str, Any]:
    """Runs in a fresh interpreter: build every split of ``task_name``; report peak RSS."""
    import numpy as np
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from mtneuro_lab.cli import CONF_DIR, register_resolvers
    from mtneuro_lab.data.cubes import catalog_from_config
    from mtneuro_lab.data.datamodules import VolumeDataModule
    from mtneuro_lab.data.sources.base import VolumeSource

    class FreshArraySource(VolumeSource):
        """Every cutout is a newly allocated uint8 array (as a download or decode would be)."""

        def cutout(self, channel, x, y, z):
            out = np.empty((z[1] - z[0], y[1] - y[0], x[1] - x[0]), dtype=np.uint8)
            out[:] = (np.arange(z[0], z[1]) % 251).astype(np.uint8)[:, None, None]
            return out

    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"task={task_name}", f"task.downsample={downsample}"])
    catalog = catalog_from_config(cfg.cubes)
    task = instantiate(cfg.task, _convert_="all").bind(catalog)
    dm = VolumeDataModule(task, FreshArraySource(), catalog, batch_size=256)
    try:  # reset the high-water mark so import transients do not count
        Path("/proc/self/clear_refs").write_text("5")
        reset = True
    except OSError:
        reset = False
    baseline_kb = _status_kb("VmRSS")
    dm.setup("fit")
    dm.setup("test")
    loaders = [dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()]
    peak_kb = _status_kb("VmHWM")
    image_bytes = sum(a.images.nbytes for a in dm.arrays.values())
    return {
        "task": task_name,
        "downsample": downsample,
        "hwm_reset": reset,
        "samples": {k: len(a) for k, a in dm.arrays.items()},
        "image_bytes": image_bytes,
        "split_bytes": sum(a.nbytes for a in dm.arrays.values()),
        "baseline_bytes": baseline_kb * 1024,
        "peak_bytes": peak_kb * 1024,
        "batches": sum(len(lo) for lo in loaders),
    }


def memory(task_name: str = "roi_c3", downsample: int = 1) -> dict[str, Any]:
    """Peak RSS above baseline of building ``task_name`` in a fresh subprocess, over uint8 bytes."""
    code = (
        f"import json, sys; sys.path.insert(0, {str(ROOT)!r}); from benchmarks.bench_data import "
        f"_memory_child; print(json.dumps(_memory_child({task_name!r}, {downsample})))"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=env, check=False)
    if proc.returncode:
        raise RuntimeError(f"memory child failed: {proc.stderr[-2000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["above_baseline_bytes"] = out["peak_bytes"] - out["baseline_bytes"]
    out["ratio"] = out["above_baseline_bytes"] / out["image_bytes"]
    return out


# -- report -----------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-memory", action="store_true")
    args = parser.parse_args(argv)

    figures: dict[str, Any] = {"throughput": throughput(args.tiles, args.batch, args.repeats)}
    t = figures["throughput"]
    r = t["batches_per_s"]
    print(
        f"## Augmented {TILE}x{TILE} ROI tiles (random flips, rot90, cast, normalise): {t['tiles']} tiles, "
        f"batch {t['batch']}, median of {args.repeats}\n"
    )
    print("| pipeline | threads | batches/s |\n|---|---|---|")
    print(f"| ours: ArrayBatchLoader + `augment_training_batch` | 1 | {r['ours_1t']:.1f} |")
    print(f"| (previous: ArrayBatchLoader + to_float, geometric) | 1 | {r['ours_sequential_1t']:.1f} |")
    print(f"| torchvision Dataset/DataLoader, per item, num_workers=0 | 1 | {r['torchvision_w0_1t']:.1f} |")
    print(f"| ours | {t['threads']} | {r['ours']:.1f} |")
    print(f"| torchvision, per item, num_workers=0 | {t['threads']} | {r['torchvision_w0']:.1f} |")
    print(f"| torchvision, per item, num_workers=2 | 2 workers x 1 | {r['torchvision_w2']:.1f} |")
    print(f"| **speed-up, whole machine (ours vs the faster torchvision)** | | **{t['speedup']:.1f}x** |")
    print(f"| speed-up, one core each | 1 | {t['speedup_one_core']:.1f}x |")
    print(f"| speed-up vs the previous batched path, one core | 1 | {t['speedup_vs_sequential_one_core']:.1f}x |\n")
    c = t["cpu_ms_per_batch"]
    print(
        f"CPU ms/batch, one thread: ours {c['ours_1t']:.2f}, previous {c['ours_sequential_1t']:.2f}, "
        f"torchvision num_workers=0 {c['torchvision_w0_1t']:.2f} ({t['cpu_speedup_one_core']:.1f}x)\n"
    )
    checks = [
        {
            "name": "augmented 128x128 tiles/s vs torchvision per item (whole machine)",
            "value": round(t["speedup"], 2),
            "target": f">= {THROUGHPUT_TARGET:g}",
            "passed": t["speedup"] >= THROUGHPUT_TARGET,
        }
    ]
    if not args.skip_memory:
        figures["memory"] = m = memory()
        gb = 1e9
        print(f"## Holding ROI-C3 at downsample 1 ({sum(m['samples'].values())} tiles: {m['samples']})\n")
        print("| uint8 image bytes | peak RSS above baseline | ratio |\n|---|---|---|")
        print(f"| {m['image_bytes'] / gb:.3f} GB | {m['above_baseline_bytes'] / gb:.3f} GB | **{m['ratio']:.2f}x** |")
        if not m["hwm_reset"]:
            print("\n(VmHWM could not be reset; the peak includes import transients)")
        checks.append(
            {
                "name": "ROI-C3 peak RSS / uint8 bytes",
                "value": round(m["ratio"], 3),
                "target": f"<= {MEMORY_TARGET:g}",
                "passed": m["ratio"] <= MEMORY_TARGET,
            }
        )
    figures["checks"] = checks
    return figures


if __name__ == "__main__":
    main()
