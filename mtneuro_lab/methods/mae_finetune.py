"""Fine-tuning a (pretrained) 3D ViT with a UNETR decoder for EM instance segmentation targets.

``model.pretrained=<encoder.pt | mae_pretrain .ckpt>`` loads every encoder tensor strictly,
position-embedding table and final LayerNorm included (the public 3D-MAE code dropped both);
``model.pretrained=null`` trains the same network from scratch (the paper's baseline).
Layer-wise learning-rate decay (BEiT/MAE): block ``i`` of ``depth`` trains at
``lr * layer_decay ** (depth - i)``, the patch embedding at ``lr * layer_decay ** (depth + 1)``,
the final norm and the whole decoder at ``lr``.

Everything else (targets, rebalanced loss, whole-volume validation with the post-processing
search, checkpoint choice by the task's metric, test scoring and ``predictions/test.h5``) is
:class:`~mtneuro_lab.methods.em.EMSegmentation`'s: this class only builds the network and the
layer-decay parameter groups.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import torch

from mtneuro_lab.errors import CheckpointError, ConfigError, existing_checkpoint
from mtneuro_lab.methods.em import EMSegmentation
from mtneuro_lab.methods.mae_pretrain import CKPT_META_KEY, ENCODER_FORMAT
from mtneuro_lab.nets.unetr import UNETR
from mtneuro_lab.nets.vit3d import Preset, ViTEncoder, resize_pos_embed, token_grid, vit_spec

log = logging.getLogger(__name__)
KEY = "model.pretrained"


# -- pretrained weights -----------------------------------------------------------------------
def read_encoder_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(encoder state_dict, metadata)`` from ``encoder.pt`` or a Lightning ``.ckpt`` (weights_only)."""
    path = existing_checkpoint(path, KEY)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure is a bad checkpoint
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{KEY}: cannot load {path} safely ({first})") from None
    if isinstance(payload, dict) and payload.get("format") == ENCODER_FORMAT:
        return dict(payload["state_dict"]), dict(payload["meta"])
    if isinstance(payload, dict) and CKPT_META_KEY in payload and "state_dict" in payload:
        state = {k[len("encoder.") :]: v for k, v in payload["state_dict"].items() if k.startswith("encoder.")}
        return state, dict(payload[CKPT_META_KEY])
    raise CheckpointError(
        f"{KEY}: {path} is not an MAE encoder checkpoint (expected the encoder.pt or a "
        f"Lightning .ckpt written by model=mae_pretrain)"
    )


def load_pretrained_encoder(encoder: ViTEncoder, path: str | Path) -> dict[str, torch.Tensor]:
    """Load ``path`` into ``encoder`` strictly; returns the tensors as loaded (after any resize).

    Another width/depth/heads/patch -> CheckpointError; another crop shape with the same patch
    -> the position table is resized trilinearly to this encoder's token grid.
    """
    state, meta = read_encoder_checkpoint(path)
    spec = encoder.spec
    want = {
        "dim": spec.dim,
        "depth": spec.depth,
        "heads": spec.heads,
        "patch_size": list(spec.patch_size),
        "in_channels": spec.in_channels,
    }
    for name, value in want.items():
        if meta.get(name) != value:
            raise CheckpointError(
                f"{KEY}: {path} holds an encoder with {name}={meta.get(name)} (preset {meta.get('preset')}); "
                f"this model has {name}={value} (preset {spec.preset})"
            )
    old_grid = token_grid(meta["input_shape"], meta["patch_size"])
    if old_grid != encoder.grid and "pos_embed" in state:
        log.info("%s: resizing position embeddings from token grid %s to %s", KEY, old_grid, encoder.grid)
        state["pos_embed"] = resize_pos_embed(state["pos_embed"][0], old_grid, encoder.grid).unsqueeze(0)
    try:
        encoder.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{KEY}: {path} does not fit the encoder ({str(err).splitlines()[0]})") from None
    return state


# -- layer-wise learning-rate decay -----------------------------------------------------------
def layer_id(name: str, depth: int) -> int:
    """0 for patch embedding, ``i + 1`` for encoder block ``i``, ``depth + 1`` for everything else."""
    if name.startswith(("encoder.patch_embed", "encoder.pos_embed")):
        return 0
    if name.startswith("encoder.blocks."):
        return int(name.split(".")[2]) + 1
    return depth + 1


def layer_decay_groups(
    named_params: Sequence[tuple[str, torch.nn.Parameter]], depth: int, decay: float, weight_decay: float
) -> list[dict[str, Any]]:
    """Parameter groups with ``lr_scale = decay ** (depth + 1 - layer_id)``; no weight decay on 1-D params."""
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, p in named_params:
        if not p.requires_grad:
            continue
        lid, no_wd = layer_id(name, depth), p.ndim <= 1
        group = groups.setdefault(
            (lid, no_wd),
            {
                "params": [],
                "names": [],
                "lr_scale": decay ** (depth + 1 - lid),
                "weight_decay": 0.0 if no_wd else weight_decay,
            },
        )
        group["params"].append(p)
        group["names"].append(name)
    return [groups[k] for k in sorted(groups)]


class MAEFinetune(EMSegmentation):
    """UNETR on a ViT encoder (pretrained by ``model=mae_pretrain`` or from scratch)."""

    def __init__(
        self,
        num_classes: int,
        class_names: Sequence[str],
        input_shape: Sequence[int],
        *,
        preset: Preset = "base",
        patch_size: Sequence[int] = (1, 16, 16),
        pretrained: str | None = None,
        layer_decay: float = 0.75,
        drop_path: float = 0.1,
        feature_size: int = 16,
        **kwargs: Any,
    ) -> None:
        if not 0.0 < layer_decay <= 1.0:
            raise ConfigError(f"model.layer_decay: must be in (0, 1], got {layer_decay}")
        if not 0.0 <= drop_path < 1.0:
            raise ConfigError(f"model.drop_path: must be in [0, 1), got {drop_path}")
        spec = vit_spec(preset, patch_size, input_shape)
        net = UNETR(ViTEncoder(spec, drop_path=drop_path), int(num_classes), feature_size)
        if pretrained:
            load_pretrained_encoder(net.encoder, pretrained)
        super().__init__(num_classes, class_names, input_shape, net=net, **kwargs)
        self.pretrained = pretrained
        self.layer_decay = layer_decay

    @property
    def encoder(self) -> ViTEncoder:
        return cast(UNETR, self.net).encoder

    def optimizer_parameters(self) -> Any:
        named = [(n[len("net.") :], p) for n, p in self.named_parameters()]
        return layer_decay_groups(named, self.encoder.spec.depth, self.layer_decay, self.optim_cfg.weight_decay)
