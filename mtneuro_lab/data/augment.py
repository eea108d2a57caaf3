"""Batched, on-device augmentation.

Everything here works on whole batches already on the model's device (``(B, C, H, W)`` or
``(B, C, D, H, W)``) with per-sample random parameters drawn as tensors, so there is no
per-item Python work in the data path. Geometric transforms take several tensors and apply the
same draw to all of them (image and mask stay aligned).
"""

from __future__ import annotations

import math

import torch

from mtneuro_lab.config.sections import AugmentConfig


def to_float(images: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """uint8 ``(B, *spatial)`` -> normalised float ``(B, 1, *spatial)``: ``(x/255 - mean)/std``
    computed as ONE in-place pass ``-mean/std + x/(255 std)`` after the cast (the fastest
    variant measured; equal to the three-pass form up to float rounding)."""
    return normalise_(images.unsqueeze(1).to(torch.float32), mean, std)


def normalise_(x: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """In place on float ``x`` holding 0..255 values: ``(x/255 - mean)/std`` as one pass."""
    shift = torch.tensor(-mean / std, dtype=x.dtype, device=x.device)
    return torch.add(shift, x, alpha=1.0 / (255.0 * std), out=x)


def _per_sample(mask: torch.Tensor, ndim: int) -> torch.Tensor:
    return mask.view(-1, *([1] * (ndim - 1)))


def random_flip(
    tensors: list[torch.Tensor], dim: int, p: float = 0.5, generator: torch.Generator | None = None
) -> list[torch.Tensor]:
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


def random_crop(
    tensors: list[torch.Tensor], size: tuple[int, int], generator: torch.Generator | None = None
) -> list[torch.Tensor]:
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
    return torch.addcmul(bias, x, gain)  # one pass over the batch


def geometric(
    tensors: list[torch.Tensor], cfg: AugmentConfig, generator: torch.Generator | None = None
) -> list[torch.Tensor]:
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


def mixup(
    x: torch.Tensor, y_onehot: torch.Tensor, alpha: float, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
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
    (0, 1, 0, 0, 0, 1),  # t=0: out[i, j] = g[i, j]
    (0, 0, 1, -1, -1, 0),  # t=1: out[i, j] = g[j, cw-1-i]
    (-1, -1, 0, -1, 0, -1),  # t=2: out[i, j] = g[ch-1-i, cw-1-j]
    (-1, 0, -1, 0, 1, 0),  # t=3: out[i, j] = g[ch-1-j, i]
)
_TABLES: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def _dihedral_table(
    tile: tuple[int, int], size: tuple[int, int], device: torch.device
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
        _TABLES[key] = (
            torch.tensor(rows, device=device),
            torch.arange(ch, device=device),
            torch.arange(cw, device=device),
        )
    return _TABLES[key]


def draw_crop_dihedral(
    batch: int,
    tile: tuple[int, int],
    size: tuple[int, int],
    cfg: AugmentConfig,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
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


class Workspace:
    """Scratch buffers reused from batch to batch, one per name, grown when a batch needs more.

    Only for tensors that never leave the function using them (the per-batch gather index:
    4 MB for 64 crops of 128x128): a fresh multi-MB allocation per batch is returned to the OS
    and faulted in again page by page, which cost as much as the gather itself.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        numel = math.prod(shape)
        buf = self._buffers.get(name)
        if buf is None or buf.dtype != dtype or buf.device != device or buf.numel() < numel:
            buf = self._buffers[name] = torch.empty(numel, dtype=dtype, device=device)
        return buf[:numel].view(shape)


def crop_dihedral_index(
    samples: torch.Tensor,
    top: torch.Tensor,
    left: torch.Tensor,
    flip: torch.Tensor,
    turns: torch.Tensor,
    tile: tuple[int, int],
    size: tuple[int, int],
    dtype: torch.dtype = torch.int64,
    lead: tuple[int, ...] = (),
    workspace: Workspace | None = None,
) -> torch.Tensor:
    """Flat source index ``(B, *lead, ch, cw)`` into a contiguous ``(N, *lead, H, W)`` split such
    that ``split.view(-1)[index[b]] == rot90(hflip^flip[b](split[samples[b], ..., crop_b]), turns[b])``,
    ``crop_b`` being the ``size`` window at ``(top[b], left[b])``; every leading plane (channel,
    z slice) of a sample gets the same transform.

    Each sample's map is affine, ``base[b] + plane*l + di[b]*i + dj[b]*j`` (``(offset, di, dj)`` of
    the 8 dihedral codes cached per tile/crop/device), so the index is one broadcast add of a
    ``(B, L, ch, 1)`` and a ``(B, 1, 1, cw)`` tensor: one write of the index, no full-size grid
    read. Pass ``dtype=torch.int32`` when the split's size fits (half the index bytes of int64).
    """
    h, w = tile
    ch, cw = size
    if ch != cw and bool((turns % 2).any()):
        raise ValueError(f"odd rot90 turns need a square crop, got {size}")
    table, ii, jj = _dihedral_table(tile, size, turns.device)
    depth = math.prod(lead)
    t = table.index_select(0, flip.long() * 4 + turns.long())  # (B, 3)
    base = samples.long() * (depth * h * w) + top.long() * w + left.long() + t[:, 0]
    planes = torch.arange(depth, device=turns.device) * (h * w)
    rows = (base[:, None, None] + planes[None, :, None] + (t[:, 1:2] * ii)[:, None, :]).to(dtype)  # (B, L, ch)
    cols = (t[:, 2:3] * jj).to(dtype)  # (B, cw)
    shape = (len(samples), depth, ch, cw)
    out = workspace.get("index", shape, dtype, turns.device) if workspace is not None else None
    index = torch.add(rows[..., None], cols[:, None, None, :], out=out)
    return index.view(len(samples), *lead, ch, cw)


def gather_augmented(
    split: torch.Tensor,
    samples: torch.Tensor,
    size: tuple[int, int],
    cfg: AugmentConfig,
    generator: torch.Generator | None = None,
    aligned: tuple[torch.Tensor, ...] | list[torch.Tensor] = (),
    workspace: Workspace | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Samples ``samples`` of ``split`` ``(N, *lead, H, W)`` (any dtype), randomly cropped to
    ``size`` and flipped/rotated per ``cfg``: ``(B, *lead, ch, cw)`` in the split's dtype.

    Same draws and same values as ``geometric(random_crop([split[samples]], size), cfg)``, but
    every output element is read once from the split by ONE ``index_select`` of a flat index
    (:func:`crop_dihedral_index`): no full-tile batch, crop or rotated copy is made. ``aligned``
    tensors of the split's shape (masks) are gathered with the same index. Any device; no
    per-sample Python loop.
    """
    if split.ndim < 3:
        raise ValueError(f"expected an (N, ..., H, W) split, got shape {tuple(split.shape)}")
    if not split.is_contiguous() or any(not a.is_contiguous() or a.shape != split.shape for a in aligned):
        raise ValueError("the split and aligned tensors must be contiguous and of one (N, ..., H, W) shape")
    lead, tile = tuple(split.shape[1:-2]), (split.shape[-2], split.shape[-1])
    samples = samples.to(split.device)
    top, left, flip, turns = draw_crop_dihedral(len(samples), tile, size, cfg, split.device, generator)
    if tuple(size) == tile and not (cfg.hflip or cfg.vflip or (cfg.rot90 and tile[0] == tile[1])):  # nothing moves
        return split.index_select(0, samples), [a.index_select(0, samples) for a in aligned]
    dtype = torch.int32 if split.numel() <= torch.iinfo(torch.int32).max else torch.int64
    flat = crop_dihedral_index(samples, top, left, flip, turns, tile, size, dtype, lead, workspace).view(-1)
    out_shape = (len(samples), *lead, *size)
    return (
        split.view(-1).index_select(0, flat).view(out_shape),
        [a.view(-1).index_select(0, flat).view(out_shape) for a in aligned],
    )


def gather_crop_augment(
    images: torch.Tensor,
    samples: torch.Tensor,
    size: tuple[int, int],
    cfg: AugmentConfig,
    mean: float,
    std: float,
    generator: torch.Generator | None = None,
    aligned: tuple[torch.Tensor, ...] | list[torch.Tensor] = (),
    workspace: Workspace | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """:func:`gather_augmented` of a uint8 split then :func:`to_float`: float ``(B, 1, *lead, ch, cw)``
    (the uint8 gather is cast and normalised in one in-place pass); ``aligned`` come back unconverted.

    Same result (same draws, same pixels; float equal up to rounding) as
    ``to_float(geometric(random_crop([images[samples]], size), cfg)[0], mean, std)``.
    """
    gathered, extra = gather_augmented(images, samples, size, cfg, generator, aligned, workspace)
    return to_float(gathered, mean, std), extra


# -- whole-batch flips/rot90 + cast, grouped by transform (the CPU training path) --------------
#: code ``flip*4 + turns`` -> (axes to reverse, transpose after): ``rot90(hflip^flip(x), turns)``
#: with at most ONE copying flip; the transpose is a free view that the casting copy reads through
_DIHEDRAL_VIEWS: dict[int, tuple[tuple[int, ...], bool]] = {
    0: ((), False),
    1: ((-1,), True),
    2: ((-2, -1), False),
    3: ((-2,), True),
    4: ((-1,), False),
    5: ((), True),
    6: ((-2,), False),
    7: ((-2, -1), True),
}


def dihedral_to_float_grouped(
    images: torch.Tensor,
    cfg: AugmentConfig,
    mean: float,
    std: float,
    generator: torch.Generator | None = None,
    aligned: tuple[torch.Tensor, ...] | list[torch.Tensor] = (),
) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """A whole uint8 batch ``(B, *lead, H, W)`` flipped/rotated per sample as ``cfg`` says, cast and
    normalised: ``(float (B, 1, *lead, H, W), aligned, order)``.

    The output is GROUPED BY TRANSFORM: row ``k`` is input row ``order[k]`` (permute every other
    per-sample tensor of the batch with ``order``). Grouping turns the per-sample transform into
    at most 8 slices, each one ``index_select`` of whole tiles (row copies), at most one copying
    flip and one casting copy that reads through a transposed view: on a CPU this is ~1.5x
    cheaper than the element-wise gather of :func:`gather_crop_augment` (docs/data.md). Same
    draws as :func:`geometric`; ``out == to_float(geometric([images], cfg))[order]`` exactly up to
    float rounding of the normalisation. ``bincount(...).tolist()`` synchronises with the device
    once per batch, which is why CUDA batches take the sync-free fused gather instead.
    """
    batch, tile = images.shape[0], (images.shape[-2], images.shape[-1])
    _, _, flip, turns = draw_crop_dihedral(batch, tile, tile, cfg, images.device, generator)
    code = flip * 4 + turns
    order = torch.argsort(code, stable=True)
    out = torch.empty((batch, 1, *images.shape[1:]), dtype=torch.float32, device=images.device)
    aligned_out = [torch.empty_like(a) for a in aligned]
    start = 0
    for c, n in enumerate(torch.bincount(code, minlength=8).tolist()):
        if not n:
            continue
        rows = order[start : start + n]
        dims, transpose = _DIHEDRAL_VIEWS[c]
        for src, dst in zip((images, *aligned), (out[:, 0], *aligned_out)):
            group = src.index_select(0, rows)
            if dims:
                group = group.flip(dims)
            dst[start : start + n].copy_(group.transpose(-2, -1) if transpose else group)
        normalise_(out[start : start + n], mean, std)  # while the block is still in cache
        start += n
    return out, aligned_out, order
