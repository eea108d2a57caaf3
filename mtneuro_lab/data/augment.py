"""Batched, on-device augmentation.

Everything here works on whole batches already on the model's device (``(B, C, H, W)`` or
``(B, C, D, H, W)``) with per-sample random parameters drawn as tensors, so there is no
per-item Python work in the data path. Geometric transforms take several tensors and apply the
same draw to all of them (image and mask stay aligned).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AugmentConfig:
    """Training-time augmentation applied by the datamodule after transfer to the device."""

    hflip: bool = True
    vflip: bool = True
    rot90: bool = True
    intensity_jitter: float = 0.0  # max relative change of contrast and brightness


def to_float(images: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """uint8 ``(B, *spatial)`` -> normalised float ``(B, 1, *spatial)``."""
    x = images.unsqueeze(1).to(torch.float32).div_(255.0)
    return x.sub_(mean).div_(std)


def _per_sample(mask: torch.Tensor, ndim: int) -> torch.Tensor:
    return mask.view(-1, *([1] * (ndim - 1)))


def random_flip(tensors: list[torch.Tensor], dim: int, p: float = 0.5,
                generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """Flip each sample along ``dim`` (negative, spatial) with probability ``p``."""
    batch = tensors[0].shape[0]
    mask = torch.rand(batch, device=tensors[0].device, generator=generator) < p
    return [torch.where(_per_sample(mask, t.ndim), t.flip(dim), t) for t in tensors]


def random_rot90(tensors: list[torch.Tensor], generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """Rotate each sample in-plane by a random multiple of 90 degrees (square tiles)."""
    h, w = tensors[0].shape[-2:]
    if h != w:
        return tensors
    batch = tensors[0].shape[0]
    k = torch.randint(0, 4, (batch,), device=tensors[0].device, generator=generator)
    out = []
    for t in tensors:
        rotated = t.clone()
        for turns in (1, 2, 3):
            sel = k == turns
            if sel.any():
                rotated[sel] = torch.rot90(t[sel], turns, dims=(-2, -1))
        out.append(rotated)
    return out


def random_crop(tensors: list[torch.Tensor], size: tuple[int, int],
                generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """Crop a random ``size`` window (last two axes) per sample, by gather, no Python loop."""
    h, w = tensors[0].shape[-2:]
    ch, cw = size
    if (ch, cw) == (h, w):
        return tensors
    if ch > h or cw > w:
        raise ValueError(f"crop {size} is larger than the tile {h}x{w}")
    batch, device = tensors[0].shape[0], tensors[0].device
    top = torch.randint(0, h - ch + 1, (batch,), device=device, generator=generator)
    left = torch.randint(0, w - cw + 1, (batch,), device=device, generator=generator)
    return [crop_at(t, top, left, size) for t in tensors]


def crop_at(t: torch.Tensor, top: torch.Tensor, left: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Crop ``t[b, ..., top[b]:top[b]+h, left[b]:left[b]+w]`` for every sample ``b`` at once.

    Indexes a sliding-window view (``unfold``, no copy) per sample, so only the crops are
    copied, row by row, instead of gathering every pixel through an index tensor.
    """
    ch, cw = size
    windows = t.unfold(-2, ch, 1).unfold(-2, cw, 1)  # (B, *lead, H-ch+1, W-cw+1, ch, cw) view
    batch = torch.arange(t.shape[0], device=t.device)
    return windows[batch, ..., top, left, :, :]  # (B, *lead, ch, cw)


def corner_crops(t: torch.Tensor, size: tuple[int, int]) -> list[torch.Tensor]:
    """The four corner crops of every sample (the paper's four-corner evaluation)."""
    ch, cw = size
    return [t[..., :ch, :cw], t[..., :ch, -cw:], t[..., -ch:, :cw], t[..., -ch:, -cw:]]


def intensity_jitter(x: torch.Tensor, strength: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-sample random contrast and brightness change of a normalised float batch."""
    if strength <= 0:
        return x
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    gain = 1 + strength * (2 * torch.rand(shape, device=x.device, generator=generator) - 1)
    bias = strength * (2 * torch.rand(shape, device=x.device, generator=generator) - 1)
    return x * gain + bias


def geometric(tensors: list[torch.Tensor], cfg: AugmentConfig,
              generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """Apply the configured flips and rotations jointly to aligned tensors.

    Draws exactly what :func:`random_flip` (h, then v) and :func:`random_rot90` would draw in
    turn, then moves each sample once by the composed transform (one of the 8 symmetries of
    the square) instead of once per operation.
    """
    batch, device = tensors[0].shape[0], tensors[0].device
    none = torch.zeros(batch, dtype=torch.long, device=device)
    h = (torch.rand(batch, device=device, generator=generator) < 0.5).long() if cfg.hflip else none
    v = (torch.rand(batch, device=device, generator=generator) < 0.5).long() if cfg.vflip else none
    square = tensors[0].shape[-1] == tensors[0].shape[-2]
    k = torch.randint(0, 4, (batch,), device=device, generator=generator) if cfg.rot90 and square else none
    # rot90^k . vflip^v . hflip^h == rot90^(k + 2v) . hflip^(h xor v)   (vflip = rot180 . hflip)
    return apply_dihedral(tensors, h ^ v, (k + 2 * v) % 4)


def apply_dihedral(tensors: list[torch.Tensor], flip: torch.Tensor, turns: torch.Tensor) -> list[torch.Tensor]:
    """Per sample ``b``: ``rot90(hflip(t[b]) if flip[b] else t[b], turns[b])``, by groups."""
    code = flip * 4 + turns
    present = [c for c in torch.unique(code).tolist() if c != 0]
    if not present:
        return tensors
    out = [t.clone() for t in tensors]
    for c in present:
        idx = (code == c).nonzero().squeeze(1)
        for o, t in zip(out, tensors):
            sub = t.index_select(0, idx)
            if c >= 4:
                sub = sub.flip(-1)
            if c % 4:
                sub = torch.rot90(sub, c % 4, dims=(-2, -1))
            o.index_copy_(0, idx, sub)
    return out


def mixup(x: torch.Tensor, y_onehot: torch.Tensor, alpha: float,
          generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mix each sample with a random partner: ``lam*x + (1-lam)*x[perm]``, same for targets."""
    beta = torch.distributions.Beta(torch.tensor(float(alpha)), torch.tensor(float(alpha)))
    lam = beta.sample().to(x.device)
    perm = torch.randperm(x.shape[0], device=x.device, generator=generator)
    return lam * x + (1 - lam) * x[perm], lam * y_onehot + (1 - lam) * y_onehot[perm]
