"""Test-time augmentation: a window's prediction averaged over its z/y/x flips.

Flipping the input, predicting and flipping back is exact for point-wise targets (BC, BCD). An
affinity channel of offset ``o`` stores at voxel ``i`` the edge ``(i - o, i)``; on an input flipped
along every axis where ``o`` is non-zero, the flipped-back map stores the edge ``(i, i + o)``
at ``i``, so it is shifted by ``o`` before it is averaged, and the ``|o|`` border voxels it cannot
fill are left to the other variants (the unflipped one always covers them). A flip of only some
of ``o``'s non-zero axes predicts another direction, and that channel skips that variant.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import torch

from mtneuro_lab.errors import ConfigError

SPATIAL_DIMS = (2, 3, 4)  # z, y, x of a (N, C, Z, Y, X) tensor


def _aligned(
    out: torch.Tensor, offsets: Sequence[Sequence[int]], flipped: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flipped-back ``out`` (N, C, Z, Y, X) brought to the unflipped channel meaning, and its weights (C, Z, Y, X)."""
    weight = torch.ones(out.shape[1:], dtype=out.dtype, device=out.device)
    for c, offset in enumerate(offsets):
        moved = [d for d, o in zip(SPATIAL_DIMS, offset, strict=True) if o != 0]
        hit = [d for d in moved if d in flipped]
        if not hit:
            continue
        if len(hit) < len(moved):  # another direction: this variant says nothing about channel c
            weight[c] = 0
            continue
        shifts = [int(offset[d - 2]) for d in moved]
        out[:, c] = torch.roll(out[:, c], shifts=shifts, dims=[d - 1 for d in moved])
        for d, s in zip(moved, shifts, strict=True):
            border: list[slice] = [slice(None)] * 3
            border[d - 2] = slice(0, s) if s > 0 else slice(s, None)
            weight[c][tuple(border)] = 0
    return out, weight


def flip_averaged(
    predictor: Callable[[torch.Tensor], torch.Tensor], offsets: Sequence[Sequence[int]]
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``predictor`` ``(N, 1, Z, Y, X) -> (N, C, Z, Y, X)`` averaged over the 8 flips of its input.

    ``offsets[c]`` is channel ``c``'s affinity offset ``(dz, dy, dx)``; ``(0, 0, 0)`` for a
    point-wise channel. Averages what ``predictor`` returns (logits in this project: the loss
    and the activation then see one map)."""
    offsets = [tuple(int(v) for v in o) for o in offsets]

    def run(x: torch.Tensor) -> torch.Tensor:
        total = predictor(x)
        if total.shape[1] != len(offsets):
            raise ConfigError(f"task.tta: the network predicts {total.shape[1]} channels, offsets name {len(offsets)}")
        count = torch.ones(total.shape[1:], dtype=total.dtype, device=total.device)
        for n in (1, 2, 3):
            for flipped in itertools.combinations(SPATIAL_DIMS, n):
                out, weight = _aligned(predictor(x.flip(flipped)).flip(flipped), offsets, flipped)
                total = total + out * weight
                count = count + weight
        return total / count

    return run
