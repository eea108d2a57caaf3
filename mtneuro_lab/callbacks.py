"""Callbacks every run needs for correctness (not optional, so not in the config)."""

from __future__ import annotations

import random
from typing import Any, cast

import numpy as np
import pytorch_lightning as pl
import torch


class RNGStateCheckpoint(pl.Callback):
    """Saves and restores the Python, NumPy and torch RNG states with each checkpoint.

    Lightning does not restore RNG states on resume, so anything random after a restart
    (augmentation draws, mixup, SSL view crops, dropout) would differ from an uninterrupted run.
    States are stored as tensors and plain containers so checkpoints stay ``weights_only``-safe.
    """

    @property
    def state_key(self) -> str:
        return "RNGStateCheckpoint"

    def state_dict(self) -> dict[str, Any]:
        # the default legacy=True returns this tuple (the global generator is MT19937); numpy's
        # stubs pick the dict overload for a call without arguments
        np_state = cast(tuple[str, np.ndarray, int, int, float], np.random.get_state())
        state = {
            "python": list(random.getstate()[1]),
            "python_version": random.getstate()[0],
            "python_gauss": random.getstate()[2],
            "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "numpy_pos": int(np_state[2]),
            "numpy_has_gauss": int(np_state[3]),
            "numpy_gauss": float(np_state[4]),
            "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
        np.random.set_state(
            (
                "MT19937",
                state["numpy_keys"].numpy().astype(np.uint32),
                state["numpy_pos"],
                state["numpy_has_gauss"],
                state["numpy_gauss"],
            )
        )
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
