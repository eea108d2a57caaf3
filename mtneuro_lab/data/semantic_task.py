"""Task 3 (``task=semantic``): all annotated slices, their images and their semantic features.

Task 3 is an in-sample read-out (plus cross-validation), not a train/test task, so the
``samples`` slices (default: all 360 annotated slices z [110, 470) of cube set A, every region)
serve as both ``val`` and ``test``, and the split-overlap check of Task 1 does not apply. The
``train`` split is ``fit_samples`` (default: ROI-C1's training slices z [110, 380) of set A):
the slices a decomposition (PCA/NMF) is fitted on when no checkpoint is given, and whose
statistics normalise images when the checkpoint does not carry them.

``build(split)`` returns images downsampled like Task 1 (``downsample: null`` = the encoder's
own Task 1 resolution) with region indices as targets, so every loader of the project works
on it unchanged. The features come from :meth:`SemanticFeatureTask.features`: computed from
FULL-resolution ``pixel_labels``, one 3D connected-component pass per region cube (see
:mod:`mtneuro_lab.data.features`), rows ordered like ``build("test")`` (tile ``i`` owns rows
``i * tiles_per_image`` ... ``+ tiles_per_image - 1``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np

from mtneuro_lab.data.cubes import CubeCatalog
from mtneuro_lab.data.features import (
    BOSSDB,
    Centroid,
    Connectivity,
    FeatureTable,
    cube_features,
)
from mtneuro_lab.data.sources.base import VolumeSource
from mtneuro_lab.data.tasks import RegionClassificationTask
from mtneuro_lab.errors import ConfigError, DataError

log = logging.getLogger(__name__)

SampleUnit = Literal["quadrants", "tile"]
CvMode = Literal["shuffled", "blocked"]

_ALL_A = ({"set": "A", "z": [110, 470]},)

#: slices left out of training on each side of a held-out z block: a cell body spans about ten
#: slices (phantom cells <= 11.4 voxels across; real somata ~12 um at 1.17 um), so no cell lies
#: on both sides
DEFAULT_CV_GAP = 12
_ROI_C1_TRAIN = ({"set": "A", "z": [110, 380]},)


def blocked_folds(z: np.ndarray, folds: int, gap: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(train, held_out)`` row indices of contiguous z-block folds.

    The distinct slices are cut into ``folds`` runs of near-equal length (at most one slice
    apart), so every fold holds whole slices: all quadrants and all regions/cubes of a slice
    sit on the same side. Training rows within ``gap`` slices of the held-out block are dropped,
    so neighbouring slices of one cube (which share cells, vessels and fibres) are never on both
    sides.
    """
    z = np.asarray(z)
    out = []
    for block in np.array_split(np.unique(z), folds):
        lo, hi = int(block[0]), int(block[-1])
        held = (z >= lo) & (z <= hi)
        train = (z < lo - gap) | (z > hi + gap)
        out.append((np.flatnonzero(train), np.flatnonzero(held)))
    return out


def check_blocked_folds(slices: np.ndarray, folds: int, gap: int) -> None:
    """One line if blocked folds of these slices cannot train: too few slices, or a gap that eats them."""
    slices = np.unique(slices)
    n = len(slices)
    if n < folds:
        raise ConfigError(f"task.folds: {folds} z-block folds need at least {folds} slices, samples have {n}")
    for k, (train, held) in enumerate(blocked_folds(slices, folds, gap), 1):
        if len(train) < len(held):
            raise ConfigError(
                f"task.cv_gap: {gap} slices on each side of held-out block {k} of {folds} leave "
                f"{len(train)} training slices for {len(held)} held out ({n} slices in all); "
                f"lower task.cv_gap or task.folds"
            )


