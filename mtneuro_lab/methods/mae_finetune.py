"""Fine-tuning a (pretrained) 3D ViT with a UNETR decoder for EM instance segmentation targets.

``model.pretrained=<encoder.pt | mae_pretrain .ckpt>`` loads every encoder tensor strictly,
position-embedding table and final LayerNorm included (the public 3D-MAE code dropped both);
``model.pretrained=null`` trains the same network from scratch (the paper's baseline).
Layer-wise learning-rate decay (BEiT/MAE): block ``i`` of ``depth`` trains at
``lr * layer_decay ** (depth - i)``, the patch embedding at ``lr * layer_decay ** (depth + 1)``,
the final norm and the whole decoder at ``lr``.

The target kind (affinity, bc, bcd) is the task's ``target`` (:meth:`MAEFinetune.bind_task`).
Validation and test run sliding-window
inference over the whole volume (windows of the training crop, the task's ``eval_overlap``):
validation logs ``val/loss`` against the volume's targets; test post-processes the blended
probabilities with the task's post-processing and logs every metric of
:func:`evaluate_volume` as ``test/<name>`` (``test/arand``,
``test/voi_split``, ``test/voi_merge``, ``test/ap50``, ``test/ap75`` ...).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mtneuro_lab.data.contract import Task
from mtneuro_lab.data.em import EMTask
from mtneuro_lab.data.targets import TargetKind
from mtneuro_lab.decoding import postprocess as pp
from mtneuro_lab.decoding.postprocess import sliding_window_predict
from mtneuro_lab.errors import CheckpointError, ConfigError
from mtneuro_lab.methods.base import BaseMethod
from mtneuro_lab.methods.mae_pretrain import CKPT_META_KEY, ENCODER_FORMAT
from mtneuro_lab.metrics.em import evaluate_instances
from mtneuro_lab.nets.unetr import UNETR
from mtneuro_lab.nets.vit3d import Preset, ViTEncoder, resize_pos_embed, token_grid, vit_spec

log = logging.getLogger(__name__)
KEY = "model.pretrained"


# -- scoring a whole volume --------------------------------------------------------------------
def segment_volume(task: EMTask, prob: np.ndarray | torch.Tensor) -> np.ndarray:
    """``(C, Z, Y, X)`` probabilities -> int64 instances with the task's post-processing (waterz or
    seeded watershed, :mod:`mtneuro_lab.decoding.postprocess`)."""
    return pp.segment(prob, task.target, task.postprocess)


def score_volume(
    task: EMTask, seg: np.ndarray, gt: np.ndarray | torch.Tensor, prob: np.ndarray | torch.Tensor | None = None
) -> dict[str, float]:
    """Instance metrics (no stage prefix); ``prob`` ranks instances for AP by mean confidence."""
    scores = None
    if prob is not None:
        scores = pp.instance_scores(seg, pp.confidence_map(prob, task.target))
    return evaluate_instances(seg, gt, ignore_zero=task.ignore_zero, scores=scores)


def evaluate_volume(task: EMTask, prob: np.ndarray | torch.Tensor, gt: np.ndarray | torch.Tensor) -> dict[str, float]:
    """:func:`segment_volume` then :func:`score_volume`: what the test step logs as ``test/<name>``."""
    return score_volume(task, segment_volume(task, prob), gt, prob)


# -- pretrained weights -----------------------------------------------------------------------
def read_encoder_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(encoder state_dict, metadata)`` from ``encoder.pt`` or a Lightning ``.ckpt`` (weights_only)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{KEY}: no checkpoint file at {path}")
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


# -- targets ----------------------------------------------------------------------------------
def target_loss(
    logits: torch.Tensor, target: torch.Tensor, target_kind: TargetKind, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Masked BCE on probability channels; for BCD, MSE of ``tanh`` on the distance channel."""
    weight = torch.ones_like(target) if mask is None else mask.to(target.dtype)
    prob = slice(0, 2) if target_kind == "bcd" else slice(None)
    bce = F.binary_cross_entropy_with_logits(logits[:, prob], target[:, prob], reduction="none")
    loss = (bce * weight[:, prob]).sum() / weight[:, prob].sum().clamp_min(1)
    if target_kind == "bcd":
        mse = (torch.tanh(logits[:, 2:3]) - target[:, 2:3]) ** 2
        loss = loss + (mse * weight[:, 2:3]).sum() / weight[:, 2:3].sum().clamp_min(1)
    return loss


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


