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


# -- fused crop + flips + rot90 + cast/normalise: one gather from the uint8 split --------------
# Output pixel (i, j) of rot90^t(hflip^f(crop)) comes from crop pixel (r, s) with
# r = r0 + ri*i + rj*j and s = s0 + si*i + sj*j. Rows t = 0..3 hold (r0, ri, rj, s0, si, sj) for
# f = 0, with -1 offsets standing for (side - 1); f = 1 mirrors the column: s -> (cw - 1) - s.
_TURNS = (
    (0, 1, 0, 0, 0, 1),     # t=0: out[i, j] = g[i, j]
    (0, 0, 1, -1, -1, 0),   # t=1: out[i, j] = g[j, cw-1-i]
    (-1, -1, 0, -1, 0, -1),  # t=2: out[i, j] = g[ch-1-i, cw-1-j]
    (-1, 0, -1, 0, 1, 0),   # t=3: out[i, j] = g[ch-1-j, i]
)
_TABLES: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def _dihedral_table(tile: tuple[int, int], size: tuple[int, int], device: torch.device
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cached per (tile, crop, device): ``(8, 3)`` long ``(offset, di, dj)`` per code
    ``flip*4 + turns`` (source index of output pixel (i, j) relative to the crop's top-left
    corner is ``offset + di*i + dj*j``), and the ``arange`` grids of the crop's rows/columns."""
    key = (tuple(tile), tuple(size), str(device))
    if key not in _TABLES:
        w = tile[1]
        ch, cw = size
        rows = []
        for flip in (0, 1):
            for r0, ri, rj, s0, si, sj in _TURNS:
                r0, s0 = (ch - 1 if r0 < 0 else r0), (cw - 1 if s0 < 0 else s0)
                if flip:
                    s0, si, sj = cw - 1 - s0, -si, -sj
                rows.append((r0 * w + s0, ri * w + si, rj * w + sj))
        _TABLES[key] = (torch.tensor(rows, device=device), torch.arange(ch, device=device),
                        torch.arange(cw, device=device))
    return _TABLES[key]


def draw_crop_dihedral(batch: int, tile: tuple[int, int], size: tuple[int, int], cfg: AugmentConfig,
                       device: torch.device | str = "cpu", generator: torch.Generator | None = None,
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample ``(top, left, flip, turns)``: exactly the draws, in the same order, of
    :func:`random_crop` followed by :func:`geometric` on the cropped batch (so a fused pass and
    the sequential ops give the same result from the same generator state)."""
    h, w = tile
    ch, cw = size
    if ch > h or cw > w:
        raise ValueError(f"crop {size} is larger than the tile {h}x{w}")
    none = torch.zeros(batch, dtype=torch.long, device=device)
    if (ch, cw) == (h, w):  # random_crop draws nothing then
        top = left = none
    else:
        top = torch.randint(0, h - ch + 1, (batch,), device=device, generator=generator)
        left = torch.randint(0, w - cw + 1, (batch,), device=device, generator=generator)
    hf = (torch.rand(batch, device=device, generator=generator) < 0.5).long() if cfg.hflip else none
    vf = (torch.rand(batch, device=device, generator=generator) < 0.5).long() if cfg.vflip else none
    k = torch.randint(0, 4, (batch,), device=device, generator=generator) if cfg.rot90 and ch == cw else none
    return top, left, hf ^ vf, (k + 2 * vf) % 4  # as in geometric: rot90^(k+2v) . hflip^(h xor v)


def crop_dihedral_index(samples: torch.Tensor, top: torch.Tensor, left: torch.Tensor, flip: torch.Tensor,
                        turns: torch.Tensor, tile: tuple[int, int], size: tuple[int, int],
                        dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """Flat source index ``(B, ch, cw)`` into a contiguous ``(N, H, W)`` split such that
    ``split.view(-1)[index[b]] == rot90(hflip^flip[b](split[samples[b], crop_b]), turns[b])``,
    ``crop_b`` being the ``size`` window at ``(top[b], left[b])``.

    Each sample's map is affine, ``base[b] + di[b]*i + dj[b]*j`` (``(offset, di, dj)`` of the
    8 dihedral codes cached per tile/crop/device), so the index is one broadcast add of a
    ``(B, ch, 1)`` and a ``(B, 1, cw)`` tensor: one write of the index, no full-size grid read.
    Pass ``dtype=torch.int32`` when ``N*H*W`` fits (half the index bytes of int64).
    """
    h, w = tile
    ch, cw = size
    if ch != cw and bool((turns % 2).any()):
        raise ValueError(f"odd rot90 turns need a square crop, got {size}")
    table, ii, jj = _dihedral_table(tile, size, turns.device)
    t = table.index_select(0, flip.long() * 4 + turns.long())  # (B, 3)
    base = samples.long() * (h * w) + top.long() * w + left.long() + t[:, 0]
    rows = (base[:, None] + t[:, 1:2] * ii).to(dtype)  # (B, ch)
    cols = (t[:, 2:3] * jj).to(dtype)  # (B, cw)
    return rows[:, :, None] + cols[:, None, :]


def gather_crop_augment(images: torch.Tensor, samples: torch.Tensor, size: tuple[int, int],
                        cfg: AugmentConfig, mean: float, std: float,
                        generator: torch.Generator | None = None,
                        aligned: tuple[torch.Tensor, ...] | list[torch.Tensor] = (),
                        ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Samples ``samples`` of the uint8 split ``images`` ``(N, H, W)``, randomly cropped to
    ``size``, flipped/rotated per ``cfg``, cast and normalised: float ``(B, 1, ch, cw)``.

    Same result (same draws, same pixels; float equal up to rounding of the fused normalise) as
    ``to_float(geometric(random_crop([images[samples][:, None]], size), cfg)[0][:, 0], mean, std)``,
    but every output pixel is read once from the split by ONE ``index_select`` of a flat
    index (:func:`crop_dihedral_index`), then cast to float and normalised in one in-place
    pass (``-mean/std + x/(255 std)``). No full-tile batch, crop or rotated copy is ever made.
    ``aligned`` tensors of the split's ``(N, H, W)`` shape (masks) are gathered with the same
    index and returned unconverted. Works on any device; no per-sample Python loop.
    """
    if images.ndim != 3:
        raise ValueError(f"expected an (N, H, W) split, got shape {tuple(images.shape)}")
    if not images.is_contiguous() or any(not a.is_contiguous() or a.shape != images.shape for a in aligned):
        raise ValueError("the split and aligned tensors must be contiguous and of one (N, H, W) shape")
    tile = (images.shape[1], images.shape[2])
    top, left, flip, turns = draw_crop_dihedral(len(samples), tile, size, cfg, images.device, generator)
    dtype = torch.int32 if images.numel() <= torch.iinfo(torch.int32).max else torch.int64
    index = crop_dihedral_index(samples.to(images.device), top, left, flip, turns, tile, size, dtype)
    flat = index.view(-1)
    out = images.view(-1).index_select(0, flat).view(index.shape)
    x = out.unsqueeze(1).to(torch.float32)
    # (x/255 - mean)/std as ONE in-place pass, shift + scale*x (the fastest variant measured)
    torch.add(torch.tensor(-mean / std, dtype=torch.float32), x, alpha=1.0 / (255.0 * std), out=x)
    extra = [a.view(-1).index_select(0, flat).view(index.shape) for a in aligned]
    return x, extra
