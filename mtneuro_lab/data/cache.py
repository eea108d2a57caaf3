"""Atomic, checksummed on-disk arrays.

A cached array is ``<name>.npy`` plus a sidecar ``<name>.json`` describing what it holds (shape,
dtype, sha256 of the ``.npy`` bytes, and caller metadata such as channel and range). Both are
written to temporary files in the same directory and renamed into place, the sidecar last, so a
reader either sees a complete, verified entry or none at all: an interrupted write never becomes
data. Readers verify the checksum once per process and then memory-map.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from mtneuro_lab.errors import DataError
from mtneuro_lab.io import atomic_write_bytes, sha256_file, write_temp

_VERIFIED: set[str] = set()


def sidecar_path(path: str | os.PathLike) -> Path:
    return Path(path).with_suffix(".json")


def save_array(path: str | os.PathLike, array: np.ndarray, meta: dict[str, Any] | None = None) -> None:
    """Atomically store ``array`` at ``path`` (``.npy``) with a checksummed sidecar."""
    path = Path(path)
    if path.suffix != ".npy":
        raise ValueError(f"cache entries are .npy files, got {path}")
    array = np.ascontiguousarray(array)
    tmp = write_temp(path.parent, ".npy", lambda fh: np.save(fh, array, allow_pickle=False))
    try:
        side = {
            "shape": list(array.shape),
            "dtype": str(array.dtype),
            "sha256": sha256_file(tmp),
            "meta": meta or {},
        }
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    atomic_write_bytes(sidecar_path(path), json.dumps(side, indent=1, sort_keys=True).encode())


def has_array(path: str | os.PathLike) -> bool:
    """True when both the array and its sidecar are present (a complete entry)."""
    path = Path(path)
    return path.is_file() and sidecar_path(path).is_file()


def load_array(path: str | os.PathLike, mmap: bool = True, verify: bool = True) -> np.ndarray:
    """Load a cache entry, verifying its checksum (once per process) against the sidecar.

    A corrupt entry raises :class:`DataError` naming the file; it is never silently used.
    """
    path = Path(path)
    if not has_array(path):
        raise DataError(f"cache entry {path} is missing or incomplete (no sidecar)")
    side = json.loads(sidecar_path(path).read_text())
    key = str(path.resolve())
    if verify and key not in _VERIFIED:
        actual = sha256_file(path)
        if actual != side["sha256"]:
            raise DataError(
                f"cache entry {path} is corrupt (sha256 {actual[:12]} != {side['sha256'][:12]}); delete it to re-create"
            )
        _VERIFIED.add(key)
    array = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    if list(array.shape) != side["shape"] or str(array.dtype) != side["dtype"]:
        raise DataError(f"cache entry {path} does not match its sidecar (shape/dtype)")
    return array


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    return json.loads(sidecar_path(path).read_text()).get("meta", {})
