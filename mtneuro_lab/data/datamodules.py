"""LightningDataModule over in-memory uint8 splits.

Each split is built once by the task from the source (see :mod:`mtneuro_lab.data.tasks`) and
kept as uint8 tensors. Loaders hand out whole batches by indexing those tensors (one gather
per batch, no per-item ``__getitem__``); casting, normalisation and augmentation run per batch
on the model's device in :meth:`VolumeDataModule.on_after_batch_transfer`.

``batch_size`` is the **global** batch size: with DDP every rank gets ``batch_size //
world_size`` samples of each global batch, so changing the number of GPUs does not change the
optimisation; ``eval_batch_size`` (default: ``batch_size``) is global too. How global batches
are split over ranks, and how each training batch gets its own random stream (seeded from
``(seed, rank, epoch, batch)`` before it is augmented), is in :mod:`mtneuro_lab.data.distributed`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch

from mtneuro_lab.data import augment
from mtneuro_lab.data.augment import AugmentConfig
from mtneuro_lab.data.cubes import CubeCatalog
from mtneuro_lab.data.distributed import GlobalBatchLoader, seed_streams
from mtneuro_lab.data.sources.base import VolumeSource
from mtneuro_lab.data.tasks import CubeTask, SplitArrays, describe_counts
from mtneuro_lab.errors import ConfigError

log = logging.getLogger(__name__)


class ArrayBatchLoader(GlobalBatchLoader):
    """Batches of an in-memory split: global batches split over DDP ranks
    (:class:`~mtneuro_lab.data.distributed.GlobalBatchLoader`), resumable mid-epoch.

    The order of epoch ``e`` is a permutation seeded by ``(seed, e)`` (training) or the split's
    own order (evaluation); ``batch_size`` is the GLOBAL batch. Training pads a last partial
    batch by wrapping (``drop_last=False``); evaluation never pads, so every sample is scored
    exactly once over all ranks.
    """

    def __init__(
        self,
        tensors: Mapping[str, torch.Tensor],
        batch_size: int,
        shuffle: bool,
        drop_last: bool,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        epoch_fn: Callable[[], int] | None = None,
    ) -> None:
        self.tensors = dict(tensors)
        n = len(next(iter(self.tensors.values())))
        super().__init__(n, batch_size, drop_last, pad=shuffle, rank=rank, world_size=world_size, epoch_fn=epoch_fn)
        self.shuffle = shuffle
        self.seed = seed

    def epoch_order(self, epoch: int) -> torch.Tensor:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(self.n, generator=g)
        else:
            order = torch.arange(self.n)
        return order.to(next(iter(self.tensors.values())).device)  # perf.data_on_device

    def make_batch(self, items: torch.Tensor) -> dict[str, torch.Tensor]:
        # index_select, not v[idx]: ~10x faster for uint8 tiles (one contiguous row copy each)
        return {k: v.index_select(0, items) for k, v in self.tensors.items()}


def augment_training_batch(
    batch: dict[str, torch.Tensor],
    cfg: AugmentConfig,
    mean: float,
    std: float,
    workspace: augment.Workspace | None = None,
) -> dict[str, torch.Tensor]:
    """A training batch of uint8 tiles ``(B, [D,] H, W)`` (and masks of that shape) -> float
    ``(B, 1, [D,] H, W)`` with per-tile random flips and rot90, cast and normalised, then the
    optional intensity jitter.

    On a CPU the batch comes back grouped by transform (:func:`augment.dihedral_to_float_grouped`,
    the cheapest there) and every per-sample tensor of the batch (labels, regions, sample ids)
    is permuted alike; on other devices one sync-free fused gather keeps the order
    (:func:`augment.gather_crop_augment`). Order within a shuffled batch carries no meaning.
    """
    images = batch["image"].contiguous()
    masks = [batch["target"].contiguous()] if batch["target"].ndim > 1 else []
    size = images.shape[0]
    if images.device.type == "cpu":
        image, masks, order = augment.dihedral_to_float_grouped(images, cfg, mean, std, aligned=masks)
        done = {"image", "target"} if masks else {"image"}  # already in the grouped order
        out = {
            k: v.index_select(0, order.to(v.device))
            if k not in done and isinstance(v, torch.Tensor) and v.ndim and v.shape[0] == size
            else v
            for k, v in batch.items()
        }
    else:
        samples = torch.arange(size, device=images.device)
        image, masks = augment.gather_crop_augment(
            images, samples, (images.shape[-2], images.shape[-1]), cfg, mean, std, aligned=masks, workspace=workspace
        )
        out = dict(batch)
    out["image"] = augment.intensity_jitter(image, cfg.intensity_jitter)
    if masks:
        out["target"] = masks[0]
    return out


class VolumeDataModule(pl.LightningDataModule):
    """Builds a task's splits from a source once and serves them as device-side batches."""

    def __init__(
        self,
        task: CubeTask,
        source: VolumeSource,
        catalog: CubeCatalog,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        augment_cfg: AugmentConfig | None = None,
        normalize: str = "train_stats",
        seed: int = 0,
        drop_last: bool = True,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ConfigError(f"data.batch_size: must be >= 1, got {batch_size}")
        if normalize not in ("train_stats", "fixed"):
            raise ConfigError(f"data.normalize: must be 'train_stats' or 'fixed', got {normalize!r}")
        self.task = task.bind(catalog) if task.catalog is None else task
        self.source = source
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self._eval_key = "data.eval_batch_size" if eval_batch_size else "data.batch_size"  # for messages
        self.augment_cfg = augment_cfg or AugmentConfig()
        self.normalize = normalize
        self.seed = seed
        self.drop_last = drop_last
        self.arrays: dict[str, SplitArrays] = {}
        self.mean, self.std = 0.5, 0.25
        self._loaders: dict[str, ArrayBatchLoader] = {}
        # perf.channels_last / perf.data_on_device, set by mtneuro_lab.perf.apply
        self.channels_last = False
        self.data_on_device = False
        self._device_tensors: dict[str, dict[str, torch.Tensor]] = {}
        self._workspace = augment.Workspace()  # the training gather's index, reused per batch
        self._pending_train_state: Mapping[str, Any] | None = None  # a checkpoint's loader position

    # -- building ---------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        needed = {
            "fit": ("train", "val"),
            "validate": ("train", "val"),
            "test": ("train", "test"),
            "predict": ("train", "test"),
        }.get(stage or "fit", ("train", "val", "test"))
        for split in needed:
            if split not in self.arrays:
                self.arrays[split] = self.task.build(split, self.source)
        if self.normalize == "train_stats":
            self.mean, self.std = self.train_stats(self.arrays["train"].images)
        log.info(describe_counts(self.task, self.arrays))

    @staticmethod
    def train_stats(images: np.ndarray) -> tuple[float, float]:
        """Mean/std of ~256 evenly spaced training samples, accumulated in chunks of 16 so no
        float copy of the sample is ever held (the split itself stays the only big array)."""
        sample = images[:: max(1, len(images) // 256)]
        total = total_sq = 0.0
        for s in range(0, len(sample), 16):
            block = sample[s : s + 16].astype(np.float64) / 255.0
            total += float(block.sum())
            total_sq += float(np.square(block).sum())
        count = sample.size
        mean = total / count
        std = max(total_sq / count - mean * mean, 0.0) ** 0.5
        return float(mean), float(max(std, 1e-3))

    def _world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0, 1
        return trainer.global_rank, trainer.world_size

    def check_world(self, split: str, samples: int, train: bool) -> int:
        """The global batch of ``split``, checked against the DDP world: it must divide by the
        number of processes, and every rank needs at least one batch (else a collective waits)."""
        _, world = self._world()
        key = "data.batch_size" if train else self._eval_key
        batch = self.batch_size if train else self.eval_batch_size
        if batch % world:
            raise ConfigError(f"{key}: global batch {batch} is not divisible by the {world} DDP processes")
        if train and self.drop_last and samples < batch:
            raise ConfigError(f"data.batch_size: {batch} is larger than the {samples} training samples")
        if samples < world:
            raise ConfigError(f"task: the {split} split has {samples} samples, fewer than the {world} DDP processes")
        return batch

    def _loader(self, split: str, train: bool) -> ArrayBatchLoader:
        if split not in self.arrays:
            self.setup({"train": "fit", "val": "fit", "test": "test"}[split])
        arr = self.arrays[split]
        rank, world = self._world()
        batch = self.check_world(split, len(arr), train)
        tensors = {
            "image": torch.from_numpy(arr.images),
            "target": torch.from_numpy(arr.targets),
            "region": torch.from_numpy(arr.regions),
            "index": torch.arange(len(arr)),
        }
        if self.data_on_device:
            tensors = self._on_device(split, tensors)
        loader = ArrayBatchLoader(
            tensors,
            batch,
            shuffle=train,
            drop_last=train and self.drop_last,
            seed=self.seed,
            rank=rank,
            world_size=world,
            epoch_fn=self._current_epoch,
        )
        return self.register_loader(split, loader)

    def register_loader(self, split: str, loader: Any) -> Any:
        """Keep ``loader`` as the split's current loader; a training loader first gets the
        position a resumed checkpoint saved (:meth:`load_state_dict`)."""
        if split == "train" and self._pending_train_state:
            loader.load_state_dict(self._pending_train_state)
            self._pending_train_state = None
        self._loaders[split] = loader
        return loader

    def _on_device(self, split: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The split copied once to the trainer's device (perf.data_on_device): batches are then
        gathered there, with no host-to-device copy per step."""
        trainer = getattr(self, "trainer", None)
        device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
        cached = self._device_tensors.get(split)
        if cached is None or next(iter(cached.values())).device != device:
            cached = {k: v.to(device) for k, v in tensors.items()}
            self._device_tensors[split] = cached
        return cached

    def seed_training_batch(self) -> None:
        """A training batch reached the model: count it (resume position) and reseed the random
        streams from ``(seed, rank, epoch, batch)`` before anything random touches it."""
        loader = self._loaders.get("train")
        if loader is None:
            return
        epoch, index = loader.mark_consumed()
        seed_streams(self.seed, self._world()[0], epoch, index)

    def _current_epoch(self) -> int:
        trainer = getattr(self, "trainer", None)
        return int(getattr(trainer, "current_epoch", 0)) if trainer is not None else 0

    def train_dataloader(self) -> ArrayBatchLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> ArrayBatchLoader:
        return self._loader("val", train=False)

    def test_dataloader(self) -> ArrayBatchLoader:
        return self._loader("test", train=False)

    def predict_dataloader(self) -> ArrayBatchLoader:
        return self._loader("test", train=False)

    # -- device-side processing -----------------------------------------------------------
    def on_after_batch_transfer(self, batch: dict[str, torch.Tensor], dataloader_idx: int) -> dict[str, Any]:
        """uint8 tiles on the model's device -> normalised float; in training, flips and rot90
        of every tile (and of its mask) happen inside the same single gather as the cast."""
        batch = dict(batch)
        trainer = getattr(self, "trainer", None)
        if trainer is not None and trainer.training:
            self.seed_training_batch()
            batch = augment_training_batch(batch, self.augment_cfg, self.mean, self.std, self._workspace)
        else:
            batch["image"] = augment.to_float(batch["image"], self.mean, self.std)
        if batch["target"].ndim > 1:
            batch["target"] = batch["target"].long()
        if self.channels_last and batch["image"].ndim in (4, 5):  # perf.channels_last
            fmt = torch.channels_last if batch["image"].ndim == 4 else torch.channels_last_3d
            batch["image"] = batch["image"].contiguous(memory_format=fmt)
        if trainer is not None:  # Lightning converts inputs before this hook made them float
            batch = trainer.precision_plugin.convert_input(batch)  # trainer.precision=64-true: float64
        return batch

    # -- facts the methods need -------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return self.task.num_classes

    @property
    def class_names(self) -> list[str]:
        return self.task.class_names

    def sample_shape(self) -> tuple[int, ...]:
        """Spatial shape of one sample without building any split (from the task's geometry)."""
        return self.task.sample_shape()

    def state_dict(self) -> dict[str, Any]:
        """Saved in every checkpoint: normalisation and the training loader's position.

        The loader position travels here rather than through Lightning's stateful-dataloader
        path because that path loads states only when the train dataloader is created after
        the checkpoint's loop state is restored, and ``trainer.estimated_stepping_batches``
        (used by every LR schedule) creates it earlier. Datamodule state is restored first.
        """
        state: dict[str, Any] = {"mean": self.mean, "std": self.std}
        if "train" in self._loaders:
            state["train_loader"] = self._loaders["train"].state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.mean, self.std = float(state["mean"]), float(state["std"])
        self._pending_train_state = state.get("train_loader")
