"""Phantom X-ray generator: speed and faithfulness to the real data.

Prints Markdown tables: single-core generation time for the four ROI-C1 cubes (set A, z 100-480),
class fractions against the paper's, cell sizes against the real manual masks, and a check that
mean brightness is not a region shortcut (linear probes on pixels vs. a few texture features,
trained on z 110-379 and tested on z 420-469 of the same cubes, as in ROI-C1).

The real masks (``masks_<ctx|str|trn|zi>.npz``, key ``arr_0``, 1 axon / 2 vessel / 3 cell) hold
32 *non-adjacent* annotated slices each: their cells never span two slices. So sizes are compared
as 2D cell-profile areas per slice, plus a stereological 3D volume estimate for the real data
(median section of a sphere of radius R has area 0.75 pi R^2).

Usage: ``python benchmarks/bench_phantom.py [MASKS_DIR]``
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

from mtneuro_lab.data.sources.phantom import PROFILES, generate_cube, seed_key

MASKS_DIR = Path("/work/shared/data/prasad2020_sparse_masks")
REAL_FILE = {"cortex": "ctx", "striatum": "str", "vp": "trn", "zi": "zi"}
SET_A = {"cortex": (4600, 900), "striatum": (3700, 500), "vp": (3063, 850), "zi": (1543, 650)}
SHAPE = (380, 256, 256)  # z 100-480
Z0 = 100
TARGET = {
    "cortex": (93.1, 2.3, 4.6, 0.0),
    "striatum": (72.6, 2.5, 5.7, 19.2),
    "vp": (22.8, 4.7, 5.7, 66.8),
    "zi": (32.2, 5.4, 9.4, 53.0),
}
EIGHT = np.ones((3, 3), dtype=bool)


def profile_areas(cells: np.ndarray, step: int = 1) -> np.ndarray:
    """Areas of 8-connected cell profiles in every ``step``-th z slice."""
    areas = [np.bincount(ndimage.label(plane, EIGHT)[0].ravel())[1:] for plane in cells[::step]]
    return np.concatenate(areas)


def real_cell_stats(masks_dir: Path, region: str) -> dict[str, float] | None:
    path = masks_dir / f"masks_{REAL_FILE[region]}.npz"
    if not path.is_file():
        return None
    masks = np.load(path)["arr_0"]
    area = float(np.median(profile_areas(masks == 3)))
    radius = np.sqrt(area / (0.75 * np.pi))
    return {
        "area": area,
        "volume": 4 / 3 * np.pi * radius**3,
        "cell_pct": 100 * float(np.mean(masks == 3)),
    }


def generate_all() -> tuple[dict[str, dict[str, np.ndarray]], dict[str, float]]:
    cubes, seconds = {}, {}
    for region, (x0, y0) in SET_A.items():
        start = time.perf_counter()
        cubes[region] = generate_cube(region, seed_key(0, region, x0, y0), SHAPE)
        seconds[region] = time.perf_counter() - start
    return cubes, seconds


def texture_features(image: np.ndarray) -> list[float]:
    """Brightness-free texture summary of one slice (orientation coherence, blob energy, tails)."""
    img = (image - image.mean()) / (image.std() + 1e-6)
    gy, gx = ndimage.sobel(img, 0), ndimage.sobel(img, 1)
    jxx, jyy, jxy = (gx * gx).mean(), (gy * gy).mean(), (gx * gy).mean()
    coherence = np.hypot(jxx - jyy, 2 * jxy) / (jxx + jyy)
    fine, coarse = ndimage.gaussian_laplace(img, 2.0), ndimage.gaussian_laplace(img, 5.0)
    return [
        coherence,
        (fine**2).mean(),
        (coarse**2).mean(),
        (img < -1).mean(),
        (img > 1).mean(),
        (img**3).mean(),
        (img**4).mean(),
    ]


def probe_accuracies(cubes: dict[str, dict[str, np.ndarray]]) -> dict[str, float]:
    """Test accuracy of region classifiers on whole slices (ROI-C1 z split)."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    images = np.concatenate([c["image"] for c in cubes.values()]).astype(np.float32)
    labels = np.repeat(np.arange(len(cubes)), SHAPE[0])
    z = np.tile(np.arange(Z0, Z0 + SHAPE[0]), len(cubes))
    train, test = (z >= 110) & (z < 380), (z >= 420) & (z < 470)
    pixels = images.reshape(len(images), 64, 4, 64, 4).mean((2, 4)).reshape(len(images), -1)
    features = {
        "slice mean only + logistic": images.mean((1, 2))[:, None],
        "PCA(50) of 64x64 pixels + logistic": pixels,
        "7 texture features + logistic": np.array([texture_features(im) for im in images]),
    }
    results = {}
    for name, x in features.items():
        steps = [StandardScaler()] + ([PCA(50, random_state=0)] if "PCA" in name else [])
        model = make_pipeline(*steps, LogisticRegression(max_iter=3000))
        model.fit(x[train], labels[train])
        results[name] = float(np.mean(model.predict(x[test]) == labels[test]))
    return results


def main(masks_dir: Path = MASKS_DIR) -> None:
    cubes, seconds = generate_all()
    print("## Generation (one core, set A, 4 cubes of 380x256x256)\n")
    print("| region | seconds | cells placed |\n|---|---|---|")
    for region in PROFILES:
        print(f"| {region} | {seconds[region]:.2f} | {int(cubes[region]['cell_count'])} |")
    print(f"| **total** | **{sum(seconds.values()):.2f}** (budget 30) | |\n")

    print("## Class fractions, % (phantom / paper target)\n")
    print("| region | background | vessel | cell | axon | max abs diff |\n|---|---|---|---|---|---|")
    for region, cube in cubes.items():
        pct = 100 * np.bincount(cube["pixel_labels"].ravel(), minlength=4) / cube["pixel_labels"].size
        cells = " | ".join(f"{p:.2f} / {t:.1f}" for p, t in zip(pct, TARGET[region]))
        print(f"| {region} | {cells} | {np.max(np.abs(pct - TARGET[region])):.2f} |")

    print("\n## Cell size (real manual masks vs phantom)\n")
    print(
        "| region (real file) | real median 2D profile area | phantom median 2D profile area "
        "| ratio | real est. 3D volume | phantom median 3D volume | real cell % in masks |"
    )
    print("|---|---|---|---|---|---|---|")
    for region, cube in cubes.items():
        cells = cube["pixel_labels"] == 2
        area = float(np.median(profile_areas(cells, step=4)))
        volume = float(np.median(np.bincount(ndimage.label(cells, np.ones((3, 3, 3)))[0].ravel())[1:]))
        real = real_cell_stats(masks_dir, region)
        if real is None:
            print(f"| {region} | n/a | {area:.0f} | n/a | n/a | {volume:.0f} | n/a |")
            continue
        print(
            f"| {region} ({REAL_FILE[region]}) | {real['area']:.0f} | {area:.0f} | "
            f"{area / real['area']:.2f} | {real['volume']:.0f} | {volume:.0f} | "
            f"{real['cell_pct']:.1f} |"
        )

    print("\n## Is brightness a shortcut? (train z 110-379, test z 420-469, chance 0.25)\n")
    print("| classifier | test accuracy |\n|---|---|")
    for name, accuracy in probe_accuracies(cubes).items():
        print(f"| {name} | {accuracy:.3f} |")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else MASKS_DIR)
