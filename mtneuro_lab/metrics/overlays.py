"""Figures of a segmentation run: prediction overlays and the pooled confusion matrix.

Written by ``evaluate.py`` (through :meth:`SegmentationMethod.after_evaluate`) into the run
directory: ``overlays/<region>.png`` (one row per sample: image, truth, prediction) and
``confusion_matrix.csv`` (pixel counts, rows = truth, columns = prediction) plus
``confusion_matrix.png`` (row-normalised, i.e. per-class recall on the diagonal).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mtneuro_lab.io import atomic_write_bytes
from mtneuro_lab.metrics.figures import Panel, confusion_image, panel_grid, png_bytes


def middle_slice(stack: np.ndarray) -> np.ndarray:
    """A 2D view of one sample: itself (2D) or its middle slice (3D stack ``(D, H, W)``)."""
    return stack if stack.ndim == 2 else stack[stack.shape[0] // 2]


def write_overlays(
    images: np.ndarray,
    truths: np.ndarray,
    preds: np.ndarray,
    z: Sequence[int],
    class_names: Sequence[str],
    path: Path,
    title: str = "",
) -> Path:
    """One PNG, one row per sample: image | truth over image | prediction over image."""
    atomic_write_bytes(path, png_bytes(overlay_image(images, truths, preds, z, class_names, title)))
    return path


def overlay_image(
    images: np.ndarray,
    truths: np.ndarray,
    preds: np.ndarray,
    z: Sequence[int],
    class_names: Sequence[str],
    title: str = "",
) -> np.ndarray:
    """The figure of :func:`write_overlays` as an RGB array (also what the media callback logs)."""
    rows = []
    for row in range(len(images)):
        img, where = middle_slice(images[row]), f"(z={int(z[row])})"
        rows.append(
            [
                Panel(image=img, title=f"image {where}"),
                Panel(image=img, classes=middle_slice(truths[row]), title=f"truth {where}"),
                Panel(image=img, classes=middle_slice(preds[row]), title=f"prediction {where}"),
            ]
        )
    return panel_grid(rows, class_names, title)


def write_confusion(confusion: np.ndarray, class_names: Sequence[str], run_dir: Path) -> tuple[Path, Path]:
    """``confusion_matrix.csv`` (counts) and ``confusion_matrix.png`` (row-normalised) in ``run_dir``."""
    counts = np.asarray(confusion, dtype=np.int64)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["truth\\prediction", *class_names])
    for name, row in zip(class_names, counts):
        writer.writerow([name, *row.tolist()])
    csv_path = Path(run_dir) / "confusion_matrix.csv"
    atomic_write_bytes(csv_path, buf.getvalue().encode())

    png_path = Path(run_dir) / "confusion_matrix.png"
    image = confusion_image(counts, class_names, "confusion (row-normalised, pooled pixels)")
    atomic_write_bytes(png_path, png_bytes(image))
    return csv_path, png_path
