"""Sliding-window prediction of volumes larger than memory: chunked input, chunked output.

:func:`predict_chunked` reads a ``(Z, Y, X)`` uint8 volume from any array that slices lazily
(an HDF5 dataset, a zarr array, a memory-mapped ``.npy``) and writes ``(C, Z, Y, X)``
probabilities into another such array (:func:`open_output` makes a chunked zarr or HDF5 one).
Windows, overlaps and Gaussian blending are exactly MONAI's (same window grid, same importance
map), so the result equals :func:`~mtneuro_lab.decoding.postprocess.sliding_window_predict`
on the whole volume up to float rounding; what differs is memory. Windows are processed in
order of their first section: once the windows starting at section ``s`` are reached, every
section before ``s`` is final and is normalised and written. Only one window depth of
sections is held (input slab, weighted sums, weights: ``(C + 2) x crop_z x Y x X`` float32),
so the volume's depth is unlimited; its in-plane extent must fit (a 1024 x 1024 plane with a
16-section crop and 3 channels is 320 MB).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mtneuro_lab.errors import ConfigError, DataError


@dataclass
class ChunkedStats:
    """What a chunked prediction did: windows, voxels, seconds (wall and process CPU)."""

    windows: int
    voxels: int
    wall_s: float
    cpu_s: float

    @property
    def voxels_per_s(self) -> float:
        return self.voxels / max(self.wall_s, 1e-9)


def window_grid(shape: Sequence[int], roi: Sequence[int], overlap: float) -> list[tuple[slice, slice, slice]]:
    """MONAI's window positions for a volume at least as large as ``roi`` in every axis."""
    from monai.data.utils import dense_patch_slices
    from monai.inferers.utils import _get_scan_interval

    interval = _get_scan_interval(tuple(shape), tuple(roi), 3, (overlap,) * 3)
    return [tuple(s) for s in dense_patch_slices(tuple(shape), tuple(roi), interval)]  # type: ignore[misc]


def open_output(
    path: str | Path, shape: Sequence[int], dtype: str = "float16", chunks: Sequence[int] | None = None
) -> Any:
    """A new chunked array at ``path``: ``.zarr`` (a zarr array) or ``.h5``/``.hdf5`` (dataset
    ``probabilities``, gzip). Existing files are replaced."""
    path = Path(path)
    chunks = tuple(chunks) if chunks is not None else (1, *(min(s, c) for s, c in zip(shape[1:], (16, 256, 256))))
    if path.suffix == ".zarr":
        import zarr

        return zarr.open_array(str(path), mode="w", shape=tuple(shape), chunks=chunks, dtype=dtype)
    if path.suffix in (".h5", ".hdf5"):
        import h5py

        f = h5py.File(path, "w")
        return f.create_dataset("probabilities", shape=tuple(shape), dtype=dtype, chunks=chunks, compression="gzip")
    raise ConfigError(f"output: {path} must end in .zarr, .h5 or .hdf5")


def predict_chunked(
    predictor: Callable[[torch.Tensor], torch.Tensor],
    source: Any,
    out: Any,
    roi: Sequence[int],
    normalize: Callable[[np.ndarray], torch.Tensor],
    overlap: float = 0.5,
    sw_batch_size: int = 4,
    sigma_scale: float = 0.125,
    key: str = "task.crop",
) -> ChunkedStats:
    """Predict ``source`` ``(Z, Y, X)`` into ``out`` ``(C, Z, Y, X)`` section slab by section slab.

    ``predictor`` maps ``(n, 1, *roi)`` float windows to ``(n, C, *roi)`` probabilities;
    ``normalize`` turns a uint8 slab into the float tensor the model was trained on.
    """
    from monai.data.utils import compute_importance_map

    shape = tuple(int(s) for s in source.shape)
    roi = tuple(int(r) for r in roi)
    if len(shape) != 3:
        raise DataError(f"predict: expected a (z, y, x) volume, got shape {shape}")
    if any(s < r for s, r in zip(shape, roi)):
        raise ConfigError(f"{key}: {list(roi)} is larger than the volume {list(shape)}; use a smaller crop")
    channels = int(out.shape[0])
    if tuple(out.shape[1:]) != shape:
        raise DataError(f"predict: output shape {tuple(out.shape)} does not hold ({channels}, *{shape})")
    windows = sorted(window_grid(shape, roi, overlap), key=lambda w: (w[0].start, w[1].start, w[2].start))
    weight = compute_importance_map(roi, mode="gaussian", sigma_scale=sigma_scale, device="cpu")
    depth, (_, ny, nx) = roi[0], shape
    acc = torch.zeros(channels, depth, ny, nx)
    wsum = torch.zeros(depth, ny, nx)
    low = 0  # first section not yet written; acc/wsum row i holds section low + i
    cpu, wall = time.process_time(), time.perf_counter()

    def flush(until: int) -> None:
        nonlocal low
        if until <= low:
            return
        n = until - low
        prob = (acc[:, :n] / wsum[:n].clamp_min(1e-12)).numpy()
        out[:, low:until] = prob.astype(out.dtype)
        acc[:, : depth - n] = acc[:, n:].clone()
        acc[:, depth - n :] = 0
        wsum[: depth - n] = wsum[n:].clone()
        wsum[depth - n :] = 0
        low = until

    with torch.no_grad():
        i = 0
        while i < len(windows):
            z0 = windows[i][0].start
            flush(z0)
            group = [w for w in windows[i:] if w[0].start == z0]
            i += len(group)
            slab = normalize(np.asarray(source[z0 : z0 + depth]))  # (depth, Y, X)
            for b in range(0, len(group), sw_batch_size):
                batch = group[b : b + sw_batch_size]
                x = torch.stack([slab[:, w[1], w[2]] for w in batch])[:, None]  # (n, 1, *roi)
                pred = predictor(x) * weight  # (n, C, *roi)
                for w, p in zip(batch, pred):
                    acc[:, :, w[1], w[2]] += p
                    wsum[:, w[1], w[2]] += weight
        flush(shape[0])
    return ChunkedStats(len(windows), int(np.prod(shape)), time.perf_counter() - wall, time.process_time() - cpu)
