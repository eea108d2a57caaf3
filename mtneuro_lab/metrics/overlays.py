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

#: class colours: background dark, then vessel red, cell green, axon blue, more from tab10
_COLOURS = ["#202020", "#e41a1c", "#4daf4a", "#377eb8", "#ff7f00", "#984ea3", "#ffff33", "#a65628"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    _pyplot().close(fig)
    atomic_write_bytes(path, buf.getvalue())


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
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    plt = _pyplot()
    n, k = len(images), len(class_names)
    colours = (_COLOURS * (k // len(_COLOURS) + 1))[:k]
    cmap = ListedColormap(colours)
    fig, axes = plt.subplots(n, 3, figsize=(9, 3 * n), squeeze=False)
    for row in range(n):
        img = middle_slice(images[row])
        panels = [(None, "image"), (middle_slice(truths[row]), "truth"), (middle_slice(preds[row]), "prediction")]
        for col, (mask, label) in enumerate(panels):
            ax = axes[row, col]
            ax.imshow(img, cmap="gray", vmin=0, vmax=255)
            if mask is not None:
                ax.imshow(mask, cmap=cmap, vmin=-0.5, vmax=k - 0.5, alpha=0.45, interpolation="nearest")
            ax.set_title(f"{label} (z={int(z[row])})", fontsize=9)
            ax.axis("off")
    handles = [Patch(color=c, label=name) for c, name in zip(colours, class_names)]
    fig.legend(handles=handles, loc="lower center", ncol=k, fontsize=8)
    if title:
        fig.suptitle(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    _save(fig, path)
    return path


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

    plt = _pyplot()
    totals = counts.sum(axis=1, keepdims=True)
    norm = np.divide(counts, totals, out=np.zeros(counts.shape, dtype=float), where=totals > 0)
    k = len(class_names)
    fig, ax = plt.subplots(figsize=(1.2 * k + 2, 1.2 * k + 1.5))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i in range(k):
        for j in range(k):
            ax.text(
                j,
                i,
                f"{norm[i, j]:.2f}\n({counts[i, j]})",
                ha="center",
                va="center",
                fontsize=8,
                color="white" if norm[i, j] > 0.5 else "black",
            )
    ax.set_xticks(range(k), class_names, rotation=45, ha="right")
    ax.set_yticks(range(k), class_names)
    ax.set_xlabel("prediction")
    ax.set_ylabel("truth")
    ax.set_title("confusion (row-normalised, pooled pixels)")
    png_path = Path(run_dir) / "confusion_matrix.png"
    _save(fig, png_path)
    return csv_path, png_path
