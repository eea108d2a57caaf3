"""3D masked-autoencoder pretraining on serial-section EM (Cheng et al. 2023; He et al. 2022).

A ViT encoder sees only the visible ``round(L * (1 - mask_ratio))`` tokens of a crop; a light
decoder fills in mask tokens and predicts the voxels of every patch; the loss is the MSE on
per-patch normalised voxels of the masked patches only. Validation and test volumes are cut
into non-overlapping crops of the training shape and masked with a fixed seed, so ``val/loss``
is comparable across epochs and ``test/loss`` between runs.

After training the encoder is written to ``<run_dir>/encoder.pt`` (tensors plus a metadata
dict, see :func:`encoder_payload`); ``model=mae_finetune model.pretrained=<that file>`` (or a
Lightning ``.ckpt`` of this model) loads it.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch

from mtneuro_lab.errors import ConfigError, DataError
from mtneuro_lab.io import atomic_write_bytes
from mtneuro_lab.methods.base import BaseMethod
from mtneuro_lab.nets.vit3d import (
    MAEDecoder,
    MaskStrategy,
    Preset,
    ViTEncoder,
    masked_patch_loss,
    num_visible,
    patchify,
    random_masking,
    unpatchify,
    vit_spec,
)

log = logging.getLogger(__name__)

ENCODER_FORMAT = "mtneuro_lab.mae_encoder/1"
#: key of the encoder metadata in a Lightning checkpoint of this model
CKPT_META_KEY = "mae_encoder"


def encoder_payload(encoder: ViTEncoder) -> dict[str, Any]:
    """What ``encoder.pt`` holds: tensors (CPU) and plain metadata, loadable with weights_only."""
    return {
        "format": ENCODER_FORMAT,
        "meta": encoder.spec.as_dict(),
        "state_dict": {k: v.detach().cpu().clone() for k, v in encoder.state_dict().items()},
    }


def save_encoder(encoder: ViTEncoder, path: str | Path) -> Path:
    """Atomically write :func:`encoder_payload` to ``path``."""
    buffer = io.BytesIO()
    torch.save(encoder_payload(encoder), buffer)
    atomic_write_bytes(Path(path), buffer.getvalue())
    return Path(path)


def tile_starts(size: int, crop: int) -> list[int]:
    """Start offsets of crops covering ``[0, size)``; the last crop is aligned to the end."""
    starts = list(range(0, size - crop + 1, crop))
    if starts and starts[-1] + crop < size:
        starts.append(size - crop)
    return starts


def tile_volume(volume: torch.Tensor, crop: Sequence[int]) -> torch.Tensor:
    """``(B, C, Z, Y, X)`` -> ``(N, C, *crop)``: non-overlapping tiles covering each volume."""
    spatial = tuple(volume.shape[2:])
    if spatial == tuple(crop):
        return volume
    if any(s < c for s, c in zip(spatial, crop)):
        raise DataError(f"evaluation volume {list(spatial)} is smaller than the model's crop {list(crop)}")
    starts = [tile_starts(s, c) for s, c in zip(spatial, crop)]
    tiles = [
        volume[:, :, z : z + crop[0], y : y + crop[1], x : x + crop[2]]
        for z in starts[0]
        for y in starts[1]
        for x in starts[2]
    ]
    return torch.cat(tiles, dim=0)


class MAEPretrain(BaseMethod):
    """ViT encoder + MAE decoder trained to reconstruct masked patches of EM crops."""

    task_kinds = ("em",)
    monitor = ("val/loss", "min")

    def __init__(
        self,
        num_classes: int,
        class_names: Sequence[str],
        input_shape: Sequence[int],
        *,
        preset: Preset = "base",
        patch_size: Sequence[int] = (1, 16, 16),
        mask_ratio: float = 0.9,
        mask_strategy: MaskStrategy = "random",
        decoder_dim: int = 512,
        decoder_depth: int = 4,
        decoder_heads: int = 16,
        norm_pix_loss: bool = True,
        eval_chunk: int = 8,
        encoder_file: str = "encoder.pt",
        **kwargs: Any,
    ) -> None:
        super().__init__(num_classes, class_names, input_shape, **kwargs)
        if not 0.0 <= mask_ratio < 1.0:
            raise ConfigError(f"model.mask_ratio: must be in [0, 1), got {mask_ratio}")
        if mask_strategy not in ("random", "space", "section"):
            raise ConfigError(f"model.mask_strategy: must be one of random, space, section, got {mask_strategy!r}")
        if decoder_dim < 1 or decoder_depth < 0 or decoder_heads < 1:
            raise ConfigError(
                f"model.decoder_*: need decoder_dim >= 1, decoder_depth >= 0, decoder_heads >= 1, "
                f"got {decoder_dim}, {decoder_depth}, {decoder_heads}"
            )
        if eval_chunk < 1:
            raise ConfigError(f"model.eval_chunk: must be >= 1, got {eval_chunk}")
        if not encoder_file or Path(encoder_file).name != encoder_file:
            raise ConfigError(f"model.encoder_file: must be a plain file name, got {encoder_file!r}")
        spec = vit_spec(preset, patch_size, self.input_shape)
        self.encoder = ViTEncoder(spec)
        if num_visible(self.encoder.num_tokens, mask_ratio) < 1:
            raise ConfigError(
                f"model.mask_ratio: {mask_ratio} leaves no visible token of the "
                f"{self.encoder.num_tokens} tokens of a {list(self.input_shape)} crop"
            )
        voxels = spec.in_channels * spec.patch_size[0] * spec.patch_size[1] * spec.patch_size[2]
        self.decoder = MAEDecoder(spec.dim, self.encoder.grid, voxels, decoder_dim, decoder_depth, decoder_heads)
        self.patch_size = spec.patch_size
        self.mask_ratio = float(mask_ratio)
        self.mask_strategy = mask_strategy
        self.norm_pix_loss = norm_pix_loss
        self.eval_chunk = eval_chunk
        self.encoder_file = encoder_file

    # -- the model -----------------------------------------------------------------------------
    def forward(
        self, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns ``(loss, pred (B, L, voxels), mask (B, L))`` for crops ``x (B, 1, D, H, W)``."""
        ids_keep: torch.Tensor | None
        ids_keep, mask = random_masking(
            x.shape[0], self.encoder.grid, self.mask_ratio, self.mask_strategy, device=x.device, generator=generator
        )
        if not mask.any():
            ids_keep = None  # mask_ratio 0: plain autoencoding of all tokens
        latent, _ = self.encoder(x, ids_keep)
        pred = self.decoder(latent, ids_keep)
        loss = masked_patch_loss(pred, patchify(x, self.patch_size), mask, self.norm_pix_loss)
        return loss, pred, mask

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss, _, _ = self(batch["image"])
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["image"].shape[0])
        return loss

    def _eval_step(self, stage: str, batch: dict[str, Any], batch_idx: int) -> None:
        tiles = tile_volume(batch["image"], self.input_shape)
        g = torch.Generator(device=tiles.device).manual_seed(1_000 + batch_idx)
        total, count = torch.zeros((), device=tiles.device), 0
        for s in range(0, tiles.shape[0], self.eval_chunk):
            chunk = tiles[s : s + self.eval_chunk]
            loss, pred, mask = self(chunk, generator=g)
            total, count = total + loss * chunk.shape[0], count + chunk.shape[0]
            self.offer_media(stage, "mae", partial(self.reconstructions, chunk[:2], pred[:2], mask[:2]))
        self.log(f"{stage}/loss", total / count, batch_size=count, sync_dist=True, prog_bar=stage == "val")

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step("val", batch, batch_idx)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step("test", batch, batch_idx)

    def reconstructions(self, x: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Masked input (hidden patches 0), reconstruction (visible patches from the input) and
        target of crops ``x``, for figures; with ``norm_pix_loss`` the prediction is mapped back
        with each patch's own mean and std."""
        target = patchify(x, self.patch_size)
        if self.norm_pix_loss:
            mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True, unbiased=False)
            pred = pred * (var + 1e-6).sqrt() + mean
        hidden = mask.unsqueeze(-1).to(target.dtype)
        grid = self.encoder.grid
        return {
            "masked": unpatchify(target * (1 - hidden), self.patch_size, grid)[:, 0],
            "prediction": unpatchify(pred * hidden + target * (1 - hidden), self.patch_size, grid)[:, 0],
            "target": x[:, 0],
        }

    # -- the reusable encoder --------------------------------------------------------------------
    def optimizer_parameters(self) -> Any:
        """AdamW without weight decay on biases, norms and the mask token (MAE recipe)."""
        decay: list[torch.nn.Parameter] = []
        no_decay: list[torch.nn.Parameter] = []
        for name, p in self.named_parameters():
            if p.requires_grad:
                (no_decay if p.ndim <= 1 or name.endswith("mask_token") else decay).append(p)
        return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CKPT_META_KEY] = self.encoder.spec.as_dict()

    def on_train_end(self) -> None:
        if self.trainer.is_global_zero:
            path = save_encoder(self.encoder, Path(self.trainer.default_root_dir) / self.encoder_file)
            log.info("MAE encoder written to %s", path)
