"""Errors that reach users as one clear line.

Every bad input (config key, file, value, server answer) is reported by raising one of these
with a message that names the offending key, file or value; the entry points print
``error: <message>`` and exit with status 2 instead of a traceback.
"""

from __future__ import annotations

import os
from pathlib import Path


class MtneuroError(Exception):
    """Base class: ``str(err)`` is a complete one-line explanation for the user."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


class ConfigError(MtneuroError, ValueError):
    """A configuration key has an unknown name, a wrong type or an impossible value."""


class DataError(MtneuroError, RuntimeError):
    """A data source, file or cutout cannot provide what was asked for."""


class CheckpointError(MtneuroError, RuntimeError):
    """A checkpoint is missing, unreadable or belongs to another model."""


def existing_checkpoint(path: str | os.PathLike, key: str = "ckpt_path") -> Path:
    """``path`` as a Path if it names a file; else the one line every entry point prints for it."""
    if not Path(path).is_file():
        raise CheckpointError(f"{key}: no checkpoint file at {path}")
    return Path(path)
