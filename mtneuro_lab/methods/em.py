"""Serial-EM instance segmentation with any 3D network: targets, loss, whole-volume evaluation.

:class:`EMSegmentation` is the one EM LightningModule. It owns everything but the network:

* **loss** (:func:`target_loss`): BCE-with-logits on the probability channels (affinities,
  foreground, contour), by default with class rebalancing (Lee et al. 2017; pytorch_connectomics'
  weighted BCE): per channel and batch, voxels of the rarer value weigh ``majority / minority``
  (fractions clamped to [0.02, 0.98]); BCD adds MSE of ``tanh`` on the distance channel.
  Long-range affinity offsets (``task.offsets``) are extra channels of the same loss.
* **validation**: sliding-window inference over the whole validation volume (windows = the
  training crop, ``task.eval_overlap``, Gaussian blending; ``task.tta=flips`` averages each
  window over its 8 flips, :mod:`mtneuro_lab.decoding.tta`), ``val/loss``, then the
  post-processing search (``task.postprocess.select=val``: the grid, one waterz pass for every
  threshold; ``fixed``: the configured values) scored by the task's ``metric``; logs every
  metric of the chosen setting as ``val/<name>`` and the setting as ``val/pp_<name>``.
  Checkpoints are chosen by ``val/<task.metric>`` (``val/arand`` for neurons, ``val/ap75`` for
  mitochondria); the chosen setting travels in the checkpoint (``em_postprocess``).
* **test**: the test volume is post-processed ONCE with the setting chosen on validation and
  scored (``test/arand``, ``test/voi_split``, ``test/voi_merge``, ``test/ap50``, ``test/ap75`` ...);
  the setting is logged as ``test/pp_<name>``, the inference cost as ``test/infer_cpu_s``,
  ``test/infer_wall_s`` and ``test/voxels``; ``predictions/test.h5`` holds segmentation,
  probabilities and image (gzip) for napari/neuroglancer.

The network comes from the config (``model.net``: any ``_target_`` with ``_partial_: true``,
called with ``in_channels=1``, ``out_channels=<target channels>`` and, if it accepts it,
``input_shape``), or from a subclass: :class:`UNet3DEM` (MONAI UNet/BasicUNet, ``model=unet3d``
on EM tasks) and :class:`~mtneuro_lab.methods.mae_finetune.MAEFinetune` (UNETR).
"""

from __future__ import annotations

import functools
import inspect
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mtneuro_lab.data import augment
from mtneuro_lab.data.em import EMDataModule, EMTask
from mtneuro_lab.decoding.export import write_predictions
from mtneuro_lab.decoding.postprocess import fixed_setting, sliding_window_predict
from mtneuro_lab.decoding.tta import flip_averaged
from mtneuro_lab.decoding.volume import ChunkedStats, predict_chunked
from mtneuro_lab.errors import ConfigError
from mtneuro_lab.methods.base import BaseMethod
from mtneuro_lab.methods.em_eval import (
    METRIC_LOWER_IS_BETTER,
    evaluate_volume,
    search_postprocess,
    with_params,
)
from mtneuro_lab.nets.segmentation import em_unet

#: what validation logs besides val/loss and val/pp_* (every metric of the chosen setting)
VAL_METRICS = ("arand", "arand_precision", "arand_recall", "voi_split", "voi_merge", "voi", "ap50", "ap75")
CKPT_KEY = "em_postprocess"
BALANCE_CLAMP = (0.02, 0.98)


