"""3D Vision Transformer pieces for masked-autoencoder pretraining on serial-section EM.

Token order is the one fixed by the patch embedding: a ``(B, 1, D, H, W)`` volume with patch
``(pd, ph, pw)`` becomes ``L = d*h*w`` tokens (``d = D/pd`` ...) ordered d-major, then h, then
w (``Conv3d(...).flatten(2)``). :func:`patchify` produces reconstruction targets in exactly that
order (the public 3D-MAE code ordered targets h, w, d against d, h, w tokens), and inside one
patch the voxels are ordered ``(pd, ph, pw, C)``.

Position embeddings are fixed 3D sin-cos tables for any width (the frequency pairs are split
over the three axes as evenly as possible; an odd width gets one constant-zero channel), kept
as a persistent buffer so checkpoints carry them and fine-tuning loads them intact.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from mtneuro_lab.errors import ConfigError

Preset = Literal["tiny", "small", "base", "large"]
MaskStrategy = Literal["random", "space", "section"]

#: (width, depth, heads) of the standard ViT sizes
PRESETS: dict[str, tuple[int, int, int]] = {
    "tiny": (192, 12, 3),
    "small": (384, 12, 6),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
}


# -- geometry ---------------------------------------------------------------------------------
def token_grid(
    input_shape: Sequence[int], patch_size: Sequence[int], key: str = "model.patch_size"
) -> tuple[int, int, int]:
    """Tokens per axis; one-line ConfigError when the crop is not divisible by the patch."""
    if isinstance(patch_size, (str, bytes)) or not isinstance(patch_size, Sequence):
        raise ConfigError(f"{key}: expected three positive integers [pd, ph, pw], got {patch_size!r}")
    shape, patch = tuple(int(s) for s in input_shape), tuple(int(p) for p in patch_size)
    if len(patch) != 3 or any(p < 1 for p in patch):
        raise ConfigError(f"{key}: expected three positive integers [pd, ph, pw], got {list(patch)}")
    if len(shape) != 3:
        raise ConfigError(f"{key}: the task's samples must be 3D (D, H, W) crops, got shape {shape}")
    if any(s % p for s, p in zip(shape, patch)):
        raise ConfigError(f"{key}: crop {list(shape)} (D, H, W) is not divisible by patch {list(patch)}")
    return tuple(s // p for s, p in zip(shape, patch))  # type: ignore[return-value]


def patchify(x: torch.Tensor, patch: Sequence[int]) -> torch.Tensor:
    """``(B, C, D, H, W)`` -> ``(B, L, pd*ph*pw*C)`` in token order (d, h, w)."""
    b, c, dd, hh, ww = x.shape
    pd, ph, pw = patch
    d, h, w = dd // pd, hh // ph, ww // pw
    x = x.reshape(b, c, d, pd, h, ph, w, pw)
    x = x.permute(0, 2, 4, 6, 3, 5, 7, 1)  # b, d, h, w, pd, ph, pw, c
    return x.reshape(b, d * h * w, pd * ph * pw * c)


def unpatchify(tokens: torch.Tensor, patch: Sequence[int], grid: Sequence[int], channels: int = 1) -> torch.Tensor:
    """Inverse of :func:`patchify`: ``(B, L, pd*ph*pw*C)`` -> ``(B, C, D, H, W)``."""
    b = tokens.shape[0]
    pd, ph, pw = patch
    d, h, w = grid
    x = tokens.reshape(b, d, h, w, pd, ph, pw, channels)
    x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)  # b, c, d, pd, h, ph, w, pw
    return x.reshape(b, channels, d * pd, h * ph, w * pw)


def sincos_pos_embed_3d(dim: int, grid: Sequence[int]) -> torch.Tensor:
    """Fixed ``(d*h*w, dim)`` sin-cos table in token order, for any ``dim >= 1``.

    ``dim // 2`` frequency pairs are shared out over (d, h, w), the first axes getting the
    remainder; each axis uses the transformer frequencies ``10000^(-k/n)`` of its own pairs.
    """
    if dim < 1:
        raise ConfigError(f"position embedding width must be >= 1, got {dim}")
    pairs = dim // 2
    per_axis = [pairs // 3 + (1 if i < pairs % 3 else 0) for i in range(3)]
    coords = torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in grid], indexing="ij")
    parts = []
    for axis, n_pairs in enumerate(per_axis):
        if n_pairs == 0:
            continue
        omega = 1.0 / 10000 ** (torch.arange(n_pairs, dtype=torch.float64) / n_pairs)
        angles = coords[axis].reshape(-1, 1) * omega.reshape(1, -1)
        parts += [torch.sin(angles), torch.cos(angles)]
    table = torch.cat(parts, dim=1) if parts else torch.zeros(math.prod(grid), 0, dtype=torch.float64)
    if table.shape[1] < dim:
        table = torch.cat([table, torch.zeros(table.shape[0], dim - table.shape[1], dtype=torch.float64)], 1)
    return table.float()


def resize_pos_embed(table: torch.Tensor, old_grid: Sequence[int], new_grid: Sequence[int]) -> torch.Tensor:
    """Trilinear interpolation of an ``(L, C)`` table from ``old_grid`` to ``new_grid``."""
    if tuple(old_grid) == tuple(new_grid):
        return table
    c = table.shape[-1]
    vol = table.reshape(1, *old_grid, c).permute(0, 4, 1, 2, 3)
    out = F.interpolate(vol, size=tuple(new_grid), mode="trilinear", align_corners=True)
    return out.permute(0, 2, 3, 4, 1).reshape(-1, c)


# -- masking ----------------------------------------------------------------------------------
def num_visible(num_tokens: int, mask_ratio: float) -> int:
    """Tokens the encoder sees: ``round(L * (1 - mask_ratio))``."""
    return round(num_tokens * (1.0 - mask_ratio))


def random_masking(
    batch: int,
    grid: Sequence[int],
    mask_ratio: float,
    strategy: MaskStrategy = "random",
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose visible tokens; returns ``ids_keep (B, K)`` sorted ascending and ``mask (B, L)`` (True = masked).

    Every strategy keeps exactly ``K = round(L * (1 - mask_ratio))`` tokens:

    * ``random``: K tokens uniformly among all (d, h, w) positions;
    * ``space`` (tube masking): in-plane positions are ranked at random and tokens are taken
      whole tube by whole tube (all sections of one (h, w) position); when K is not a multiple
      of the number of sections, the last tube is only partly visible (random sections of it);
    * ``section``: sections (z indices) are ranked at random and taken whole section by whole
      section; the last section is partly visible (random in-plane positions) when K is not a
      multiple of the tokens per section.
    """
    d, h, w = (int(g) for g in grid)
    num = d * h * w
    keep = num_visible(num, mask_ratio)
    token_noise = torch.rand(batch, num, device=device, generator=generator)
    if strategy == "random":
        score = token_noise
    else:
        groups = h * w if strategy == "space" else d
        group_rank = torch.rand(batch, groups, device=device, generator=generator).argsort(1).argsort(1)
        index = torch.arange(num, device=device)
        group_of_token = index % (h * w) if strategy == "space" else index // (h * w)
        # integer group rank + noise in [0, 1): sorting is lexicographic (group first)
        score = group_rank[:, group_of_token].to(token_noise.dtype) + token_noise
    ids_keep = score.argsort(dim=1)[:, :keep].sort(dim=1).values
    mask = torch.ones(batch, num, dtype=torch.bool, device=device)
    mask.scatter_(1, ids_keep, False)
    return ids_keep, mask


