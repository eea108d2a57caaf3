"""Atomic writes and checksums: what every file others may read goes through.

A write goes to a temporary file in the target directory, is fsynced and renamed into place
(``os.replace``), so a reader sees the old file or the complete new one, never a partial one.
Standard library only: the CLI imports it before torch.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_temp(directory: Path, suffix: str, write: Callable[[IO[bytes]], Any]) -> Path:
    """A fsynced temporary file in ``directory`` filled by ``write(fh)``; the caller renames it."""
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=suffix)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def atomic_write_bytes(path: str | os.PathLike, data: bytes | memoryview) -> None:
    """Write ``data`` to ``path`` so that readers never see a partial file."""
    path = Path(path)
    tmp = write_temp(path.parent, path.suffix, lambda fh: fh.write(data))
    os.replace(tmp, path)


def unwritable_reason(path: str | os.PathLike) -> str | None:
    """Why a directory could not be created or written at ``path`` (None if it can).

    The nearest existing ancestor must be a directory in which a file can be created: a
    temporary file is created there and removed at once (a permission check alone says yes to
    root, also on ``/proc`` or a read-only mount). Nothing is left behind.
    """
    target = Path(path).expanduser().absolute()
    existing = target
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is not a directory"
    try:
        fd, tmp = tempfile.mkstemp(dir=existing, prefix=".write-check-")
    except OSError as err:
        where = "" if existing == target else f" (cannot create files in {existing})"
        return f"{target} is not writable{where}: {err.strerror or err}"
    os.close(fd)
    os.unlink(tmp)
    return None
