"""Phantom X-ray generator: speed and faithfulness to the real data, v2 (default) against v1.

Writes docs/phantom.md (blocks ``phantom_generation``, ``phantom_fractions``,
``phantom_quadrants``, ``phantom_composition``, ``phantom_slabs``, ``phantom_shortcuts``) and prints the same Markdown
(docs/benchmarks.md quotes it through ``make bench``):

* generation time of set A (four 380x256x256 cubes), v2 / v1 measured in one run, one thread;
* class fractions of all 12 cubes of sets A, C, D against the paper's per-region percentages;
* per 64x64 quadrant mean and std of the Task 3 features (``mtneuro_lab.data.features``) of
  the phantom against the real manual masks (``masks_<ctx|str|trn|zi>.npz``: 32 non-adjacent
  128x128 slices each, so their cells are labelled per slice; the phantom's in 3D);
* how well that per-quadrant composition alone names the region (logistic regression,
  z-block folds), in the masks and in the phantom: the part of region separability that
  calibrating on the masks cannot remove;
* ROI-C1's z slabs of set A's vp and zi cubes: how far the val and test slabs' mean intensity,
  axon fraction and orientation coherence sit from the training slab's, today's defaults
  against session 4's slow section fields and brightness drifts;
* region classification by shortcut baselines on whole slices: slice mean, PCA(50) of 64x64
  pixels, 7 texture statistics (each + logistic regression), ROI-C1 (set A, train z 110-379, val
  z 380-409, test z 420-469) and ROI-C2 (train set A z 110-469, test sets C and D z 110-469).

``--part supervised`` (HEAVY, ~5-10 min per epoch on 2 shared cores; ``--recipe quickstart``,
make run's ImageNet stem that downsamples before the residual stages, is far cheaper) instead
trains the supervised ResNet-18 of ``benchmarks/bench_task1.py`` (64x64 tiles, batch 64,
``--epochs`` 10, seed 1, checkpoint chosen by ``val/acc``, ROI-C2 tested with the ROI-C1 checkpoint) with and without
``data.augment.intensity_jitter`` and writes the ``phantom_supervised`` block.

Usage: ``python benchmarks/bench_phantom.py [--masks DIR] [--no-doc] [--part supervised --out DIR]``
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mtneuro_lab.data.features import (  # noqa: E402
    BOSSDB,
    FEATURES,
    PRASAD2020_MASKS,
    cube_features,
    label_cells,
    label_cells_per_slice,
)
from mtneuro_lab.data.sources import phantom, phantom_v2  # noqa: E402
from mtneuro_lab.data.sources.phantom_tissue import draw_set, tissue_config  # noqa: E402

MASKS_DIR = ROOT.parent / "shared" / "data" / "prasad2020_sparse_masks"
DOC = ROOT / "docs" / "phantom.md"
REAL_FILE = {"cortex": "ctx", "striatum": "str", "vp": "trn", "zi": "zi"}
REGIONS = tuple(REAL_FILE)
#: (x0, y0) of every region's cube in the sets the ROI-C1/C2 tasks use (mtneuro_lab/conf/cubes/paper.yaml)
SETS = {
    "A": {"cortex": (4600, 900), "striatum": (3700, 500), "vp": (3063, 850), "zi": (1543, 650)},
    "C": {"cortex": (5056, 644), "striatum": (3344, 400), "vp": (2151, 950), "zi": (1031, 906)},
    "D": {"cortex": (4600, 400), "striatum": (3800, 244), "vp": (2295, 694), "zi": (1799, 650)},
}
SHAPE = (380, 256, 256)  # z 100-480
Z0 = 100
TARGET = {  # paper, % background, vessel, cell, axon
    "cortex": (93.1, 2.3, 4.6, 0.0),
    "striatum": (72.6, 2.5, 5.7, 19.2),
    "vp": (22.8, 4.7, 5.7, 66.8),
    "zi": (32.2, 5.4, 9.4, 53.0),
}
#: Task 3 features compared (nn_distance depends on the 128x128 extent of the masks' slices)
COMPARED = ("vessel_density", "axon_density", "cell_count", "cell_size")
QUADRANT_STEP = 4  # every 4th phantom slice: neighbouring slices repeat the same cells

Cubes = dict[str, dict[str, dict[str, np.ndarray]]]


def generate(seed: int = 0) -> tuple[Cubes, dict[str, float]]:
    """v1 set A and v2 sets A, C, D; CPU seconds of each generator on set A."""
    tissue = tissue_config(None)
    cubes: Cubes = {"v1": {}}
    seconds = {"v1": 0.0, "v2": 0.0}
    for region, (x0, y0) in SETS["A"].items():
        start = time.process_time()
        cubes["v1"][region] = phantom.generate_cube(region, phantom.seed_key(seed, region, x0, y0), SHAPE)
        seconds["v1"] += time.process_time() - start
    for set_name, members in SETS.items():
        draw = draw_set(seed, set_name, tissue)
        cubes[set_name] = {}
        for region, (x0, y0) in members.items():
            start = time.process_time()
            key = phantom_v2.seed_key(seed, region, x0, y0)
            cubes[set_name][region] = phantom_v2.generate_cube(region, key, SHAPE, tissue, draw)
            if set_name == "A":
                seconds["v2"] += time.process_time() - start
    return cubes, seconds


# --------------------------------------------------------------------------- calibration


def quadrant_stats(features: np.ndarray) -> dict[str, tuple[float, float]]:
    """Mean and std of each compared feature over the quadrants where it is defined."""
    out = {}
    for name in COMPARED:
        column = features[:, FEATURES.index(name)]
        column = column[np.isfinite(column)]
        out[name] = (float(column.mean()), float(column.std()))
    return out


def real_quadrants(masks_dir: Path, region: str) -> dict[str, tuple[float, float]] | None:
    path = masks_dir / f"masks_{REAL_FILE[region]}.npz"
    if not path.is_file():
        return None
    masks = np.load(path)["arr_0"]
    cells = label_cells_per_slice(masks, PRASAD2020_MASKS)
    return quadrant_stats(cube_features(masks, grid=2, encoding=PRASAD2020_MASKS, cells=cells))


def phantom_quadrants(labels: np.ndarray) -> dict[str, tuple[float, float]]:
    cells = label_cells(labels, BOSSDB)[::QUADRANT_STEP]
    return quadrant_stats(cube_features(labels[::QUADRANT_STEP], grid=4, cells=cells))


def quadrant_table(cubes: Cubes, masks_dir: Path) -> tuple[str, dict[str, Any]]:
    """Markdown: per region and feature, phantom v2 (sets A, C, D pooled) vs masks vs v1."""
    rows = [
        "| region | feature | masks mean | v2 mean (ratio) | v1 mean | masks std | v2 std (ratio) | v1 std |",
        "|---|---|---|---|---|---|---|---|",
    ]
    figures: dict[str, Any] = {}
    for region in REGIONS:
        real = real_quadrants(masks_dir, region)
        per_set = [phantom_quadrants(cubes[s][region]["pixel_labels"]) for s in SETS]
        v2 = {n: (np.mean([p[n][0] for p in per_set]), np.mean([p[n][1] for p in per_set])) for n in COMPARED}
        v1 = phantom_quadrants(cubes["v1"][region]["pixel_labels"])
        for name in COMPARED:
            if real is None or real[name][0] == 0:
                anchor = "masks file missing" if real is None else "not annotated in the masks"
                rows.append(
                    f"| {region} | {name} | {anchor} | {v2[name][0]:.4g} | {v1[name][0]:.4g} | | "
                    f"{v2[name][1]:.4g} | {v1[name][1]:.4g} |"
                )
                continue
            ratio_mean, ratio_std = v2[name][0] / real[name][0], v2[name][1] / real[name][1]
            figures[f"{region}/{name}"] = {"mean_ratio": ratio_mean, "std_ratio": ratio_std}
            rows.append(
                f"| {region} | {name} | {real[name][0]:.4g} | {v2[name][0]:.4g} ({ratio_mean:.2f}) | "
                f"{v1[name][0]:.4g} | {real[name][1]:.4g} | {v2[name][1]:.4g} ({ratio_std:.2f}) | {v1[name][1]:.4g} |"
            )
    return "\n".join(rows), figures


def fraction_table(cubes: Cubes) -> tuple[str, float]:
    rows = ["| cube | background | vessel | cell | axon | max rel. diff (classes > 0) |", "|---|---|---|---|---|---|"]
    worst = 0.0
    for set_name in SETS:
        for region, cube in cubes[set_name].items():
            pct = 100 * np.bincount(cube["pixel_labels"].ravel(), minlength=4) / cube["pixel_labels"].size
            target = np.asarray(TARGET[region])
            rel = np.abs(pct[1:] - target[1:])[target[1:] > 0] / target[1:][target[1:] > 0]
            worst = max(worst, float(rel.max()))
            shown = " | ".join(f"{p:.2f} / {t:.1f}" for p, t in zip(pct, target, strict=True))
            rows.append(f"| {set_name}/{region} | {shown} | {100 * rel.max():.1f} % |")
    return "\n".join(rows), worst


#: per-quadrant composition read by a logistic regression: what the masks can anchor in every
#: region (their zi axons are not annotated, so axon density would name zi by annotation)
COMPOSITION = ("vessel_density", "cell_count", "cell_size")
COMPOSITION_FOLDS = 4
COMPOSITION_GAP = 12  # phantom slices dropped beside a held-out z block (they share cells and vessels)


def _logistic(*steps: Any) -> Any:
    """Standardised features (then ``steps``) and a logistic regression: every baseline here."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), *steps, LogisticRegression(max_iter=3000))


