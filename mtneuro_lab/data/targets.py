"""Training targets computed from instance labels: affinities, BC and BCD.

All target functions take integer instance labels (0 = background or unlabelled boundary) and
work on torch tensors, batched ``(B, Z, Y, X)``, on whatever device the labels are on, so the
datamodule computes them per batch after the geometric augmentation (which therefore never
has to know how to transform a target). Only the signed distance of BCD needs SciPy; it is
computed once per volume on the CPU (:func:`signed_distance`) and cropped with the image.

Conventions (those of waterz and pytorch_connectomics):

* ``affinity``: channel ``c`` for offset ``o = (dz, dy, dx)`` is 1 at voxel ``v`` when
  ``labels[v] == labels[v - o] != 0``. The first three offsets are always the nearest
  neighbours ``(1,0,0), (0,1,0), (0,0,1)`` (z, y, x), which is what waterz agglomerates;
  ``offsets`` adds long-range ones. Where ``v - o`` lies outside the labels the value is 0
  and the mask is 0.
* ``bc``: channel 0 foreground ``labels > 0``, channel 1 instance contour: labelled voxels
  with an in-plane neighbour (within ``contour_width``) of another label, background included
  (in-plane only, as usual for anisotropic serial-section EM).
* ``bcd``: ``bc`` plus channel 2, the signed distance ``tanh(d / scale)``: inside an instance
  ``d`` is the distance (nm) to its contour or the background, outside it is minus the
  distance to the nearest instance. Values lie in (-1, 1).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch

from mtneuro_lab.errors import ConfigError

TargetKind = Literal["affinity", "bc", "bcd"]
TARGET_KINDS = ("affinity", "bc", "bcd")
NEAREST_OFFSETS: tuple[tuple[int, int, int], ...] = ((1, 0, 0), (0, 1, 0), (0, 0, 1))


def parse_offsets(offsets: Sequence[Sequence[int]] | None, key: str = "task.offsets") -> list[tuple[int, int, int]]:
    """Nearest-neighbour offsets followed by the extra (long-range) ones, validated."""
    out = list(NEAREST_OFFSETS)
    for i, off in enumerate(offsets or ()):
        try:
            o = tuple(int(v) for v in off)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}[{i}]: expected [dz, dy, dx] integers, got {off!r}") from None
        if len(o) != 3 or o == (0, 0, 0):
            raise ConfigError(f"{key}[{i}]: expected a non-zero [dz, dy, dx], got {list(off)}")
        if o in out:
            raise ConfigError(f"{key}[{i}]: offset {list(o)} is listed twice (nearest neighbours are implicit)")
        out.append(o)
    return out


def target_channels(kind: str, offsets: Sequence[Sequence[int]] | None = None) -> list[str]:
    """Channel names of a target kind, e.g. ``["aff_z", "aff_y", "aff_x"]`` for affinities."""
    if kind == "affinity":
        names = ["aff_z", "aff_y", "aff_x"]
        names += [f"aff_{dz}_{dy}_{dx}" for dz, dy, dx in parse_offsets(offsets)[3:]]
        return names
    if kind == "bc":
        return ["foreground", "contour"]
    if kind == "bcd":
        return ["foreground", "contour", "distance"]
    raise ConfigError(f"task.target: must be one of {', '.join(TARGET_KINDS)}, got {kind!r}")


def target_margin(kind: str, offsets: Sequence[Sequence[int]] | None = None, contour_width: int = 1) -> tuple[int, int]:
    """Context ``(z, yx)`` a crop needs on each side so that its targets are exact."""
    if kind == "affinity":
        offs = parse_offsets(offsets)
        return max(abs(o[0]) for o in offs), max(max(abs(o[1]), abs(o[2])) for o in offs)
    return 0, int(contour_width)


def affinities(
    labels: torch.Tensor, offsets: Sequence[Sequence[int]], margin: tuple[int, int] = (0, 0)
) -> tuple[torch.Tensor, torch.Tensor]:
    """Affinities and validity mask ``(B, C, Z', Y', X')`` of ``labels`` ``(B, Z, Y, X)``.

    ``margin = (mz, myx)`` voxels of context on each side are used as neighbours and trimmed
    from the output, so a crop taken with that margin gets exact targets everywhere.
    """
    mz, m = margin
    b, z, y, x = labels.shape
    out_shape = (b, len(offsets), z - 2 * mz, y - 2 * m, x - 2 * m)
    aff = torch.zeros(out_shape, dtype=torch.float32, device=labels.device)
    mask = torch.zeros(out_shape, dtype=torch.float32, device=labels.device)
    centre = labels[:, mz : z - mz, m : y - m, m : x - m]
    for c, off in enumerate(offsets):
        src_c: list[slice] = []  # slices into the centre grid
        dst_c: list[slice] = []  # and into labels
        for d, pad, size in zip(off, (mz, m, m), out_shape[2:]):
            # output index i sits at labels index pad + i; its neighbour pad + i - d must exist
            lo, hi = max(0, d - pad), min(size, size + pad + d)
            if hi <= lo:
                break
            src_c.append(slice(lo, hi))
            dst_c.append(slice(pad + lo - d, pad + hi - d))
        if len(src_c) < 3:  # an axis (z, y, x) without any voxel pair: the channel stays masked out
            continue
        src: tuple[slice, ...] = (slice(None), *src_c)
        dst: tuple[slice, ...] = (slice(None), *dst_c)
        out_c: tuple[int | slice, ...] = (slice(None), c, *src_c)
        here, there = centre[src], labels[dst]
        aff[out_c] = ((here == there) & (here != 0)).float()
        mask[out_c] = 1.0
    return aff, mask


def contours(labels: torch.Tensor, width: int = 1) -> torch.Tensor:
    """Bool ``(B, Z, Y, X)``: labelled voxels with an in-plane neighbour of another label within ``width``."""
    edge = torch.zeros(labels.shape, dtype=torch.bool, device=labels.device)
    for d in range(1, int(width) + 1):
        dy = labels[..., d:, :] != labels[..., :-d, :]
        dx = labels[..., :, d:] != labels[..., :, :-d]
        edge[..., d:, :] |= dy
        edge[..., :-d, :] |= dy
        edge[..., :, d:] |= dx
        edge[..., :, :-d] |= dx
    return edge & (labels != 0)


def signed_distance(
    labels: np.ndarray, voxel_size: Sequence[float], scale: float, contour_width: int = 1
) -> np.ndarray:
    """float16 ``tanh(d / scale)`` of one ``(Z, Y, X)`` volume (see the module docstring)."""
    from scipy import ndimage

    lab = torch.from_numpy(np.ascontiguousarray(labels))[None]
    interior = ((lab != 0) & ~contours(lab, contour_width))[0].numpy()
    foreground = labels != 0
    sampling = tuple(float(v) for v in voxel_size)
    d_in = ndimage.distance_transform_edt(interior, sampling=sampling) if interior.any() else np.zeros(labels.shape)
    if foreground.all() or not foreground.any():
        d_out = np.zeros(labels.shape)
    else:
        d_out = ndimage.distance_transform_edt(~foreground, sampling=sampling)
    signed = np.where(foreground, np.tanh(d_in / scale), -np.tanh(d_out / scale))
    return signed.astype(np.float16)


def compute_targets(
    kind: str,
    labels: torch.Tensor,
    offsets: Sequence[Sequence[int]] | None = None,
    margin: tuple[int, int] = (0, 0),
    contour_width: int = 1,
    distance: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Target ``(B, C, Z', Y', X')`` float and mask of the same shape for a batch of labels.

    ``margin`` voxels are trimmed from each side (see :func:`affinities`); ``distance`` is the
    precomputed signed distance (same shape as ``labels``), needed for ``bcd`` only.
    """
    if kind == "affinity":
        return affinities(labels, parse_offsets(offsets), margin)
    mz, m = margin
    z, y, x = labels.shape[-3:]
    trim = (slice(None), slice(mz, z - mz), slice(m, y - m), slice(m, x - m))
    fg = (labels != 0)[trim].float()
    ct = contours(labels, contour_width)[trim].float()
    channels = [fg, ct]
    if kind == "bcd":
        if distance is None:
            raise ValueError("bcd targets need the precomputed signed distance")
        channels.append(distance[trim].float())
    elif kind != "bc":
        raise ConfigError(f"task.target: must be one of {', '.join(TARGET_KINDS)}, got {kind!r}")
    target = torch.stack(channels, dim=1)
    return target, torch.ones_like(target)


def activate(logits: torch.Tensor, kind: str) -> torch.Tensor:
    """Network output -> the range of the targets: sigmoid, and tanh for the BCD distance channel."""
    out = torch.sigmoid(logits)
    if kind == "bcd":
        out = torch.cat([out[:, :2], torch.tanh(logits[:, 2:3]), out[:, 3:]], dim=1)
    return out
