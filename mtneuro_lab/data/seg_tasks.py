"""Task 2: microstructure segmentation splits, 2D slices or 3D stacks of ``volume_z`` slices.

Targets are uint8 class masks derived from a label channel (BossDB's ``pixel_labels``:
0 background, 1 blood vessel, 2 cell, 3 myelinated axon) through ``class_map`` (label value ->
class index). The paper's 3-class task merges axon into background (``{0: 0, 1: 1, 2: 2, 3: 0}``,
classes ``bg_axon, vessel, cell``); the 4-class task keeps all four and leaves ZI out.

3D samples are stacks of ``volume_z`` consecutive slices that lie entirely inside one cube's
split range (a stack never crosses a region or a split boundary). Validation and test stacks
never overlap, so every voxel is counted once by the pooled metrics; slices left over at the
end of a range (``len % volume_z``) are not used. Training stacks may overlap
(``train_z_stride < volume_z``) for more samples.

Images are downsampled in-plane by area averaging, label masks by nearest sampling.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np

from mtneuro_lab.data.cubes import Cube, CubeCatalog
from mtneuro_lab.data.sources.base import VolumeSource
from mtneuro_lab.data.tasks import SPLITS, CubeTask, SplitArrays, downsample_area, downsample_nearest
from mtneuro_lab.errors import ConfigError, DataError


class SegmentationTask(CubeTask):
    """Pixel (2D, ``dims=2``) or voxel (3D, ``dims=3``) classification of a label channel."""

    kind = "segmentation"

    def __init__(
        self,
        name: str,
        splits: Mapping[str, Sequence[Mapping[str, Any]]],
        class_names: list[str],
        class_map: dict[int, int],
        downsample: int = 2,
        regions: Sequence[str] | None = None,
        test_buffer: int = 10,
        dims: Literal[2, 3] = 2,
        volume_z: int = 8,
        train_z_stride: int | None = None,
        label_channel: str = "pixel_labels",
        modality: Literal["xray", "em"] = "xray",
        guard_px: int = 0,
    ) -> None:
        super().__init__(name, splits, downsample, regions, test_buffer, guard_px)
        if dims not in (2, 3):
            raise ConfigError(f"task.dims: must be 2 or 3, got {dims}")
        if volume_z < 1:
            raise ConfigError(f"task.volume_z: must be >= 1, got {volume_z}")
        if train_z_stride is not None and train_z_stride < 1:
            raise ConfigError(f"task.train_z_stride: must be >= 1 or null, got {train_z_stride}")
        self._class_names = [str(c) for c in class_names]
        if len(self._class_names) < 2 or len(set(self._class_names)) != len(self._class_names):
            raise ConfigError(f"task.class_names: need >= 2 distinct names, got {self._class_names}")
        self.class_map = self._check_class_map(class_map, len(self._class_names))
        self.dims = int(dims)
        self.volume_z = int(volume_z) if dims == 3 else 1
        self.train_z_stride = int(train_z_stride) if train_z_stride is not None else self.volume_z
        self.label_channel = label_channel
        self.modality = modality
        self._lut = np.zeros(256, dtype=np.uint8)
        self._known = np.zeros(256, dtype=bool)
        for value, cls in self.class_map.items():
            self._lut[value] = cls
            self._known[value] = True

    @staticmethod
    def _check_class_map(class_map: Mapping[Any, Any], n: int) -> dict[int, int]:
        try:
            mapping = {int(k): int(v) for k, v in dict(class_map).items()}
        except (TypeError, ValueError):
            raise ConfigError(f"task.class_map: expected {{label value: class index}}, got {class_map!r}") from None
        bad = {k: v for k, v in mapping.items() if not 0 <= k <= 255 or not 0 <= v < n}
        if bad:
            raise ConfigError(
                f"task.class_map: label values must be in 0..255 and class indices in "
                f"0..{n - 1} (one per task.class_names), got {bad}"
            )
        missing = sorted(set(range(n)) - set(mapping.values()))
        if missing:
            raise ConfigError(f"task.class_map: class indices {missing} get no label value")
        return mapping

    # -- facts --------------------------------------------------------------------------------
    @property
    def class_names(self) -> list[str]:
        return list(self._class_names)

    @property
    def num_classes(self) -> int:
        return len(self._class_names)

    def sample_shape(self) -> tuple[int, ...]:
        plane = super().sample_shape()
        return plane if self.dims == 2 else (self.volume_z, *plane)

    def bind(self, catalog: CubeCatalog) -> SegmentationTask:
        """As :meth:`CubeTask.bind`, plus: one in-plane shape, and every range holds a stack."""
        super().bind(catalog)
        shapes = {(c.y[1] - c.y[0], c.x[1] - c.x[0]) for s in SPLITS for c, _ in self._slabs(s)}
        if len(shapes) > 1:
            raise ConfigError(f"task.splits: all windows must share one in-plane shape, got {sorted(shapes)}")
        for split in SPLITS:
            for cube, z in self._slabs(split):
                if z[1] - z[0] < self.volume_z:
                    raise ConfigError(
                        f"task.volume_z: {self.volume_z} slices do not fit in {split} z{list(z)} of {cube.key}"
                    )
        return self

    # -- building -----------------------------------------------------------------------------
    def stack_starts(self, split: str, z: tuple[int, int]) -> np.ndarray:
        """First slice of each sample within ``z``: every slice (2D) or whole stacks (3D)."""
        stride = self.train_z_stride if split == "train" else self.volume_z
        return np.arange(z[0], z[1] - self.volume_z + 1, stride)

    def to_classes(self, labels: np.ndarray, where: str) -> np.ndarray:
        """Label values -> uint8 class indices via ``class_map``; unmapped values are a DataError."""
        labels = np.asarray(labels)
        if labels.size and (labels.min() < 0 or labels.max() > 255):
            raise DataError(
                f"{where}: label values {int(labels.min())}..{int(labels.max())} outside task.class_map's 0..255"
            )
        values = labels.astype(np.uint8, copy=False)
        known = self._known[values]
        if not known.all():
            unmapped = sorted(set(np.unique(labels[~known]).tolist()))
            raise DataError(
                f"{where}: label values {unmapped} are not in task.class_map (maps {sorted(self.class_map)})"
            )
        return self._lut[values]

    def build(self, split: str, source: VolumeSource) -> SplitArrays:
        assert self.catalog is not None, "call bind() first"
        slabs = self._slabs(split)
        starts = [self.stack_starts(split, z) for _, z in slabs]
        n = sum(len(s) for s in starts)
        shape = self.sample_shape() if self.dims == 3 else (1, *self.sample_shape())
        images = np.empty((n, *shape), dtype=np.uint8)
        targets = np.empty((n, *shape), dtype=np.uint8)
        regions = np.empty(n, dtype=np.int64)
        zs = np.empty(n, dtype=np.int64)
        cube_index = np.empty(n, dtype=np.int64)
        row = 0
        for ci, ((cube, z), first) in enumerate(zip(slabs, starts)):
            image, classes = self._read(source, cube, z)
            for s in first:
                images[row] = image[s - z[0] : s - z[0] + self.volume_z]
                targets[row] = classes[s - z[0] : s - z[0] + self.volume_z]
                row += 1
            count = len(first)
            regions[row - count : row] = self.catalog.region_index(cube.region)
            zs[row - count : row] = first
            cube_index[row - count : row] = ci
        if self.dims == 2:
            images, targets = images[:, 0], targets[:, 0]
        return SplitArrays(images, targets, regions, zs, [c.key for c, _ in slabs], cube_index)

    def _read(self, source: VolumeSource, cube: Cube, z: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        image = downsample_area(np.asarray(source.cutout("image", cube.x, cube.y, z)), self.downsample)
        labels = source.cutout(self.label_channel, cube.x, cube.y, z)
        classes = self.to_classes(
            downsample_nearest(np.asarray(labels), self.downsample), f"{self.label_channel} of {cube.key} z{list(z)}"
        )
        return image, classes
