"""LightningDataModule over in-memory uint8 splits.

Each split is built once by the task from the source (see :mod:`mtneuro_lab.data.tasks`) and
kept as uint8 tensors. Loaders hand out whole batches by indexing those tensors (one gather
per batch, no per-item ``__getitem__``); casting, normalisation and augmentation run per batch
on the model's device in :meth:`VolumeDataModule.on_after_batch_transfer`.

``batch_size`` is the **global** batch size: with DDP every rank gets ``batch_size //
world_size`` samples per step, so changing the number of GPUs does not change the
optimisation. ``eval_batch_size`` (default: ``batch_size``) is global too.
"""
from __future__ import annotations

import logging
from typing import Any, Iterator, Mapping

import numpy as np
import pytorch_lightning as pl
import torch

from mtneuro_lab.data import augment
from mtneuro_lab.data.augment import AugmentConfig
from mtneuro_lab.data.cubes import CubeCatalog
from mtneuro_lab.data.sources.base import VolumeSource
from mtneuro_lab.data.tasks import CubeTask, SplitArrays, describe_counts
from mtneuro_lab.errors import ConfigError

log = logging.getLogger(__name__)


class ArrayBatchLoader:
    """Iterates over batches of an in-memory split; DDP-aware, resumable mid-epoch.

    Shuffling uses a generator seeded by ``(seed, epoch)`` so the order does not depend on
    how many batches were drawn before, which makes resumption exact.
    """

    def __init__(self, tensors: Mapping[str, torch.Tensor], batch_size: int, shuffle: bool,
                 drop_last: bool, seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        self.tensors = dict(tensors)
        self.n = len(next(iter(self.tensors.values())))
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self._position = 0  # batches already yielded in the current epoch
        self._resume_from = 0

    def _indices(self) -> torch.Tensor:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.n, generator=g)
        else:
            order = torch.arange(self.n)
        return order[self.rank :: self.world_size]

    def __len__(self) -> int:
        per_rank = len(range(self.rank, self.n, self.world_size))
        if self.drop_last:
            return per_rank // self.batch_size
        return -(-per_rank // self.batch_size)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        order = self._indices()
        start = self._resume_from
        self._resume_from = 0
        for b in range(start, len(self)):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            self._position = b + 1
            yield {k: v[idx] for k, v in self.tensors.items()}
        self._position = 0
        if self.shuffle:
            self.epoch += 1

    # Lightning calls these for stateful dataloaders: exact mid-epoch resumption.
    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self._position}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.epoch = int(state["epoch"])
        self._resume_from = int(state["position"])


class VolumeDataModule(pl.LightningDataModule):
    """Builds a task's splits from a source once and serves them as device-side batches."""

    def __init__(self, task: CubeTask, source: VolumeSource, catalog: CubeCatalog, batch_size: int = 64,
                 eval_batch_size: int | None = None, augment_cfg: AugmentConfig | None = None,
                 normalize: str = "train_stats", seed: int = 0, drop_last: bool = True) -> None:
        super().__init__()
        if batch_size < 1:
            raise ConfigError(f"data.batch_size: must be >= 1, got {batch_size}")
        if normalize not in ("train_stats", "fixed"):
            raise ConfigError(f"data.normalize: must be 'train_stats' or 'fixed', got {normalize!r}")
        self.task = task.bind(catalog) if task.catalog is None else task
        self.source = source
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.augment_cfg = augment_cfg or AugmentConfig()
        self.normalize = normalize
        self.seed = seed
        self.drop_last = drop_last
        self.arrays: dict[str, SplitArrays] = {}
        self.mean, self.std = 0.5, 0.25
        self._loaders: dict[str, ArrayBatchLoader] = {}

    # -- building ---------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        needed = {"fit": ("train", "val"), "validate": ("train", "val"), "test": ("train", "test"),
                  "predict": ("train", "test")}.get(stage or "fit", ("train", "val", "test"))
        for split in needed:
            if split not in self.arrays:
                self.arrays[split] = self.task.build(split, self.source)
        if self.normalize == "train_stats":
            self.mean, self.std = self._train_stats(self.arrays["train"].images)
        log.info(describe_counts(self.task, self.arrays))

    @staticmethod
    def _train_stats(images: np.ndarray) -> tuple[float, float]:
        sample = images[:: max(1, len(images) // 256)].astype(np.float32) / 255.0
        return float(sample.mean()), float(max(sample.std(), 1e-3))

    def _world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0, 1
        return trainer.global_rank, trainer.world_size

    def per_rank_batch(self, global_batch: int) -> int:
        rank, world = self._world()
        if global_batch % world:
            raise ConfigError(
                f"data.batch_size: global batch {global_batch} is not divisible by the "
                f"{world} DDP processes"
            )
        return global_batch // world

    def _loader(self, split: str, train: bool) -> ArrayBatchLoader:
        if split not in self.arrays:
            self.setup({"train": "fit", "val": "fit", "test": "test"}[split])
        arr = self.arrays[split]
        rank, world = self._world()
        batch = self.per_rank_batch(self.batch_size if train else self.eval_batch_size)
        tensors = {
            "image": torch.from_numpy(arr.images),
            "target": torch.from_numpy(arr.targets),
            "region": torch.from_numpy(arr.regions),
            "index": torch.arange(len(arr)),
        }
        if train and len(arr) // world < batch and self.drop_last:
            raise ConfigError(
                f"data.batch_size: {self.batch_size} is larger than the {len(arr)} training samples"
            )
        loader = ArrayBatchLoader(tensors, batch, shuffle=train, drop_last=train and self.drop_last,
                                  seed=self.seed, rank=rank, world_size=world)
        self._loaders[split] = loader
        return loader

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
        batch = dict(batch)
        batch["image"] = augment.to_float(batch["image"], self.mean, self.std)
        trainer = getattr(self, "trainer", None)
        if trainer is not None and trainer.training:
            spatial = [batch["image"]]
            mask_target = batch["target"].ndim > 1
            if mask_target:
                spatial.append(batch["target"].unsqueeze(1))
            spatial = augment.geometric(spatial, self.augment_cfg)
            batch["image"] = augment.intensity_jitter(spatial[0], self.augment_cfg.intensity_jitter)
            if mask_target:
                batch["target"] = spatial[1].squeeze(1)
        if batch["target"].ndim > 1:
            batch["target"] = batch["target"].long()
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

    def state_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "std": self.std}

    def load_state_dict(self, state: Mapping[str, float]) -> None:
        self.mean, self.std = float(state["mean"]), float(state["std"])