# -- transformer ------------------------------------------------------------------------------
class DropPath(nn.Module):
    """Stochastic depth: drop a sample's residual branch with probability ``p`` (training only)."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = torch.rand(x.shape[0], *([1] * (x.ndim - 1)), device=x.device, dtype=x.dtype) >= self.p
        return x * keep / (1 - self.p)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    """Pre-norm transformer block (attention + 4x MLP)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


@dataclass(frozen=True)
class ViTSpec:
    """What makes two encoders interchangeable (stored beside the weights in ``encoder.pt``)."""

    preset: str
    dim: int
    depth: int
    heads: int
    patch_size: tuple[int, int, int]
    input_shape: tuple[int, int, int]
    in_channels: int = 1

    @property
    def grid(self) -> tuple[int, int, int]:
        return token_grid(self.input_shape, self.patch_size)

    def as_dict(self) -> dict:
        return {
            "preset": self.preset,
            "dim": self.dim,
            "depth": self.depth,
            "heads": self.heads,
            "patch_size": list(self.patch_size),
            "input_shape": list(self.input_shape),
            "in_channels": self.in_channels,
        }


def vit_spec(preset: str, patch_size: Sequence[int], input_shape: Sequence[int], in_channels: int = 1) -> ViTSpec:
    if preset not in PRESETS:
        raise ConfigError(f"model.preset: must be one of {', '.join(PRESETS)}, got {preset!r}")
    token_grid(input_shape, patch_size)  # one-line errors for bad patch sizes / crops
    dim, depth, heads = PRESETS[preset]
    pd, ph, pw = (int(p) for p in patch_size)
    d, h, w = (int(s) for s in input_shape)
    return ViTSpec(preset, dim, depth, heads, (pd, ph, pw), (d, h, w), in_channels)


