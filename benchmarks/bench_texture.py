"""Texture baseline (``model=texture``) feature throughput on one thread, default features.

    .venv/bin/python benchmarks/bench_texture.py            # print and write docs/task1.md
    .venv/bin/python benchmarks/bench_texture.py --no-doc   # print only

Per tile size (64x64 = ROI at ``task.downsample=4``, 128x128 = downsample 2): tiles per second of
the features computed from scratch (what the fit pass and a first epoch cost) and of a batch
whose features are all in the in-memory memo (what later epochs cost: canonical orientation +
digest + lookup). Tiles are smoothed noise; the cost does not depend on their content.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.doc_blocks import write_block  # noqa: E402

DOC = ROOT / "docs" / "task1.md"
SIZES = (64, 128)


def _tiles(n: int, size: int, seed: int = 0) -> np.ndarray:
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    noise = ndimage.gaussian_filter(rng.standard_normal((n, size, size)), (0, 1.5, 1.5))
    return np.clip(noise / noise.std() * 40 + 128, 0, 255).astype(np.uint8)


def throughput(size: int, n: int, repeats: int = 3) -> dict[str, float]:
    """Best-of-``repeats`` tiles/s: fresh features, and a fully memoised batch."""
    import torch

    from mtneuro_lab.methods.texture import TextureClassifier

    torch.set_num_threads(1)
    tiles = _tiles(n, size)
    x = torch.from_numpy(tiles).float().unsqueeze(1) / 255  # input_norm [0, 1]: raw intensities
    fresh, memo = [], []
    for _ in range(repeats):
        model = TextureClassifier(4, ["a", "b", "c", "d"], (size, size))
        start = time.perf_counter()
        model.raw_code(x)
        fresh.append(time.perf_counter() - start)
        start = time.perf_counter()
        model.raw_code(x)
        memo.append(time.perf_counter() - start)
    return {
        "features": float(model.embed_dim),
        "tiles": float(n),
        "fresh_tiles_per_s": n / min(fresh),
        "memo_tiles_per_s": n / min(memo),
    }


def table(results: dict[int, dict[str, float]]) -> str:
    rows = ["| tile | features | tiles/s, computed | tiles/s, from the memo |", "|---|---|---|---|"]
    for size, r in results.items():
        rows.append(
            f"| {size}x{size} | {int(r['features'])} | {r['fresh_tiles_per_s']:.0f} | {r['memo_tiles_per_s']:.0f} |"
        )
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-doc", action="store_true", help="print only, do not write docs/task1.md")
    parser.add_argument("--tiles", type=int, default=int(os.environ.get("MTNEURO_BENCH_TEXTURE_TILES", 256)))
    args = parser.parse_args(argv)
    start = time.perf_counter()
    results = {size: throughput(size, args.tiles) for size in SIZES}
    markdown = table(results)
    print(markdown)
    if not args.no_doc:
        write_block(
            DOC,
            "texture_speed",
            markdown,
            time.perf_counter() - start,
            {"threads": "1", "tiles per size": str(args.tiles), "load average (1 min)": f"{os.getloadavg()[0]:.1f}"},
        )
    return {f"{size}x{size}": r for size, r in results.items()}


if __name__ == "__main__":
    main()
