"""Checkpoint I/O: atomic writes, ``weights_only`` reads, and locating a run's checkpoints.

A checkpoint is written to a temporary file in the target directory, fsynced and renamed into
place, so a crash never leaves a half-written ``.ckpt`` that a resume could pick up. Reading
uses ``torch.load(weights_only=True)``: tensors and plain containers only, never arbitrary
pickled objects.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

from mtneuro_lab.errors import CheckpointError, existing_checkpoint
from mtneuro_lab.io import atomic_write_bytes


class AtomicCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO with temp-file-and-rename saves and safe loads."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any | None = None
    ) -> None:
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        atomic_write_bytes(path, buffer.getbuffer())

    def load_checkpoint(
        self, path: str | os.PathLike, map_location: Callable | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        return load_checkpoint(path)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``; one-line error naming the file otherwise."""
    path = existing_checkpoint(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure is a bad checkpoint
        raise CheckpointError(f"ckpt_path: cannot load {path} safely ({one_line(err)})") from None


def checkpoint_position(path: str | os.PathLike) -> dict[str, int]:
    """``best_epoch`` and ``best_step`` of a checkpoint (memory-mapped: tensors are not read)."""
    try:
        state = torch.load(Path(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001 - same contract as load_checkpoint
        raise CheckpointError(f"ckpt_path: cannot load {path} safely ({one_line(err)})") from None
    return {"best_epoch": int(state.get("epoch", -1)), "best_step": int(state.get("global_step", -1))}


def one_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def run_dir_of(ckpt: str | os.PathLike) -> Path:
    """The run directory a checkpoint belongs to (``<run>/checkpoints/<name>.ckpt``)."""
    path = Path(ckpt).resolve()
    return path.parent.parent if path.parent.name == "checkpoints" else path.parent
