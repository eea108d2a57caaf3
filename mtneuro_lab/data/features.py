"""Task 3 semantic features of image samples, computed from pixel labels.

For every sample (a whole tile, or each of its ``grid x grid`` sub-tiles; the paper uses the
four 128x128 quadrants of a 256x256 tile) the features are:

``vessel_density``, ``axon_density``
    fraction of the sample's pixels labelled blood vessel / myelinated axon (the paper reports
    percentages; R^2 does not depend on the scale).
``cell_count``
    number of distinct cells with at least one pixel in the sample.
``cell_size``
    mean 2D area (pixels) of those cells' cross-sections in the sample. NaN without cells.
``nn_distance``
    mean over the sample's cells of the distance (pixels) from a cell's centroid to the
    nearest OTHER cell's centroid in the same sample. NaN with fewer than two cells.

Cells are connected components of the cell class computed in 3D (cc3d) inside ONE region's
cube, so a cell whose cross-section falls apart into pieces within a slice still counts once,
and cells of different regions are never merged (default 6-connectivity, the paper's; the
phantom's cells are the same components under 6 and 26). A cell's centroid is the 2D centroid of its
cross-section in the sample (``centroid="2d"``, the paper's choice via regionprops) or the 3D
centroid of the whole cell (``centroid="3d"``).

Two bugs of the reference code are not reproduced: its nearest-neighbour query included each
cell itself (distance 0) in the mean, and samples with fewer than two cells got a made-up
distance (64) and size 0. Here such values are NaN and the read-out excludes them per feature.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import cc3d
import numpy as np
from scipy.spatial import cKDTree

from mtneuro_lab.errors import DataError

FEATURES: tuple[str, ...] = ("vessel_density", "axon_density", "cell_count", "cell_size", "nn_distance")

Connectivity = Literal[6, 18, 26]
Centroid = Literal["2d", "3d"]


@dataclass(frozen=True)
class LabelEncoding:
    """Which label value means which structure."""

    vessel: int = 1
    cell: int = 2
    axon: int = 3


#: BossDB ``pixel_labels`` (and the phantom): 1 vessel, 2 cell, 3 axon
BOSSDB = LabelEncoding(vessel=1, cell=2, axon=3)
#: the older release in ``prasad2020_sparse_masks``: 1 axon, 2 vessel, 3 cell
PRASAD2020_MASKS = LabelEncoding(vessel=2, cell=3, axon=1)


@dataclass
class FeatureTable:
    """Features of many samples: ``values[i, j]`` is feature ``names[j]`` of sample ``i``.

    ``cube``/``z``/``tile`` say where each sample comes from: the cube's key, the slice and the
    sub-tile index (row-major, 0 for whole tiles; quadrants 0 TL, 1 TR, 2 BL, 3 BR).
    """

    values: np.ndarray
    cube: np.ndarray
    z: np.ndarray
    tile: np.ndarray
    names: tuple[str, ...] = FEATURES
    region: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))

    def __len__(self) -> int:
        return int(self.values.shape[0])

    def column(self, name: str) -> np.ndarray:
        return self.values[:, self.names.index(name)]

    def n_nan(self) -> dict[str, int]:
        return {n: int(np.isnan(self.column(n)).sum()) for n in self.names}

    @staticmethod
    def concat(tables: Sequence[FeatureTable]) -> FeatureTable:
        if not tables:
            raise DataError("features: no cubes given")
        return FeatureTable(
            values=np.concatenate([t.values for t in tables]),
            cube=np.concatenate([t.cube for t in tables]),
            z=np.concatenate([t.z for t in tables]),
            tile=np.concatenate([t.tile for t in tables]),
            names=tables[0].names,
            region=np.concatenate([t.region for t in tables]),
        )

    def to_csv(self, path: str) -> None:
        header = "cube,region,z,tile," + ",".join(self.names)
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(header + "\n")
            for i in range(len(self)):
                vals = ",".join("" if np.isnan(v) else f"{v:.6g}" for v in self.values[i])
                region = int(self.region[i]) if len(self.region) else -1
                fh.write(f"{self.cube[i]},{region},{int(self.z[i])},{int(self.tile[i])},{vals}\n")


def label_cells(labels: np.ndarray, encoding: LabelEncoding = BOSSDB, connectivity: Connectivity = 6) -> np.ndarray:
    """3D connected components of the cell class of ONE cube: ``(z, y, x)`` uint32 ids, 0 = none."""
    if labels.ndim != 3:
        raise DataError(f"features: expected a (z, y, x) label cube, got shape {labels.shape}")
    if connectivity not in (6, 18, 26):
        raise DataError(f"features: connectivity must be 6, 18 or 26, got {connectivity}")
    return cc3d.connected_components(np.asarray(labels) == encoding.cell, connectivity=connectivity)


def label_cells_per_slice(
    labels: np.ndarray, encoding: LabelEncoding = BOSSDB, connectivity: Literal[4, 8] = 4
) -> np.ndarray:
    """2D components slice by slice, for stacks of NON-adjacent slices (sparse manual masks).

    Stacking such slices and labelling in 3D would join cells of unrelated sections. Ids are
    unique over the stack. 4-connectivity in a slice is what 6-connectivity gives in 3D.
    """
    if labels.ndim != 3:
        raise DataError(f"features: expected a (slice, y, x) stack, got shape {labels.shape}")
    out = np.zeros(labels.shape, dtype=np.uint32)
    offset = 0
    for i, plane in enumerate(np.asarray(labels)):
        ids, n = cc3d.connected_components(plane == encoding.cell, connectivity=connectivity, return_N=True)
        out[i] = np.where(ids > 0, ids + offset, 0)
        offset += int(n)
    return out


def _check_grid(shape: tuple[int, ...], grid: int) -> tuple[int, int]:
    if grid < 1:
        raise DataError(f"features: grid must be >= 1, got {grid}")
    h, w = shape[-2], shape[-1]
    if h % grid or w % grid:
        raise DataError(f"features: a {h}x{w} tile does not split into a {grid}x{grid} grid")
    return h // grid, w // grid


def _density(labels: np.ndarray, value: int, grid: int, h: int, w: int) -> np.ndarray:
    z = labels.shape[0]
    hits = (labels == value).reshape(z, grid, h, grid, w).sum(axis=(2, 4), dtype=np.int64)
    return (hits / float(h * w)).reshape(-1)


def _nn_mean(points: np.ndarray, sample: np.ndarray, n_samples: int, span: float) -> np.ndarray:
    """Per sample, mean distance of each point to its nearest OTHER point of the same sample.

    One KD-tree for all samples: each sample is moved ``span`` (larger than any in-sample
    distance) apart along an extra axis, so a point's nearest other point lies in its own
    sample whenever that sample has one; otherwise the distance exceeds ``span`` and the
    sample gets NaN.
    """
    out = np.full(n_samples, np.nan)
    if len(points) < 2:
        return out
    lifted = np.column_stack([points, sample.astype(np.float64) * span])
    dist, _ = cKDTree(lifted).query(lifted, k=2)  # (N, 2) for k=2; the stubs also allow a float
    second = np.asarray(dist)[:, 1]  # column 0 is the point itself (distance 0)
    ok = second < span / 2
    total = np.bincount(sample[ok], weights=second[ok], minlength=n_samples)
    count = np.bincount(sample[ok], minlength=n_samples)
    has = count > 0
    out[has] = total[has] / count[has]
    return out


def cube_features(
    labels: np.ndarray,
    grid: int = 2,
    encoding: LabelEncoding = BOSSDB,
    connectivity: Connectivity = 6,
    centroid: Centroid = "2d",
    cells: np.ndarray | None = None,
) -> np.ndarray:
    """Features ``(z * grid * grid, len(FEATURES))`` of every sample of ONE region's cube.

    Sample ``s`` is slice ``s // grid**2``, sub-tile ``s % grid**2`` (row-major).
    ``cells`` may pass precomputed :func:`label_cells` ids.
    """
    labels = np.asarray(labels)
    if centroid not in ("2d", "3d"):
        raise DataError(f"features: centroid must be 2d or 3d, got {centroid!r}")
    h, w = _check_grid(labels.shape, grid)
    nz = labels.shape[0]
    n_samples = nz * grid * grid
    if cells is None:
        cells = label_cells(labels, encoding, connectivity)
    out = np.full((n_samples, len(FEATURES)), np.nan)
    out[:, 0] = _density(labels, encoding.vessel, grid, h, w)
    out[:, 1] = _density(labels, encoding.axon, grid, h, w)

    z, y, x = np.nonzero(cells)
    ids = cells[z, y, x].astype(np.int64)
    sample = (z * grid + y // h) * grid + x // w
    n_ids = int(ids.max()) + 1 if ids.size else 1
    pairs, inverse, area = np.unique(sample * n_ids + ids, return_inverse=True, return_counts=True)
    pair_sample = pairs // n_ids
    count = np.bincount(pair_sample, minlength=n_samples)
    out[:, 2] = count
    has = count > 0
    out[has, 3] = np.bincount(pair_sample, weights=area, minlength=n_samples)[has] / count[has]

    if centroid == "2d":
        points = np.column_stack([np.bincount(inverse, weights=y) / area, np.bincount(inverse, weights=x) / area])
    else:
        volume = np.bincount(ids, minlength=n_ids).astype(np.float64)
        volume[0] = 1.0
        centres = np.column_stack([np.bincount(ids, weights=c, minlength=n_ids) / volume for c in (z, y, x)])
        points = centres[pairs % n_ids]
    span = 4.0 * float(sum(labels.shape))
    out[:, 4] = _nn_mean(points, pair_sample, n_samples, span)
    return out


def cubes_features(
    cubes: Mapping[str, np.ndarray],
    grid: int = 2,
    encoding: LabelEncoding = BOSSDB,
    connectivity: Connectivity = 6,
    centroid: Centroid = "2d",
    z0: Mapping[str, int] | None = None,
    regions: Mapping[str, int] | None = None,
) -> FeatureTable:
    """Features of several cubes, each labelled on its own (cells never cross cubes/regions).

    ``cubes`` maps a cube key (e.g. ``A/cortex``) to its ``(z, y, x)`` labels; ``z0`` gives the
    BossDB z of each cube's first slice, ``regions`` its region index (both for bookkeeping).
    """
    tables = []
    per_slice = grid * grid
    for key, labels in cubes.items():
        values = cube_features(labels, grid, encoding, connectivity, centroid)
        n = len(values)
        start = int((z0 or {}).get(key, 0))
        tables.append(
            FeatureTable(
                values=values,
                cube=np.full(n, key, dtype=object),
                z=start + np.arange(n) // per_slice,
                tile=np.arange(n) % per_slice,
                region=np.full(n, int((regions or {}).get(key, -1)), dtype=np.int64),
            )
        )
    return FeatureTable.concat(tables)