class SemanticFeatureTask(RegionClassificationTask):
    """Semantic-feature read-out task (MTNeuro Task 3).

    ``sample_unit``: ``quadrants`` (the paper: four 128x128 sub-tiles per 256x256 slice) or
    ``tile``. ``folds``/``cv``: k-fold cross-validation of the read-out, ``blocked`` (default:
    contiguous z blocks with ``cv_gap`` slices left out of training on each side, see
    :func:`blocked_folds`) or ``shuffled`` KFold (rows of the same and neighbouring slices fall
    in different folds: near-duplicates on both sides, R^2 overstated). ``alpha``: 0 = ordinary
    least squares (the paper), > 0 = ridge penalty
    (on standardised embeddings), for when samples are few next to the embedding size.
    ``umap``: also draw UMAPs of the embeddings.
    """

    kind = "semantic"

    def __init__(
        self,
        name: str = "semantic",
        samples: Sequence[Mapping[str, Any]] = _ALL_A,
        fit_samples: Sequence[Mapping[str, Any]] = _ROI_C1_TRAIN,
        downsample: int | None = None,
        regions: Sequence[str] | None = None,
        sample_unit: SampleUnit = "quadrants",
        connectivity: Connectivity = 6,
        centroid: Centroid = "2d",
        folds: int = 5,
        cv: CvMode = "blocked",
        cv_gap: int = DEFAULT_CV_GAP,
        alpha: float = 0.0,
        umap: bool = True,
        umap_neighbors: int = 15,
        embed_batch_size: int = 256,
    ) -> None:
        if downsample is not None and downsample not in (1, 2, 4):
            raise ConfigError(f"task.downsample: must be one of 1, 2, 4 or null, got {downsample}")
        splits = {"train": list(fit_samples), "val": list(samples), "test": list(samples)}
        super().__init__(name, splits, downsample or 2, regions, test_buffer=0, label_mode="cube")
        if sample_unit not in ("quadrants", "tile"):
            raise ConfigError(f"task.sample_unit: must be quadrants or tile, got {sample_unit!r}")
        if connectivity not in (6, 18, 26):
            raise ConfigError(f"task.connectivity: must be one of 6, 18, 26, got {connectivity}")
        if centroid not in ("2d", "3d"):
            raise ConfigError(f"task.centroid: must be 2d or 3d, got {centroid!r}")
        if folds < 2:
            raise ConfigError(f"task.folds: must be >= 2, got {folds}")
        if cv not in ("shuffled", "blocked"):
            raise ConfigError(f"task.cv: must be shuffled or blocked, got {cv!r}")
        if cv_gap < 0:
            raise ConfigError(f"task.cv_gap: must be >= 0 slices, got {cv_gap}")
        if alpha < 0:
            raise ConfigError(f"task.alpha: must be >= 0 (0 = ordinary least squares), got {alpha}")
        if umap_neighbors < 2:
            raise ConfigError(f"task.umap_neighbors: must be >= 2, got {umap_neighbors}")
        if embed_batch_size < 1:
            raise ConfigError(f"task.embed_batch_size: must be >= 1, got {embed_batch_size}")
        self.downsample_from_encoder = downsample is None
        self.sample_unit = sample_unit
        self.grid = 2 if sample_unit == "quadrants" else 1
        self.connectivity = connectivity
        self.centroid = centroid
        self.folds = int(folds)
        self.cv = cv
        self.cv_gap = int(cv_gap)
        self.alpha = float(alpha)
        self.umap = bool(umap)
        self.umap_neighbors = int(umap_neighbors)
        self.embed_batch_size = int(embed_batch_size)
        self._features: FeatureTable | None = None

    @property
    def tiles_per_image(self) -> int:
        return self.grid * self.grid

    def use_downsample(self, factor: int) -> None:
        """Adopt the encoder's Task 1 downsampling (only when the config left it null)."""
        if self.downsample_from_encoder:
            if factor not in (1, 2, 4):
                raise ConfigError(f"task.downsample: the checkpoint's downsample {factor} is not 1, 2 or 4")
            self.downsample = int(factor)

    def bind(self, catalog: CubeCatalog) -> SemanticFeatureTask:
        """As for Task 1, plus: blocked folds of the ``samples`` slices can be trained (before any data read)."""
        super().bind(catalog)
        if self.cv == "blocked":
            slices = np.concatenate([np.arange(*z) for _, z in self._slabs("test")])
            check_blocked_folds(slices, self.folds, self.cv_gap)
        return self

    def _check_disjoint(self) -> None:
        """Task 3 reads out the same slices it describes (in-sample + CV): nothing to check."""

    def features(self, source: VolumeSource, split: str = "test") -> FeatureTable:
        """Semantic features of every sample of ``split``, from full-resolution pixel labels."""
        assert self.catalog is not None, "call bind() first"
        if split == "test" and self._features is not None:
            return self._features
        tables = []
        for cube, z in self._slabs(split):
            labels = np.asarray(source.cutout("pixel_labels", cube.x, cube.y, z))
            if labels.shape[-2] % self.grid or labels.shape[-1] % self.grid:
                raise DataError(
                    f"task.sample_unit: {cube.key} tiles of {labels.shape[-2:]} do not split into quadrants"
                )
            values = cube_features(labels, self.grid, BOSSDB, self.connectivity, self.centroid)
            n = len(values)
            tables.append(
                FeatureTable(
                    values=values,
                    cube=np.full(n, cube.key, dtype=object),
                    z=z[0] + np.arange(n) // self.tiles_per_image,
                    tile=np.arange(n) % self.tiles_per_image,
                    region=np.full(n, self.catalog.region_index(cube.region), dtype=np.int64),
                )
            )
        table = FeatureTable.concat(tables)
        if split == "test":
            self._features = table
        return table
