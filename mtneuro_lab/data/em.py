"""Serial-EM instance-segmentation tasks (SNEMI3D neurons, MitoEM mitochondria) and their datamodule.

**Splits.** Each split is one volume, read whole in x/y from the source: a z range of a
channel pair, ``{z: [start, stop) | null, image: <channel>, labels: <channel>}``. One volume
split along z (``train: {z: [0, 70]}``, ``val: {z: [70, 80]}``, ...) and separate files per
split (``test: {image: test_image, labels: test_labels}`` with a ``source=local`` that maps
those channel names to files) are the same mechanism. ``z: null`` is the channel's whole
depth. The same channel may not appear in two splits with overlapping z.

**Batches** (the contract for EM methods, ``task_kinds = ("em",)``):

* training: ``image`` float ``(B, 1, D, H, W)`` normalised; ``target`` float
  ``(B, C, D, H, W)`` (:mod:`mtneuro_lab.data.targets`, ``C = task.num_classes``);
  ``mask`` float like ``target`` (1 where the target is defined); ``instances`` int64
  ``(B, D, H, W)``. ``(D, H, W)`` is ``task.crop``. Crops are drawn at random positions of
  the training volume, flipped (x, y, optionally z) and rotated by multiples of 90 degrees
  in-plane jointly with the labels, intensity-jittered, and their targets computed after the
  augmentation from the labels with enough context that they are exact.
* validation / test: one batch per split holding the whole volume: ``image``
  ``(1, 1, Z, Y, X)``, ``instances`` int64 ``(1, Z, Y, X)`` ground truth, ``target``/``mask``
  of the whole volume. Every DDP rank gets the whole volume. Methods run
  :func:`mtneuro_lab.decoding.postprocess.sliding_window_predict` with
  ``roi_size=task.crop``, then score with the task's post-processing
  (:func:`mtneuro_lab.methods.mae_finetune.evaluate_volume`) and log each value
  as ``<stage>/<name>`` (``test/arand``, ``test/voi_split``, ``test/voi_merge``,
  ``test/ap50``, ``test/ap75``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from mtneuro_lab.config.sections import PostprocessConfig
from mtneuro_lab.data import augment, targets
from mtneuro_lab.data.contract import Task
from mtneuro_lab.data.datamodules import VolumeDataModule
from mtneuro_lab.data.distributed import GlobalBatchLoader
from mtneuro_lab.data.sources.base import VolumeSource
from mtneuro_lab.data.tasks import SPLITS, downsample_area, downsample_nearest, parse_z
from mtneuro_lab.errors import ConfigError, DataError

log = logging.getLogger(__name__)
#: main scores of an EM task (``task.metric``) and what the labels channel holds (``task.instances``)
METRICS = ("arand", "voi", "ap50", "ap75")
INSTANCE_KINDS = ("ids", "section_components")
#: ``task.tta``: one pass, or the average over the 8 z/y/x flips (mtneuro_lab.decoding.tta)
TTA_MODES = ("none", "flips")


@dataclass(frozen=True)
class EMSplit:
    """Where one split's volume comes from: channels, a z range and optionally an x range
    (null: the whole axis). An x range lets validation hold objects that training never
    labels when objects run through every section (gala_fibsem's neurons run along z and y)."""

    image: str
    labels: str
    z: tuple[int, int] | None
    x: tuple[int, int] | None = None


@dataclass
class EMVolume:
    """One split in memory: uint8 image, int32 instance ids, optional float16 signed distance."""

    image: np.ndarray
    labels: np.ndarray
    z: tuple[int, int]
    distance: np.ndarray | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.image.shape)


def _parse_split(name: str, spec: Any, labels: str) -> EMSplit:
    key = f"task.splits.{name}"
    if not isinstance(spec, Mapping):
        raise ConfigError(
            f"{key}: expected {{z: [start, stop] or null, image: <channel>, labels: <channel>}}, got {spec!r}"
        )
    unknown = set(spec) - {"z", "x", "image", "labels"}
    if unknown:
        raise ConfigError(f"{key}: unknown key(s) {sorted(unknown)}; allowed: z, x, image, labels")
    z = spec.get("z")
    if z is not None:
        z = parse_z(z, key)
    x = spec.get("x")
    if x is not None:
        x = parse_z(x, key, axis="x")
    image = spec.get("image", "image")
    lab = spec.get("labels", labels)
    for field_name, value in (("image", image), ("labels", lab)):
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{key}.{field_name}: expected a channel name, got {value!r}")
    return EMSplit(str(image), str(lab), z, x)