def _composition(features: np.ndarray, names: tuple[str, ...]) -> np.ndarray:
    """Columns ``names`` of :func:`cube_features` rows; no cell in a quadrant means size 0."""
    return np.nan_to_num(features[:, [FEATURES.index(n) for n in names]], nan=0.0)


def _blocked_accuracy(x: np.ndarray, y: np.ndarray, z: np.ndarray, gap: int) -> float:
    """Accuracy pooled over contiguous z-block folds (every quadrant of a slice on one side)."""
    from mtneuro_lab.data.semantic_task import blocked_folds

    hits = 0
    for fit, held in blocked_folds(z, COMPOSITION_FOLDS, gap):
        model = _logistic().fit(x[fit], y[fit])
        hits += int((model.predict(x[held]) == y[held]).sum())
    return hits / len(y)


def _phantom_features(cubes: Cubes, set_name: str, grid: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`cube_features` rows of every region's cube of one set (every 4th slice), regions, z."""
    xs, ys, zs = [], [], []
    for r, region in enumerate(REGIONS):
        labels = cubes[set_name][region]["pixel_labels"]
        feats = cube_features(labels[::QUADRANT_STEP], grid=grid, cells=label_cells(labels, BOSSDB)[::QUADRANT_STEP])
        xs.append(feats)
        ys.append(np.full(len(feats), r))
        zs.append(np.repeat(np.arange(len(feats) // grid**2) * QUADRANT_STEP, grid**2))
    return np.concatenate(xs), np.concatenate(ys), np.concatenate(zs)


def _mask_features(masks_dir: Path, grids: tuple[int, ...]) -> dict[int, tuple[np.ndarray, ...]] | None:
    """Per grid, :func:`cube_features` rows of the four masks files (tiles of each 128x128 slice), regions, slices."""
    parts: dict[int, list[tuple[np.ndarray, ...]]] = {g: [] for g in grids}
    for r, region in enumerate(REGIONS):
        path = masks_dir / f"masks_{REAL_FILE[region]}.npz"
        if not path.is_file():
            return None
        masks = np.load(path)["arr_0"]
        cells = label_cells_per_slice(masks, PRASAD2020_MASKS)
        for g in grids:
            feats = cube_features(masks, grid=g, encoding=PRASAD2020_MASKS, cells=cells)
            parts[g].append((feats, np.full(len(feats), r), np.repeat(np.arange(len(masks)), g**2)))
    return {g: tuple(np.concatenate(column) for column in zip(*p, strict=True)) for g, p in parts.items()}


#: (tile side in phantom pixels, phantom grid of a 256x256 slice, masks grid of a 128x128 slice or None)
COMPOSITION_SCALES = ((64, 4, 2), (128, 2, 1), (256, 1, None))


def composition_separability(cubes: Cubes, masks_dir: Path) -> tuple[str, dict[str, Any]]:
    """How well composition alone names the region, in the masks and in the phantom, per tile size.

    The same features (the project's Task 3 code) and the same linear read-out on both: what
    the masks' own tiles allow, a baseline that estimates composition from pixels can reach on
    a phantom calibrated on them, whatever the phantom does with texture. The masks' slices are
    128x128, so they cannot anchor a 256x256 Task 1 tile."""
    figures: dict[str, Any] = {}
    masks = _mask_features(masks_dir, tuple(g for _, _, g in COMPOSITION_SCALES if g is not None))
    rows = [
        f"| tile | quadrant features (+ logistic) | masks ({COMPOSITION_FOLDS} folds by slice) | "
        f"v2 set A ({COMPOSITION_FOLDS} z-block folds, gap {COMPOSITION_GAP}) | v2 set A -> sets C, D |",
        "|---|---|---|---|---|",
    ]
    for side, grid, masks_grid in COMPOSITION_SCALES:
        phantom = {s: _phantom_features(cubes, s, grid) for s in SETS}
        for label, names in (
            ("vessel density, cell count, cell size", COMPOSITION),
            ("the same + axon density", (*COMPOSITION, "axon_density")),
        ):
            feats, y, z = phantom["A"]
            x = _composition(feats, names)
            within = _blocked_accuracy(x, y, z, COMPOSITION_GAP)
            model = _logistic().fit(x, y)
            hits = [model.predict(_composition(f, names)) == yo for s, (f, yo, _) in phantom.items() if s != "A"]
            transfer = float(np.mean(np.concatenate(hits)))
            masks_acc = None
            if masks is not None and masks_grid is not None and names == COMPOSITION:
                m_feats, m_y, m_z = masks[masks_grid]
                masks_acc = _blocked_accuracy(_composition(m_feats, names), m_y, m_z, gap=0)
            figures[f"{side}/{label}"] = {"masks": masks_acc, "v2_A": within, "v2_A_to_CD": transfer}
            if masks_acc is not None:
                shown = f"{masks_acc:.3f}"
            elif masks_grid is None:
                shown = "larger than the masks' slices"
            else:
                shown = "zi axons not annotated"
            rows.append(f"| {side}x{side} | {label} | {shown} | {within:.3f} | {transfer:.3f} |")
    return "\n".join(rows), figures


# --------------------------------------------------------------------------- z slabs

#: ROI-C1's z splits of a cube (half-open, BossDB z): what a task trains, validates and tests on
ROI_C1_SLABS = {"train": (110, 380), "val": (380, 410), "test": (420, 470)}
#: the session-4 defaults of the settings that set how fast tissue and brightness change along z
SESSION4_Z = {"slab": 96.0, "drift": [60.0, 4.0 * SHAPE[0]]}
SLAB_STATS = ("mean intensity", "axon fraction", "orientation coherence")


def slice_stats(cube: dict[str, np.ndarray]) -> np.ndarray:
    """Per slice: mean intensity, axon fraction, orientation coherence (texture statistic 1)."""
    images, labels = cube["image"], cube["pixel_labels"]
    return np.array(
        [
            (float(im.mean()), float((lab == phantom.AXON).mean()), texture_features(im.astype(np.float32))[0])
            for im, lab in zip(images, labels, strict=True)
        ]
    )


def slab_rows(name: str, cube: dict[str, np.ndarray]) -> list[str]:
    """How far the val and test slabs' means sit from the training slab's (in training-slice std),
    the share of test slices inside the central 95 % of the training slices, and how much the
    means of 50-slice windows vary (their std over windows every 10 slices of z 110-469, in
    slice std: near 1 when the cube changes slowly along z, small when a window holds many
    independent sections; the process behind the other columns, which are one draw of it)."""
    stats = slice_stats(cube)
    span = stats[ROI_C1_SLABS["train"][0] - Z0 : ROI_C1_SLABS["test"][1] - Z0]
    windows = np.array([span[z : z + 50].mean(axis=0) for z in range(0, len(span) - 49, 10)])
    window_ratio = windows.std(axis=0) / span.std(axis=0)
    part = {split: stats[a - Z0 : b - Z0] for split, (a, b) in ROI_C1_SLABS.items()}
    train = part["train"]
    low, high = np.percentile(train, 2.5, axis=0), np.percentile(train, 97.5, axis=0)
    inside = ((part["test"] >= low) & (part["test"] <= high)).mean(axis=0)
    rows = []
    for i, stat in enumerate(SLAB_STATS):
        shift = {s: (part[s][:, i].mean() - train[:, i].mean()) / train[:, i].std() for s in ("val", "test")}
        rows.append(
            f"| {name} | {stat} | {train[:, i].mean():.3g} ± {train[:, i].std():.2g} | {shift['val']:+.2f} | "
            f"{shift['test']:+.2f} | {100 * inside[i]:.0f} % | {window_ratio[i]:.2f} |"
        )
    return rows


def slab_table(cubes: Cubes, seed: int = 0) -> str:
    """vp and zi of set A (the pair ROI-C1 confused), today's defaults against session 4's z scales."""
    old = tissue_config(SESSION4_Z)
    draw = draw_set(seed, "A", old)
    rows = [
        "| cube, settings | per-slice statistic | train slab mean ± std | val shift (train std) | "
        "test shift (train std) | test slices inside train 95 % | 50-slice window means, std / slice std |",
        "|---|---|---|---|---|---|---|",
    ]
    for region in ("vp", "zi"):
        x0, y0 = SETS["A"][region]
        before = phantom_v2.generate_cube(region, phantom_v2.seed_key(seed, region, x0, y0), SHAPE, old, draw)
        rows += slab_rows(f"A/{region}, slab 96, drift 60-1520 (session 4)", before)
        rows += slab_rows(f"A/{region}, defaults", cubes["A"][region])
    return "\n".join(rows)


# --------------------------------------------------------------------------- shortcuts


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


def _slice_inputs(images: np.ndarray) -> dict[str, np.ndarray]:
    images = images.astype(np.float32)
    n = len(images)
    return {
        "slice mean": images.mean((1, 2))[:, None],
        "PCA(50) of 64x64 pixels": images.reshape(n, 64, 4, 64, 4).mean((2, 4)).reshape(n, -1),
        "7 texture statistics": np.array([texture_features(im) for im in images]),
    }


def shortcut_accuracies(cubes: dict[str, dict[str, np.ndarray]] | Cubes, sets: tuple[str, ...]) -> dict[str, Any]:
    """Test accuracy of each baseline (+ logistic regression) on ROI-C1 and ROI-C2 splits."""
    from sklearn.decomposition import PCA

    z = np.arange(Z0, Z0 + SHAPE[0])
    parts = {s: _slice_inputs(np.concatenate([cubes[s][r]["image"] for r in REGIONS])) for s in sets}
    region = np.repeat(np.arange(len(REGIONS)), SHAPE[0])
    zz = np.tile(z, len(REGIONS))
    splits = {
        "ROI-C1 val": ({"A": (zz >= 110) & (zz < 380)}, {"A": (zz >= 380) & (zz < 410)}),
        "ROI-C1": ({"A": (zz >= 110) & (zz < 380)}, {"A": (zz >= 420) & (zz < 470)}),
        "ROI-C2": (
            {"A": (zz >= 110) & (zz < 470)},
            {s: (zz >= 110) & (zz < 470) for s in sets if s != "A"},
        ),
    }
    results: dict[str, Any] = {}
    for name in parts["A"]:
        results[name] = {}
        for split, (train, test) in splits.items():
            if not test or any(s not in parts for s in test):
                continue
            x_train = np.concatenate([parts[s][name][m] for s, m in train.items()])
            y_train = np.concatenate([region[m] for m in train.values()])
            x_test = np.concatenate([parts[s][name][m] for s, m in test.items()])
            y_test = np.concatenate([region[m] for m in test.values()])
            model = _logistic(*([PCA(50, random_state=0)] if "PCA" in name else []))
            model.fit(x_train, y_train)
            results[name][split] = float(np.mean(model.predict(x_test) == y_test))
    return results


def shortcut_table(v2: dict[str, Any], v1: dict[str, Any]) -> str:
    rows = [
        "| baseline (+ logistic) | v2 ROI-C1 val (z 380-409) | v2 ROI-C1 | v2 ROI-C2 | v1 ROI-C1 |",
        "|---|---|---|---|---|",
    ]
    for name in v2:
        rows.append(
            f"| {name} | {v2[name]['ROI-C1 val']:.3f} | {v2[name]['ROI-C1']:.3f} | {v2[name]['ROI-C2']:.3f} | "
            f"{v1[name]['ROI-C1']:.3f} |"
        )
    return "\n".join(rows)


def main(masks_dir: Path = MASKS_DIR, write_doc: bool = False) -> dict[str, Any]:
    from benchmarks.doc_blocks import write_block

    wall, load = time.perf_counter(), os.getloadavg()
    cubes, seconds = generate()
    ratio = seconds["v2"] / seconds["v1"]
    generation = (
        "| generator | CPU s, set A (4 cubes 380x256x256, one thread) |\n|---|---|\n"
        f"| v1 | {seconds['v1']:.1f} |\n| v2 (default) | {seconds['v2']:.1f} |\n| **v2 / v1** | **{ratio:.2f}** |"
    )
    fractions, worst = fraction_table(cubes)
    quadrants, quadrant_figures = quadrant_table(cubes, masks_dir)
    blocks = {
        "phantom_generation": generation,
        "phantom_fractions": fractions + f"\n\nLargest relative difference from the paper: {100 * worst:.1f} %.",
        "phantom_quadrants": quadrants,
        "phantom_slabs": slab_table(cubes),
    }
    blocks["phantom_composition"], composition_figures = composition_separability(cubes, masks_dir)
    for name, markdown in blocks.items():
        print(f"## {name}\n\n{markdown}\n", flush=True)
    v2_short = shortcut_accuracies(cubes, ("A", "C", "D"))
    v1_short = shortcut_accuracies({"A": cubes["v1"]}, ("A",))
    blocks["phantom_shortcuts"] = shortcut_table(v2_short, v1_short)
    print(f"## phantom_shortcuts\n\n{blocks['phantom_shortcuts']}\n")
    elapsed = time.perf_counter() - wall
    if write_doc:
        extra = {"phantom seed": "0", "load average (1/5/15 min) at start": " ".join(f"{v:.1f}" for v in load)}
        for name, markdown in blocks.items():
            write_block(DOC, name, markdown, elapsed, extra)
    return {
        "generation_ratio_v2_v1": ratio,
        "max_fraction_rel_diff": worst,
        "quadrants": quadrant_figures,
        "composition": composition_figures,
        "shortcuts_v2": v2_short,
        "shortcuts_v1": v1_short,
    }


#: ``--recipe``: bench_task1's (small stem, SGD, batch 64) or make run's (ImageNet stem, AdamW
#: lr 1e-3, batch 32: far fewer FLOPs per tile), both on 64x64 tiles
RECIPES: dict[str, tuple[int, tuple[str, ...], str]] = {
    "task1": (64, (), "small stem, SGD (bench_task1's recipe)"),
    "quickstart": (
        32,
        ("model.stem=imagenet", "model.optimizer.name=adamw", "model.optimizer.lr=0.001"),
        "ImageNet stem, AdamW lr 0.001 (make run's recipe)",
    ),
}


def supervised(
    out_dir: Path,
    jitters: tuple[float, ...] = (0.0, 0.4),
    epochs: int = 10,
    write_doc: bool = False,
    recipe: str = "task1",
) -> dict[str, Any]:
    """A supervised ResNet-18 (``recipe``) on ROI-C1/ROI-C2 per intensity jitter, one arm after
    the other (finished runs are reused: arms may be trained by separate ``--jitters`` calls
    at the same time, then a last call with all of them writes the block)."""

    from benchmarks.bench_task1 import accuracy
    from benchmarks.doc_blocks import write_block

    batch, recipe_overrides, recipe_text = RECIPES[recipe]
    wall, load = time.perf_counter(), os.getloadavg()
    rows = ["| intensity jitter | chosen by (val/acc) | best epoch | ROI-C1 test/acc | ROI-C2 test/acc |"]
    rows.append("|---|---|---|---|---|")
    figures: dict[str, Any] = {}
    for jitter in jitters:
        extra = [*recipe_overrides, *([f"data.augment.intensity_jitter={jitter}"] if jitter else [])]
        runs = accuracy(
            out_dir / f"jitter{jitter}",
            models=("supervised",),
            seeds=(1,),
            epochs=epochs,
            batch_size=batch,
            jobs=1,
            extra=extra,
        )
        acc = {r["task"]: float(r["test/acc"]) for r in runs}
        first = runs[0]
        figures[str(jitter)] = acc
        rows.append(
            f"| {jitter} | {float(first['val/acc']):.3f} | {int(first['best_epoch'])} | "
            f"{acc.get('roi_c1', float('nan')):.3f} | {acc.get('roi_c2', float('nan')):.3f} |"
        )
    markdown = "\n".join(rows)
    print(markdown)
    if write_doc:
        extra_facts = {
            "budget (non-default CPU recipe)": f"task.downsample=4 (64x64 tiles), {recipe_text}, "
            f"data.batch_size={batch}, trainer.max_epochs={epochs}, seed 1",
            "load average (1/5/15 min) at start": " ".join(f"{v:.1f}" for v in load),
        }
        write_block(DOC, "phantom_supervised", markdown, time.perf_counter() - wall, extra_facts)
    return figures


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--masks", type=Path, default=MASKS_DIR)
    parser.add_argument("--no-doc", action="store_true", help="print only, do not write docs/phantom.md")
    parser.add_argument("--part", choices=("calibration", "supervised"), default="calibration")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench_phantom", help="supervised run dirs")
    parser.add_argument("--jitters", type=float, nargs="+", default=[0.0, 0.4])
    parser.add_argument("--epochs", type=int, default=10, help="supervised: trainer.max_epochs")
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="task1", help="supervised: training recipe")
    args = parser.parse_args()
    if args.part == "supervised":
        supervised(args.out, tuple(args.jitters), args.epochs, write_doc=not args.no_doc, recipe=args.recipe)
    else:
        main(args.masks, write_doc=not args.no_doc)