class MAEFinetune(BaseMethod):
    """UNETR on a ViT encoder (pretrained by ``model=mae_pretrain`` or from scratch)."""

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
        pretrained: str | None = None,
        layer_decay: float = 0.75,
        drop_path: float = 0.1,
        feature_size: int = 16,
        sw_batch_size: int = 4,
        **kwargs: Any,
    ) -> None:
        super().__init__(num_classes, class_names, input_shape, **kwargs)
        if not 0.0 < layer_decay <= 1.0:
            raise ConfigError(f"model.layer_decay: must be in (0, 1], got {layer_decay}")
        if not 0.0 <= drop_path < 1.0:
            raise ConfigError(f"model.drop_path: must be in [0, 1), got {drop_path}")
        if sw_batch_size < 1:
            raise ConfigError(f"model.sw_batch_size: must be >= 1, got {sw_batch_size}")
        self.em_task: EMTask | None = None  # set by bind_task: post-processing, overlap, target kind
        spec = vit_spec(preset, patch_size, self.input_shape)
        self.net = UNETR(ViTEncoder(spec, drop_path=drop_path), self.num_classes, feature_size)
        self.pretrained = pretrained
        if pretrained:
            load_pretrained_encoder(self.net.encoder, pretrained)
        self.layer_decay = layer_decay
        self.sw_batch_size = sw_batch_size

    @property
    def encoder(self) -> ViTEncoder:
        return self.net.encoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def optimizer_parameters(self) -> Any:
        named = [(n[len("net.") :], p) for n, p in self.named_parameters()]
        return layer_decay_groups(named, self.encoder.spec.depth, self.layer_decay, self.optim_cfg.weight_decay)

    def bind_task(self, task: Task) -> None:
        """The EM task gives the target kind (its ``target``), the post-processing and the overlap."""
        if not isinstance(task, EMTask):
            raise ConfigError("model=mae_finetune: needs an EM task (task=snemi3d or task=mitoem)")
        self.em_task = task

    @property
    def target_kind(self) -> TargetKind:
        """affinity | bc | bcd: the bound task's ``target``."""
        return self._task().target

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        logits = self(batch["image"])
        loss = target_loss(logits, batch["target"], self.target_kind, batch.get("mask"))
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["image"].shape[0])
        return loss

    # -- whole-volume evaluation -------------------------------------------------------------
    def _task(self) -> EMTask:
        if self.em_task is None:
            raise ConfigError(
                "model=mae_finetune: no task bound (build the run with mtneuro_lab.build, or call bind_task)"
            )
        return self.em_task

    def _predict_volume(self, image: torch.Tensor, activation: Any = None) -> torch.Tensor:
        task = self._task()
        return sliding_window_predict(
            self,
            image,
            self.input_shape,
            overlap=task.eval_overlap,
            sw_batch_size=self.sw_batch_size,
            activation=activation,
        )

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        logits = self._predict_volume(batch["image"])
        loss = target_loss(logits, batch["target"], self.target_kind, batch.get("mask"))
        self.log("val/loss", loss, prog_bar=True, batch_size=1, sync_dist=True)
        self.offer_media("val", "em", lambda: _em_media(batch, self._task().activate(logits)))

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        task = self._task()
        prob = self._predict_volume(batch["image"], activation=task.activate)
        seg = segment_volume(task, prob[0])
        metrics = score_volume(task, seg, batch["instances"][0], prob[0])  # = evaluate_volume
        self.offer_media("test", "em", lambda: _em_media(batch, prob, seg))
        self.log_dict({f"test/{k}": float(v) for k, v in metrics.items()}, batch_size=1)


def _em_media(batch: dict[str, Any], prob: torch.Tensor, seg: np.ndarray | None = None) -> dict[str, Any]:
    """The first volume's image, instances, first probability channel (and segmentation) for figures."""
    arrays = {"image": batch["image"][0, 0], "prob": prob[0, 0]}
    if "instances" in batch:
        arrays["truth"] = batch["instances"][0]
    if seg is not None:
        arrays["seg"] = seg
    return arrays