# -- loss ---------------------------------------------------------------------------------------
def balance_weights(target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-voxel weights: in each channel of the batch the rarer class weighs majority / minority."""
    dims = (0, *range(2, target.ndim))
    labelled = mask.sum(dim=dims).clamp_min(1)
    frac = ((target * mask).sum(dim=dims) / labelled).clamp(*BALANCE_CLAMP)  # (C,) positive fraction
    w_pos = torch.where(frac < 0.5, (1 - frac) / frac, torch.ones_like(frac))
    w_neg = torch.where(frac > 0.5, frac / (1 - frac), torch.ones_like(frac))
    shape = (1, -1) + (1,) * (target.ndim - 2)
    return torch.where(target > 0.5, w_pos.view(shape), w_neg.view(shape)) * mask


def target_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    kind: str,
    mask: torch.Tensor | None = None,
    rebalance: bool = False,
) -> torch.Tensor:
    """Masked BCE on probability channels (class-rebalanced if asked); BCD: + MSE of ``tanh`` distance."""
    mask = torch.ones_like(target) if mask is None else mask.to(target.dtype)
    prob = slice(0, 2) if kind == "bcd" else slice(None)
    weight = mask[:, prob]
    if rebalance:
        weight = balance_weights(target[:, prob], weight)
    bce = F.binary_cross_entropy_with_logits(logits[:, prob], target[:, prob], reduction="none")
    loss = (bce * weight).sum() / weight.sum().clamp_min(1e-6)
    if kind == "bcd":
        mse = (torch.tanh(logits[:, 2:3]) - target[:, 2:3]) ** 2
        loss = loss + (mse * mask[:, 2:3]).sum() / mask[:, 2:3].sum().clamp_min(1)
    return loss


# -- the method ---------------------------------------------------------------------------------
def build_net(net: nn.Module | Callable[..., nn.Module], out_channels: int, input_shape: Sequence[int]) -> nn.Module:
    """A module as given, or ``net(in_channels=1, out_channels=..., [input_shape=...])``."""
    if isinstance(net, nn.Module):
        return net
    if not callable(net):
        raise ConfigError(f"model.net: expected a network config with _target_ and _partial_: true, got {net!r}")
    func = net.func if isinstance(net, functools.partial) else net
    kwargs: dict[str, Any] = {"in_channels": 1, "out_channels": out_channels}
    fixed = sorted(set(getattr(net, "keywords", {})) & {"in_channels", "out_channels", "input_shape"})
    if fixed:
        raise ConfigError(
            f"model.net.{fixed[0]}: set by the run (1 input channel, the task's {out_channels} target "
            f"channels, the crop); remove it from the network config"
        )
    accepts: Mapping[str, Any]
    try:
        accepts = inspect.signature(func).parameters
    except (TypeError, ValueError):  # builtins without a signature
        accepts = {}
    if "input_shape" in accepts:
        kwargs["input_shape"] = tuple(input_shape)
    try:
        return net(**kwargs)
    except TypeError as err:
        raise ConfigError(f"model.net: cannot build the network ({str(err).splitlines()[0]})") from None


class EMSegmentation(BaseMethod):
    """Trains ``net`` (``(B, 1, *crop)`` -> ``(B, C, *crop)`` logits) on an EM task's targets."""

    task_kinds = ("em",)
    monitor = ("val/arand", "min")  # replaced by the task's metric in bind_task

    def __init__(
        self,
        num_classes: int,
        class_names: Sequence[str],
        input_shape: Sequence[int],
        *,
        net: Any = None,
        rebalance: bool = True,
        sw_batch_size: int = 4,
        save_predictions: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(num_classes, class_names, input_shape, **kwargs)
        if net is None:
            raise ConfigError("model.net: missing; give a network config (_target_, _partial_: true)")
        if sw_batch_size < 1:
            raise ConfigError(f"model.sw_batch_size: must be >= 1, got {sw_batch_size}")
        if len(self.input_shape) != 3:
            raise ConfigError(f"model: EM networks are 3D; the task's crop is {list(self.input_shape)}")
        self.net = build_net(net, self.num_classes, self.input_shape)
        self._check_output()
        self.rebalance = bool(rebalance)
        self.sw_batch_size = int(sw_batch_size)
        self.save_predictions = bool(save_predictions)
        self.em_task: EMTask | None = None
        #: post-processing values chosen on validation (or the fixed ones), restored from checkpoints
        self.chosen_postprocess: dict[str, float] = {}

    def _check_output(self) -> None:
        """One line when the network's output does not fit the target channels or the crop.

        The forward runs on the meta device (shapes only, the weights untouched), so checking a
        full-size crop costs no arithmetic; a network with an operation that has no meta kernel
        is run on a real zero crop instead."""
        was_training = self.net.training
        self.net.eval()
        shapes_only = {name: t.to("meta") for name, t in [*self.net.named_parameters(), *self.net.named_buffers()]}
        try:
            with torch.no_grad():
                try:
                    x = torch.zeros(1, 1, *self.input_shape, device="meta")
                    out = torch.func.functional_call(self.net, shapes_only, (x,))
                except NotImplementedError:
                    out = self.net(torch.zeros(1, 1, *self.input_shape))
        except RuntimeError as err:
            raise ConfigError(
                f"task.crop: the network cannot run on crops of {list(self.input_shape)} ({str(err).splitlines()[0]})"
            ) from None
        finally:
            self.net.train(was_training)
        want = (1, self.num_classes, *self.input_shape)
        if tuple(out.shape) != want:
            raise ConfigError(
                f"model.net: the network maps a crop of {list(self.input_shape)} to {list(out.shape[1:])}, "
                f"but the task needs {self.num_classes} channels ({', '.join(self.class_names)}) of the crop's size"
            )

    # -- the task --------------------------------------------------------------------------------
    def bind_task(self, task: Any) -> None:
        """Target kind, selection metric and post-processing come from the EM task."""
        if not isinstance(task, EMTask):
            raise ConfigError(f"model: {type(self).__name__} runs on EM tasks (snemi3d, mitoem, gala_fibsem ...)")
        if task.num_classes != self.num_classes:
            raise ConfigError(
                f"model: the network predicts {self.num_classes} channels, but task.target={task.target} "
                f"needs {task.num_classes} ({', '.join(task.class_names)})"
            )
        self.em_task = task
        # per instance: the selection key is the bound task's metric (the class default is a fallback)
        direction = "min" if METRIC_LOWER_IS_BETTER[task.metric] else "max"
        self.monitor = (f"val/{task.metric}", direction)  # type: ignore[misc]

    def check_trainer(self, trainer_cfg: Any) -> None:
        """``select=val`` needs a validation pass: one line before any work if the trainer skips it."""
        task = self._task()
        limit = trainer_cfg.get("limit_val_batches", None) if trainer_cfg is not None else None
        if task.postprocess.select == "val" and limit is not None and float(limit) == 0:
            raise ConfigError(
                "task.postprocess.select=val chooses post-processing on the validation volume, but "
                "trainer.limit_val_batches=0 skips validation; use task.postprocess.select=fixed"
            )

    def setup(self, stage: str) -> None:
        if self.em_task is None:  # built outside build.build_components (tests, notebooks)
            dm = getattr(self.trainer, "datamodule", None)
            self.bind_task(getattr(dm, "task", None))

    def _task(self) -> EMTask:
        if self.em_task is None:
            raise ConfigError(f"model: {type(self).__name__} needs an EM task (bind_task was never called)")
        return self.em_task

    @property
    def target_kind(self) -> str:
        """affinity | bc | bcd: the bound task's ``target``."""
        return self._task().target

    def validation_metrics(self) -> set[str]:
        params: tuple[str, ...] = ("threshold",) if self.em_task is None or self.em_task.target == "affinity" else ()
        params = params or ("seed_foreground", "mask_foreground")
        return {"val/loss", *(f"val/{m}" for m in VAL_METRICS), *(f"val/pp_{p}" for p in params)}

    # -- training --------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        logits = self(batch["image"])
        loss = target_loss(logits, batch["target"], self.target_kind, batch.get("mask"), self.rebalance)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["image"].shape[0])
        return loss

    # -- whole-volume evaluation -----------------------------------------------------------------
    def window_predictor(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """Logits of one batch of windows: the network, or its flip average (``task.tta=flips``)."""
        task = self._task()
        return self if task.tta == "none" else flip_averaged(self, task.channel_offsets)

    def predict_volume(self, image: torch.Tensor, keep_logits: bool = False) -> Any:
        """Blended probabilities ``(1, C, Z, Y, X)`` of a normalised volume (and logits if asked)."""
        task = self._task()
        return sliding_window_predict(
            self.window_predictor(),
            image,
            self.input_shape,
            overlap=task.eval_overlap,
            sw_batch_size=self.sw_batch_size,
            activation=task.activate,
            output_device="cpu",
            keep_logits=keep_logits,
        )

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        task = self._task()
        logits, prob = self.predict_volume(batch["image"], keep_logits=True)
        mask = batch.get("mask")
        loss = target_loss(
            logits, batch["target"].cpu(), self.target_kind, None if mask is None else mask.cpu(), self.rebalance
        )
        self.log("val/loss", loss, prog_bar=True, batch_size=1)
        self.offer_media("val", "em", lambda: em_media(batch, prob))
        choice = search_postprocess(
            prob[0],
            batch["instances"][0],
            task.target,
            task.postprocess,
            task.metric,
            task.ignore_zero,
            sections=task.instances == "section_components",
            search=task.postprocess.select == "val",
        )
        self.chosen_postprocess = dict(choice.params)
        logged = {f"val/{k}": float(v) for k, v in choice.metrics.items() if k != task.metric}
        logged |= {f"val/pp_{k}": float(v) for k, v in choice.params.items()}
        self.log_dict(logged, batch_size=1)
        self.log(f"val/{task.metric}", float(choice.metrics[task.metric]), prog_bar=True, batch_size=1)

    def applied_postprocess(self) -> dict[str, float]:
        """What the test step applies: the setting chosen on validation, or the fixed values."""
        task = self._task()
        if task.postprocess.select == "fixed":
            return fixed_setting(task.target, task.postprocess)
        if not self.chosen_postprocess:
            raise ConfigError(
                "task.postprocess.select=val: no post-processing was chosen on validation for these weights "
                "(a checkpoint from select=fixed, or never validated); validate first or use "
                "task.postprocess.select=fixed"
            )
        return dict(self.chosen_postprocess)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        task = self._task()
        params = self.applied_postprocess()
        cpu, wall = time.process_time(), time.perf_counter()
        prob = self.predict_volume(batch["image"])
        infer_cpu, infer_wall = time.process_time() - cpu, time.perf_counter() - wall
        metrics, seg = evaluate_volume(
            prob[0],
            batch["instances"][0],
            task.target,
            with_params(task.postprocess, params),
            task.ignore_zero,
            sections=task.instances == "section_components",
        )
        logged = {f"test/{k}": float(v) for k, v in metrics.items()}
        logged |= {f"test/pp_{k}": float(v) for k, v in params.items()}
        logged |= {"test/infer_cpu_s": infer_cpu, "test/infer_wall_s": infer_wall, "test/voxels": float(seg.size)}
        self.log_dict(logged, batch_size=1)
        self.offer_media("test", "em", lambda: em_media(batch, prob, seg))
        if self.save_predictions and self.trainer.is_global_zero:
            self._write_predictions(seg, prob[0].numpy(), batch["image"][0, 0], params)

    def _write_predictions(self, seg: np.ndarray, prob: np.ndarray, image: torch.Tensor, params: dict) -> None:
        """``<run_dir>/predictions/test.h5``: segmentation, probabilities, uint8 image (gzip)."""
        dm = getattr(self.trainer, "datamodule", None)
        raw = dm.volumes["test"].image if isinstance(dm, EMDataModule) and "test" in dm.volumes else None
        if raw is None or raw.shape != seg.shape:
            raw = image.float().cpu().numpy()
        task = self._task()
        attrs = {
            "task": task.name,
            "target": task.target,
            "channels": ",".join(task.class_names),
            **{f"postprocess_{k}": v for k, v in params.items()},
        }
        write_predictions(Path(self.trainer.default_root_dir) / "predictions" / "test.h5", seg, prob, raw, attrs)

    def predict_large(self, source: Any, out: Any, mean: float, std: float) -> ChunkedStats:
        """Probabilities of a uint8 ``(Z, Y, X)`` array that slices lazily (HDF5, zarr, memmap) into
        ``out`` ``(C, Z, Y, X)``, section slab by slab (:func:`~mtneuro_lab.decoding.volume.predict_chunked`)."""
        task = self._task()
        was_training = self.training
        self.eval()
        try:
            predictor = self.window_predictor()
            return predict_chunked(
                lambda x: task.activate(predictor(x.to(self.device))).cpu(),
                source,
                out,
                self.input_shape,
                # a read-only slab (an .npy memory map) is copied: torch warns on non-writable arrays
                lambda slab: augment.to_float(torch.from_numpy(np.require(slab, requirements="W")), mean, std)[:, 0],
                overlap=task.eval_overlap,
                sw_batch_size=self.sw_batch_size,
            )
        finally:
            self.train(was_training)

    # -- checkpoints -----------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CKPT_KEY] = dict(self.chosen_postprocess)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.chosen_postprocess = {k: float(v) for k, v in (checkpoint.get(CKPT_KEY) or {}).items()}


def em_media(batch: dict[str, Any], prob: torch.Tensor, seg: np.ndarray | None = None) -> dict[str, Any]:
    """The first volume's image, instances, first probability channel (and segmentation) for figures."""
    arrays = {"image": batch["image"][0, 0], "prob": prob[0, 0]}
    if "instances" in batch:
        arrays["truth"] = batch["instances"][0]
    if seg is not None:
        arrays["seg"] = seg
    return arrays


class UNet3DEM(EMSegmentation):
    """``model=unet3d`` on EM tasks: MONAI ``UNet`` (residual units) or ``BasicUNet`` on affinities.

    ``unet3d`` halves y/x at every level and z only at the last levels the crop depth allows
    (:func:`mtneuro_lab.nets.rsunet.inplane_first_factors`); ``basic_unet`` always halves all
    three axes four times (crops divisible by 16).
    """

    def __init__(
        self,
        num_classes: int,
        class_names: Sequence[str],
        input_shape: Sequence[int],
        *,
        arch: Literal["unet3d", "basic_unet"] = "unet3d",
        base_channels: int = 16,
        levels: int | None = None,
        **kwargs: Any,
    ) -> None:
        net = em_unet(arch, num_classes, base_channels, levels, input_shape)
        super().__init__(num_classes, class_names, input_shape, net=net, **kwargs)