class ViTEncoder(nn.Module):
    """Patch embedding + fixed 3D sin-cos positions + transformer blocks + final LayerNorm.

    ``forward(x, ids_keep)`` runs only the visible tokens when ``ids_keep`` is given (MAE);
    ``collect`` lists block indices whose outputs are also returned (UNETR skip connections).
    """

    pos_embed: torch.Tensor  # a buffer

    def __init__(self, spec: ViTSpec, drop_path: float = 0.0) -> None:
        super().__init__()
        self.spec = spec
        self.grid = spec.grid
        self.patch_embed = nn.Conv3d(spec.in_channels, spec.dim, kernel_size=spec.patch_size, stride=spec.patch_size)
        self.register_buffer("pos_embed", sincos_pos_embed_3d(spec.dim, self.grid).unsqueeze(0))
        rates = torch.linspace(0, drop_path, spec.depth).tolist()
        self.blocks = nn.ModuleList(Block(spec.dim, spec.heads, drop_path=r) for r in rates)
        self.norm = nn.LayerNorm(spec.dim, eps=1e-6)
        self.apply(_init_weights)
        w = self.patch_embed.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # as a linear layer (MAE)

    @property
    def num_tokens(self) -> int:
        return math.prod(self.grid)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, D, H, W)`` -> ``(B, L, dim)`` tokens with positions added, in token order."""
        if tuple(x.shape[2:]) != self.spec.input_shape:
            raise ValueError(f"encoder built for crops {self.spec.input_shape}, got input {tuple(x.shape[2:])}")
        return self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed

    def forward(
        self, x: torch.Tensor, ids_keep: torch.Tensor | None = None, collect: Sequence[int] = ()
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        tokens = self.embed(x)
        if ids_keep is not None:
            tokens = torch.gather(tokens, 1, ids_keep.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        hidden = []
        for i, block in enumerate(self.blocks):
            tokens = block(tokens)
            if i in collect:
                hidden.append(tokens)
        return self.norm(tokens), hidden


class MAEDecoder(nn.Module):
    """Light transformer that predicts the voxels of every patch from visible tokens + mask tokens."""

    pos_embed: torch.Tensor  # a buffer

    def __init__(
        self, encoder_dim: int, grid: Sequence[int], patch_voxels: int, dim: int = 512, depth: int = 4, heads: int = 16
    ) -> None:
        super().__init__()
        if dim % heads:
            raise ConfigError(f"model.decoder_dim: {dim} is not divisible by model.decoder_heads={heads}")
        self.embed = nn.Linear(encoder_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("pos_embed", sincos_pos_embed_3d(dim, grid).unsqueeze(0))
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pred = nn.Linear(dim, patch_voxels)
        self.apply(_init_weights)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, visible: torch.Tensor, ids_keep: torch.Tensor | None) -> torch.Tensor:
        """``visible (B, K, enc)`` at token positions ``ids_keep`` -> ``(B, L, patch_voxels)``."""
        x = self.embed(visible)
        if ids_keep is not None:
            full = self.mask_token.to(x.dtype).expand(x.shape[0], self.pos_embed.shape[1], -1).clone()
            x = full.scatter(1, ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]), x)
        x = x + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.pred(self.norm(x))


def masked_patch_loss(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, norm_pix: bool = True
) -> torch.Tensor:
    """MSE over the voxels of masked patches only (all patches if none is masked).

    With ``norm_pix`` every target patch is normalised by its own mean and variance (MAE).
    """
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True, unbiased=False)
        target = (target - mean) / (var + 1e-6).sqrt()
    per_patch = ((pred - target) ** 2).mean(dim=-1)
    weight = mask.to(per_patch.dtype)
    if not mask.any():
        weight = torch.ones_like(per_patch)
    return (per_patch * weight).sum() / weight.sum()
