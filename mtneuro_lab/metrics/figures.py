"""Figures of predictions as RGB arrays: confusion matrices, image panels, scatter plots.

Drawn with matplotlib's object API (a ``Figure`` on its own Agg canvas, no ``pyplot``), so they
can be rendered off the training thread (:mod:`mtneuro_lab.media`) without touching pyplot's
global state. Every function returns ``(H, W, 3)`` uint8; :func:`png_bytes` encodes one.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

#: class colours: background dark, then vessel red, cell green, axon blue, more after them
CLASS_COLOURS = ["#202020", "#e41a1c", "#4daf4a", "#377eb8", "#ff7f00", "#984ea3", "#ffff33", "#a65628"]


def _figure(width: float, height: float, dpi: int = 80):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def _rgb(fig) -> np.ndarray:
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def png_bytes(rgb: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb)).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def class_colours(k: int) -> list[str]:
    return (CLASS_COLOURS * (k // len(CLASS_COLOURS) + 1))[:k]


def confusion_image(counts: np.ndarray, class_names: Sequence[str], title: str = "") -> np.ndarray:
    """Row-normalised confusion matrix (recall on the diagonal) with the counts in each cell."""
    counts = np.asarray(counts, dtype=np.int64)
    totals = counts.sum(axis=1, keepdims=True)
    norm = np.divide(counts, totals, out=np.zeros(counts.shape, dtype=float), where=totals > 0)
    k = len(class_names)
    fig = _figure(1.1 * k + 2, 1.1 * k + 1.5)
    ax = fig.add_subplot()
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i in range(k):
        for j in range(k):
            colour = "white" if norm[i, j] > 0.5 else "black"
            ax.text(j, i, f"{norm[i, j]:.2f}\n({counts[i, j]})", ha="center", va="center", fontsize=7, color=colour)
    ax.set_xticks(range(k), class_names, rotation=45, ha="right")
    ax.set_yticks(range(k), class_names)
    ax.set_xlabel("prediction")
    ax.set_ylabel("truth")
    ax.set_title(title or "confusion (row-normalised)", fontsize=9)
    fig.tight_layout()
    return _rgb(fig)


@dataclass
class Panel:
    """One image of a panel grid: a grey image, optionally with a class map or a heat map over it."""

    image: np.ndarray | None = None  # (H, W) grey values
    classes: np.ndarray | None = None  # (H, W) class indices, drawn in CLASS_COLOURS
    heat: np.ndarray | None = None  # (H, W) values in [0, 1] (probabilities), drawn with a colour map
    labels: np.ndarray | None = None  # (H, W) instance ids, drawn in random colours (0 = background)
    title: str = ""


def _instance_colours(labels: np.ndarray) -> np.ndarray:
    ids = np.unique(labels)
    rng = np.random.default_rng(0)
    lut = {int(i): rng.uniform(0.2, 1.0, 3) for i in ids if i != 0}
    out = np.zeros((*labels.shape, 3))
    for i, colour in lut.items():
        out[labels == i] = colour
    return out


def panel_grid(rows: Sequence[Sequence[Panel]], class_names: Sequence[str] = (), title: str = "") -> np.ndarray:
    """A grid of panels (one row per sample or slice), with a class legend when classes are shown."""
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    n_rows, n_cols = len(rows), max(len(r) for r in rows)
    k = max(len(class_names), 1)
    cmap = ListedColormap(class_colours(k))
    fig = _figure(2.3 * n_cols, 2.3 * n_rows + (0.5 if class_names else 0.2))
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    for r, row in enumerate(rows):
        for c in range(n_cols):
            ax = axes[r, c]
            ax.axis("off")
            if c >= len(row):
                continue
            p = row[c]
            if p.image is not None:
                ax.imshow(p.image, cmap="gray")
            if p.classes is not None:
                alpha = 0.45 if p.image is not None else 1.0
                ax.imshow(p.classes, cmap=cmap, vmin=-0.5, vmax=k - 0.5, alpha=alpha, interpolation="nearest")
            if p.heat is not None:
                ax.imshow(p.heat, cmap="magma", vmin=0, vmax=1, alpha=0.6 if p.image is not None else 1.0)
            if p.labels is not None:
                alpha = 0.5 if p.image is not None else 1.0
                ax.imshow(_instance_colours(p.labels), alpha=alpha, interpolation="nearest")
            ax.set_title(p.title, fontsize=8)
    if class_names:
        handles = [Patch(color=col, label=name) for col, name in zip(class_colours(k), class_names)]
        fig.legend(handles=handles, loc="lower center", ncol=k, fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.05 if class_names else 0, 1, 1))
    return _rgb(fig)


def scatter_image(
    x: np.ndarray,
    y: np.ndarray,
    xlabel: str,
    ylabel: str,
    title: str = "",
    colour: np.ndarray | None = None,
    colour_label: str = "",
    diagonal: bool = False,
) -> np.ndarray:
    """Points ``(x, y)``, coloured by ``colour`` (NaN in grey); ``diagonal`` draws ``y = x``."""
    fig = _figure(4.6, 4.0, dpi=90)
    ax = fig.add_subplot()
    if colour is None:
        ax.scatter(x, y, s=4, alpha=0.6)
    else:
        ok = ~np.isnan(colour)
        if (~ok).any():
            ax.scatter(x[~ok], y[~ok], s=3, c="lightgrey")
        points = ax.scatter(x[ok], y[ok], s=3, c=colour[ok], cmap="viridis")
        fig.colorbar(points, ax=ax, label=colour_label)
    if diagonal and len(x):
        lo, hi = float(np.nanmin([x.min(), y.min()])), float(np.nanmax([x.max(), y.max()]))
        ax.plot([lo, hi], [lo, hi], color="black", linewidth=0.8)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    return _rgb(fig)
