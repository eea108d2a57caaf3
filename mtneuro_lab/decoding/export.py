"""Instance outputs as one compressed HDF5 file that napari and neuroglancer users can open.

``write_predictions(path, segmentation, probabilities, image, attrs)`` writes, gzip-compressed
and chunked: ``segmentation`` ``(Z, Y, X)`` uint32/uint64 instance ids (0 = background),
``probabilities`` ``(C, Z, Y, X)`` float16 network output (the raw prediction, after the
activation), ``image`` ``(Z, Y, X)`` the input volume; ``attrs`` (task, target channels, the
post-processing values applied) as file attributes. The file appears atomically: written
under a temporary name in the same directory, then renamed (docs/em.md shows how to open it).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np


def _chunks(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Chunks of at most 16 sections x 256 x 256 (per channel): good for slicing and viewers."""
    lead, (z, y, x) = shape[:-3], shape[-3:]
    return (*(1 for _ in lead), min(z, 16), min(y, 256), min(x, 256))


def write_predictions(
    path: str | Path,
    segmentation: np.ndarray,
    probabilities: np.ndarray,
    image: np.ndarray,
    attrs: Mapping[str, Any] | None = None,
) -> Path:
    """Write the three volumes (gzip level 4) to ``path`` atomically; returns the path."""
    import h5py

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    seg = np.asarray(segmentation)
    seg = seg.astype(np.uint32 if seg.size == 0 or seg.max() < 2**32 else np.uint64)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".h5")
    os.close(fd)
    try:
        with h5py.File(tmp, "w") as f:
            for name, arr in (
                ("segmentation", seg),
                ("probabilities", np.asarray(probabilities, dtype=np.float16)),
                ("image", np.asarray(image)),
            ):
                f.create_dataset(name, data=arr, compression="gzip", compression_opts=4, chunks=_chunks(arr.shape))
            for key, value in (attrs or {}).items():
                f.attrs[key] = value
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