def _x_range(split: EMSplit) -> str:
    return f" x{list(split.x)}" if split.x else ""


def _overlap(a: tuple[int, int] | None, b: tuple[int, int] | None) -> bool:
    """Do two half-open ranges (None = the whole axis) share a coordinate?"""
    return a is None or b is None or max(a[0], b[0]) < min(a[1], b[1])


class EMTask(Task):
    """An EM instance-segmentation task: split volumes, training crops, targets, post-processing.

    ``labels`` names the instance channel (``labels`` neurons, ``mito`` mitochondria);
    ``target`` picks affinity / bc / bcd; ``crop`` is the training crop ``[D, H, W]``;
    ``voxel_size`` ``[z, y, x]`` nm of the stored data (null: the source's own, e.g. the
    phantom's 30x6x6; only BCD distances use it) before ``downsample``, which mean-pools
    images and subsamples labels in-plane; ``ignore_zero`` leaves ground-truth 0
    out of ARAND/VOI (0 = unlabelled boundary, SNEMI3D) or scores it as background (MitoEM);
    ``metric`` is the task's main score, by which checkpoints and post-processing are chosen on
    validation (``arand``/``voi`` lower is better, ``ap50``/``ap75`` higher); ``instances`` says
    what the labels channel holds: ``ids`` (instance ids) or ``section_components`` (a mask,
    nonzero inside objects, whose 4-connected components in each section are the instances:
    ISBI 2012, whose cells are not traced across sections).
    """

    kind = "em"
    modality = "em"

    def __init__(
        self,
        name: str,
        splits: Mapping[str, Mapping[str, Any]],
        labels: str = "labels",
        target: Literal["affinity", "bc", "bcd"] = "affinity",
        offsets: Sequence[Sequence[int]] | None = None,
        crop: Sequence[int] = (6, 96, 96),
        voxel_size: Sequence[float] | None = None,
        downsample: int = 1,
        contour_width: int = 1,
        distance_scale: float = 50.0,
        flip_z: bool = True,
        samples_per_epoch: int = 1024,
        ignore_zero: bool = True,
        eval_overlap: float = 0.5,
        tta: str = "none",
        metric: Literal["arand", "voi", "ap50", "ap75"] = "arand",
        instances: Literal["ids", "section_components"] = "ids",
        postprocess: PostprocessConfig | None = None,
    ) -> None:
        if target not in targets.TARGET_KINDS:
            raise ConfigError(f"task.target: must be one of {', '.join(targets.TARGET_KINDS)}, got {target!r}")
        if offsets and target != "affinity":
            raise ConfigError(f"task.offsets: long-range offsets apply to target=affinity only, got target={target}")
        self.offsets = targets.parse_offsets(offsets)
        self.crop = self._ints(crop, "task.crop", 3, 1)
        self.voxel_size = None if voxel_size is None else self._floats(voxel_size, "task.voxel_size")
        if downsample not in (1, 2, 4):
            raise ConfigError(f"task.downsample: must be one of 1, 2, 4, got {downsample}")
        if contour_width < 1:
            raise ConfigError(f"task.contour_width: must be >= 1, got {contour_width}")
        if distance_scale <= 0:
            raise ConfigError(f"task.distance_scale: must be > 0 (nm), got {distance_scale}")
        if samples_per_epoch < 1:
            raise ConfigError(f"task.samples_per_epoch: must be >= 1, got {samples_per_epoch}")
        if not 0.0 <= eval_overlap < 1.0:
            raise ConfigError(f"task.eval_overlap: must lie in [0, 1), got {eval_overlap}")
        if not isinstance(splits, Mapping) or set(splits) != set(SPLITS):
            got = sorted(splits) if isinstance(splits, Mapping) else splits
            raise ConfigError(f"task.splits: need exactly train, val, test; got {got}")
        self.name = name
        self.label_channel = labels
        self.target = target
        self.downsample = int(downsample)
        self.contour_width = int(contour_width)
        self.distance_scale = float(distance_scale)
        self.flip_z = bool(flip_z)
        self.samples_per_epoch = int(samples_per_epoch)
        self.ignore_zero = bool(ignore_zero)
        self.eval_overlap = float(eval_overlap)
        if tta not in TTA_MODES:
            raise ConfigError(f"task.tta: must be one of {', '.join(TTA_MODES)}, got {tta!r}")
        self.tta = tta
        if metric not in METRICS:
            raise ConfigError(f"task.metric: must be one of {', '.join(METRICS)}, got {metric!r}")
        if instances not in INSTANCE_KINDS:
            raise ConfigError(f"task.instances: must be one of {', '.join(INSTANCE_KINDS)}, got {instances!r}")
        self.metric = metric
        self.instances = instances
        if isinstance(postprocess, Mapping):
            try:
                postprocess = PostprocessConfig(**postprocess)
            except TypeError as err:
                raise ConfigError(f"task.postprocess: {err}") from None
        self.postprocess = postprocess or PostprocessConfig()
        self.splits = {k: _parse_split(k, splits[k], labels) for k in SPLITS}
        self.margin = targets.target_margin(target, offsets, self.contour_width)
        self._check_disjoint()
        self.catalog = None

    @staticmethod
    def _ints(value: Sequence[int], key: str, n: int, low: int) -> tuple[int, ...]:
        try:
            out = tuple(int(v) for v in value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected {n} integers, got {value!r}") from None
        if len(out) != n or min(out) < low:
            raise ConfigError(f"{key}: expected {n} integers >= {low}, got {list(value)}")
        return out

    @staticmethod
    def _floats(value: Sequence[float], key: str) -> tuple[float, float, float]:
        try:
            out = tuple(float(v) for v in value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected [z, y, x] numbers, got {value!r}") from None
        if len(out) != 3 or min(out) <= 0:
            raise ConfigError(f"{key}: expected [z, y, x] positive numbers, got {list(value)}")
        return out

    def _check_disjoint(self) -> None:
        names = list(SPLITS)
        for i, a in enumerate(names):
            for b in names[i + 1 :]:
                sa, sb = self.splits[a], self.splits[b]
                if sa.image != sb.image:
                    continue
                if _overlap(sa.z, sb.z) and _overlap(sa.x, sb.x):
                    za = list(sa.z) if sa.z else "all"
                    zb = list(sb.z) if sb.z else "all"
                    raise ConfigError(
                        f"task.splits: {a} z{za}{_x_range(sa)} and {b} z{zb}{_x_range(sb)} overlap in channel "
                        f"{sa.image!r}; "
                        "give them disjoint z (or x) ranges or different channels"
                    )

    # -- the Task contract (mtneuro_lab.data.contract) --------------------------------------------
    def bind(self, catalog: Any) -> EMTask:
        """EM tasks do not use the MTNeuro cube catalog; kept for the common run flow."""
        self.catalog = catalog
        return self

    def check_extent(self, z_extent: tuple[int, int] | None) -> None:
        """Fail before reading data when a split's z range lies outside the source or is too thin."""
        for split, part in self.splits.items():
            if z_extent is not None and part.z is not None and (part.z[0] < z_extent[0] or part.z[1] > z_extent[1]):
                raise ConfigError(
                    f"task.splits.{split}.z: {list(part.z)} lies outside the source's z range {list(z_extent)}"
                )
        train = self.splits["train"].z
        if train is not None and train[1] - train[0] < self.crop[0] + 2 * self.margin[0]:
            raise ConfigError(
                f"task.crop: depth {self.crop[0]} (+{2 * self.margin[0]} slices of target context) "
                f"does not fit the {train[1] - train[0]} training slices z{list(train)}"
            )

    def check_source(self, source: VolumeSource) -> None:
        """Before any read: the source has a box, the split channels exist, z ranges fit."""
        extent = getattr(source, "extent", None)
        if extent is None:
            raise ConfigError(
                f"task={self.name}: {type(source).__name__} has no extent; EM tasks read whole "
                "volumes from source=phantom or source=local"
            )
        available = tuple(getattr(source, "channels", ()))
        for split, part in self.splits.items():
            for field_name in ("image", "labels"):
                channel = getattr(part, field_name)
                if available and channel not in available:
                    raise ConfigError(
                        f"task.splits.{split}.{field_name}: channel {channel!r} is not provided by "
                        f"{type(source).__name__}; available: {', '.join(available)}"
                    )
        self.check_extent(tuple(extent[2]))
        for split, part in self.splits.items():
            x_extent = tuple(extent[0])
            if part.x is not None and (part.x[0] < x_extent[0] or part.x[1] > x_extent[1]):
                raise ConfigError(
                    f"task.splits.{split}.x: {list(part.x)} lies outside the source's x range {list(x_extent)}"
                )
        if self.target == "bcd" and self.voxel_size is None and getattr(source, "voxel_size", None) is None:
            raise ConfigError(
                f"task.voxel_size: {type(source).__name__} does not know its voxel size; set "
                "task.voxel_size=[z,y,x] (nm) for target=bcd"
            )

    @property
    def num_classes(self) -> int:
        """Output channels the network must predict (one per target channel)."""
        return len(self.class_names)

    @property
    def class_names(self) -> list[str]:
        return targets.target_channels(self.target, self.offsets[3:])

    def effective_voxel_size(self, source: VolumeSource | None = None) -> tuple[float, float, float]:
        """Voxel size (nm) after in-plane downsampling; the source's when ``task.voxel_size`` is null."""
        size = self.voxel_size or getattr(source, "voxel_size", None)
        if size is None:
            raise ConfigError("task.voxel_size: unknown for this source; set task.voxel_size=[z,y,x] (nm)")
        z, y, x = (float(v) for v in size)
        return z, y * self.downsample, x * self.downsample

    def sample_shape(self) -> tuple[int, int, int]:
        """The training crop ``(D, H, W)`` (the model's input shape)."""
        return self.crop  # type: ignore[return-value]

    # -- building ----------------------------------------------------------------------------
    def build(self, split: str, source: VolumeSource) -> EMVolume:
        """Read one split's whole volume (uint8 image, int32 ids), downsampled, + BCD distance."""
        part = self.splits[split]
        extent = getattr(source, "extent", None)
        if extent is None:
            raise ConfigError(
                f"task={self.name}: {type(source).__name__} has no extent; EM tasks read whole "
                "volumes from source=phantom or source=local"
            )
        x_all, y, z_all = extent
        z = part.z or tuple(z_all)
        x = part.x or tuple(x_all)
        image = np.array(source.cutout(part.image, x, y, z))  # a private, writable copy
        if image.dtype != np.uint8:
            raise DataError(
                f"task.splits.{split}.image: channel {part.image!r} has dtype {image.dtype}, expected uint8"
            )
        labels = np.array(source.cutout(part.labels, x, y, z))
        if not np.issubdtype(labels.dtype, np.integer) and labels.dtype != np.bool_:
            raise DataError(
                f"task.splits.{split}.labels: channel {part.labels!r} has dtype {labels.dtype}, "
                "expected integer instance ids"
            )
        image = downsample_area(image, self.downsample)
        labels = _as_int32(downsample_nearest(labels, self.downsample), f"{part.labels} ({split})")
        if self.instances == "section_components":
            labels = section_components(labels)
        volume = EMVolume(np.ascontiguousarray(image), labels, tuple(z))
        if self.target == "bcd":
            volume.distance = targets.signed_distance(
                labels, self.effective_voxel_size(source), self.distance_scale, self.contour_width
            )
        if split == "train":
            need = (
                self.crop[0] + 2 * self.margin[0],
                self.crop[1] + 2 * self.margin[1],
                self.crop[2] + 2 * self.margin[1],
            )
            if any(n > s for n, s in zip(need, volume.shape)):
                raise DataError(
                    f"task.crop: {list(self.crop)} plus target context {list(need)} does not fit the "
                    f"training volume {list(volume.shape)} (after downsample {self.downsample})"
                )
        return volume

    # -- prediction -----------------------------------------------------------------------------
    @property
    def channel_offsets(self) -> list[tuple[int, int, int]]:
        """Per output channel, the affinity offset it encodes; ``(0, 0, 0)`` for point-wise channels."""
        if self.target == "affinity":
            return list(self.offsets)
        return [(0, 0, 0)] * self.num_classes

    def activate(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, C, ...)`` -> probabilities (tanh for the BCD distance channel)."""
        return targets.activate(logits, self.target)


def _as_int32(labels: np.ndarray, what: str) -> np.ndarray:
    """int32 ids (torch handles int32 everywhere); ids beyond int32 are renumbered consecutively."""
    if labels.dtype == np.int32:
        return np.ascontiguousarray(labels)
    if labels.size and (labels.min() < 0):
        raise DataError(f"{what}: instance ids must be >= 0, got {labels.min()}")
    if not labels.size or labels.max() < 2**31:
        return np.ascontiguousarray(labels.astype(np.int32))
    ids, inverse = np.unique(labels, return_inverse=True)
    offset = 0 if ids[0] == 0 else 1
    return (inverse.reshape(labels.shape) + offset).astype(np.int32)


def section_components(mask: np.ndarray) -> np.ndarray:
    """int32 ids of the 4-connected nonzero components of each section, unique over the volume."""
    import cc3d

    out = np.zeros(mask.shape, dtype=np.int32)
    offset = 0
    for z in range(mask.shape[0]):
        comp = cc3d.connected_components(np.ascontiguousarray(mask[z] != 0), connectivity=4).astype(np.int32)
        out[z] = np.where(comp > 0, comp + offset, 0)
        offset += int(comp.max())
    return out


def gather_crops(volume: torch.Tensor, origins: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """``volume[z:z+d, y:y+h, x:x+w]`` for every origin ``(B, 3)`` at once (one gather)."""
    d, h, w = (int(s) for s in size)
    dev = volume.device
    zi = (origins[:, 0, None] + torch.arange(d, device=dev)).view(-1, d, 1, 1)
    yi = (origins[:, 1, None] + torch.arange(h, device=dev)).view(-1, 1, h, 1)
    xi = (origins[:, 2, None] + torch.arange(w, device=dev)).view(-1, 1, 1, w)
    return volume[zi, yi, xi]


class EMCropLoader(GlobalBatchLoader):
    """Random training crops of one volume, as whole batches; DDP-aware and resumable.

    An epoch is ``samples_per_epoch`` crops whose origins are drawn from a generator seeded by
    ``(seed, epoch)``; ``batch_size`` is the GLOBAL batch, split over ranks like every loader of
    :mod:`mtneuro_lab.data.distributed` (every rank runs ``samples_per_epoch // batch_size``
    steps, whatever the number of ranks).
    """

    def __init__(
        self,
        tensors: Mapping[str, torch.Tensor],
        size: Sequence[int],
        samples_per_epoch: int,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        epoch_fn: Callable[[], int] | None = None,
    ) -> None:
        super().__init__(samples_per_epoch, batch_size, True, False, rank, world_size, epoch_fn)
        self.tensors = dict(tensors)
        self.size = tuple(int(s) for s in size)
        self.shape = tuple(next(iter(self.tensors.values())).shape)
        self.seed = seed
        self._origins: tuple[int, torch.Tensor] | None = None

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """Crop numbers ``0..samples_per_epoch-1``; their origins are drawn per epoch."""
        if self._origins is None or self._origins[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            highs = [s - c + 1 for s, c in zip(self.shape, self.size)]
            cols = [torch.randint(0, hi, (self.n,), generator=g) for hi in highs]
            self._origins = (epoch, torch.stack(cols, dim=1))
        return torch.arange(self.n)

    def make_batch(self, items: torch.Tensor) -> dict[str, torch.Tensor]:
        assert self._origins is not None
        origins = self._origins[1][items]
        return {k: gather_crops(v, origins, self.size) for k, v in self.tensors.items()}


class EMVolumeLoader:
    """One batch: the whole split volume (every rank evaluates all of it)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self.tensors = dict(tensors)

    def __len__(self) -> int:
        return 1

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        yield {k: v[None] for k, v in self.tensors.items()}


class EMDataModule(VolumeDataModule):
    """Holds each split as one uint8/int32 volume; serves random crops for training, whole volumes
    for evaluation; casts, augments and computes targets on the model's device."""

    # the base class holds a CubeTask; this subclass reuses its loaders with an EMTask
    task: EMTask  # type: ignore[assignment]

    def __init__(self, task: EMTask, source: VolumeSource, catalog: Any = None, **kwargs: Any) -> None:
        super().__init__(task, source, catalog, **kwargs)  # type: ignore[arg-type]
        self.volumes: dict[str, EMVolume] = {}

    def setup(self, stage: str | None = None) -> None:
        needed = {
            "fit": ("train", "val"),
            "validate": ("train", "val"),
            "test": ("train", "test"),
            "predict": ("train", "test"),
        }.get(stage or "fit", SPLITS)
        for split in needed:
            if split not in self.volumes:
                self.volumes[split] = self.task.build(split, self.source)
        if self.normalize == "train_stats":
            self.mean, self.std = self.train_stats(self.volumes["train"].image)
        log.info(
            "%s: %s",
            self.task.name,
            "; ".join(
                f"{k} {'x'.join(map(str, v.shape))} z{list(v.z)}{_x_range(self.task.splits[k])} "
                f"({len(np.unique(v.labels[:: max(1, v.shape[0] // 8)]))} ids in sampled slices)"
                for k, v in self.volumes.items()
            ),
        )

    def _tensors(self, volume: EMVolume) -> dict[str, torch.Tensor]:
        out = {"image": torch.from_numpy(volume.image), "labels": torch.from_numpy(volume.labels)}
        if volume.distance is not None:
            out["distance"] = torch.from_numpy(volume.distance)
        return out

    def _loader(self, split: str, train: bool) -> EMCropLoader | EMVolumeLoader:  # type: ignore[override]
        if split not in self.volumes:
            self.setup({"train": "fit", "val": "fit", "test": "test"}[split])
        tensors = self._tensors(self.volumes[split])
        if not train:
            tensors["instances"] = tensors.pop("labels")
            return EMVolumeLoader(tensors)
        rank, world = self._world()
        if self.task.samples_per_epoch < self.batch_size:
            raise ConfigError(
                f"data.batch_size: {self.batch_size} is larger than task.samples_per_epoch "
                f"({self.task.samples_per_epoch})"
            )
        batch = self.check_world(split, self.task.samples_per_epoch, train)
        mz, m = self.task.margin
        d, h, w = self.task.crop
        loader = EMCropLoader(
            tensors,
            (d + 2 * mz, h + 2 * m, w + 2 * m),
            self.task.samples_per_epoch,
            batch,
            seed=self.seed,
            rank=rank,
            world_size=world,
            epoch_fn=self._current_epoch,
        )
        return self.register_loader(split, loader)

    def on_after_batch_transfer(self, batch: dict[str, torch.Tensor], dataloader_idx: int) -> dict[str, Any]:
        """uint8/int32 on device -> the batch contract of the module docstring."""
        task = self.task
        image = augment.to_float(batch["image"], self.mean, self.std)
        distance = batch.get("distance")
        if "labels" in batch:  # a training crop, with target context on every side
            labels, margin = batch["labels"].unsqueeze(1), task.margin
            trainer = getattr(self, "trainer", None)
            if trainer is not None and trainer.training:
                self.seed_training_batch()
                spatial = [image, labels] + ([distance.unsqueeze(1)] if distance is not None else [])
                if task.flip_z:
                    spatial = augment.random_flip(spatial, -3)
                spatial = augment.geometric(spatial, self.augment_cfg)
                image = augment.intensity_jitter(spatial[0], self.augment_cfg.intensity_jitter)
                labels = spatial[1]
                distance = spatial[2].squeeze(1) if distance is not None else None
            labels = labels.squeeze(1)
        else:  # a whole volume: targets at its border are masked instead
            labels, margin = batch["instances"], (0, 0)
        labels = labels.long()
        target, mask = targets.compute_targets(
            task.target, labels, task.offsets[3:], margin, task.contour_width, distance
        )
        mz, m = margin
        z, y, x = labels.shape[-3:]
        return {
            "image": image[..., mz : z - mz, m : y - m, m : x - m],
            "target": target,
            "mask": mask,
            "instances": labels[..., mz : z - mz, m : y - m, m : x - m],
        }

    def sample_shape(self) -> tuple[int, ...]:
        return self.task.sample_shape()
