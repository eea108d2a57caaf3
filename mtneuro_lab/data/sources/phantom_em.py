"""Synthetic serial-EM volume: the embedded default data of the EM tasks (SNEMI3D, MitoEM).

It imitates what those tasks learn from, at SNEMI3D-like anisotropic voxels (30 x 6 x 6 nm,
z-y-x): neurites as space-filling cells (generalised Voronoi cells of smooth random centre
lines, most running across the sections, some oblique), separated by dark membranes;
mitochondria as dark ellipsoids with a darker rim inside the neurites; per-neurite cytoplasm
shade, textured noise, in-plane blur and per-section brightness drift.

Channels (all ``(z, y, x)``): ``image`` uint8; ``labels`` int32 neuron ids with 0 on the
membranes (the gala/CREMI convention: 0 = boundary, ignored by the metrics); ``mito`` int32
mitochondrion ids with 0 = background. Deterministic per ``(seed, shape)``; generated once and
cached with :mod:`mtneuro_lab.data.cache` (atomic, checksummed), then served from memory maps.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy import ndimage

from mtneuro_lab.data import cache
from mtneuro_lab.data.sources.base import Range, VolumeSource, as_range
from mtneuro_lab.errors import ConfigError, DataError

#: bump when the generator changes so old caches are never mixed with new volumes
GENERATOR_VERSION = "v1"
EM_CHANNELS = ("image", "labels", "mito")
#: voxel size (z, y, x) in nm the generator draws at (SNEMI3D's)
VOXEL_NM = (30.0, 6.0, 6.0)
DEFAULT_SHAPE = (100, 256, 256)
MIN_SHAPE = (8, 32, 32)
MAX_SHAPE = (1024, 2048, 2048)

#: mean distance between neurite centre lines in nm (cross-sections ~ 150-300 nm across)
_NEURITE_SPACING_NM = 200.0
_MITO_PER_VOXEL = 1.0 / 45_000


def seed_key(seed: int, shape: Sequence[int]) -> int:
    """Stable 32-bit key (``hash()`` is salted per process, crc32 is not)."""
    return zlib.crc32(f"phantom_em/{GENERATOR_VERSION}/{seed}/{'x'.join(map(str, shape))}".encode())


def _centre_line(rng: np.random.Generator, shape: np.ndarray, axial: bool) -> np.ndarray:
    """Points (voxel coordinates, < 0.5 voxel apart) of a smooth random curve through the box.

    Steps are taken in physical units so that curves bend by similar angles in every
    direction; ``axial`` curves run mostly along z (across the sections), others anywhere.
    """
    phys = shape * np.asarray(VOXEL_NM)
    step_nm = 2.5
    start = rng.uniform(0, phys)
    if axial:
        direction = np.array([1.0, *rng.normal(0.0, 0.35, 2)])
    else:
        direction = rng.standard_normal(3) * np.array([0.4, 1.0, 1.0])
    direction /= np.linalg.norm(direction)
    n = int(2.5 * np.linalg.norm(phys) / step_nm)
    halves = []
    for sign in (1.0, -1.0):
        wander = ndimage.gaussian_filter1d(rng.standard_normal((n, 3)), 120.0, axis=0, mode="wrap")
        wander /= wander.std() + 1e-9
        steps = sign * direction + 0.35 * wander
        steps *= step_nm / np.linalg.norm(steps, axis=1, keepdims=True)
        points = start + np.cumsum(steps, axis=0)
        outside = np.any((points < 0) | (points >= phys), axis=1)
        stop = int(np.argmax(outside)) if outside.any() else n
        halves.append(points[:stop])
    points = np.concatenate([halves[1][::-1], start[None], halves[0]])
    return points / np.asarray(VOXEL_NM)


def _neurites(rng: np.random.Generator, shape: tuple[int, int, int]) -> np.ndarray:
    """Space-filling neuron ids: each voxel takes the id of the nearest centre line (physical metric)."""
    dims = np.asarray(shape)
    area = shape[1] * shape[2] * VOXEL_NM[1] * VOXEL_NM[2]
    n_axial = max(4, int(round(area / _NEURITE_SPACING_NM**2)))
    n_oblique = max(2, n_axial // 3)
    seeds = np.zeros(shape, dtype=np.int32)
    label = 0
    for i in range(n_axial + n_oblique):
        points = np.floor(_centre_line(rng, dims, axial=i < n_axial)).astype(np.int64)
        points = np.clip(points, 0, dims - 1)
        if len(points) == 0:
            continue
        label += 1
        seeds[points[:, 0], points[:, 1], points[:, 2]] = label
    indices = ndimage.distance_transform_edt(seeds == 0, sampling=VOXEL_NM, return_distances=False, return_indices=True)
    return seeds[tuple(indices)]


def _membranes(cells: np.ndarray) -> np.ndarray:
    """Voxels with an in-plane 4-neighbour of another cell (both sides: ~2 voxels, ~12 nm)."""
    edge = np.zeros(cells.shape, dtype=bool)
    dy = cells[:, 1:, :] != cells[:, :-1, :]
    dx = cells[:, :, 1:] != cells[:, :, :-1]
    edge[:, 1:, :] |= dy
    edge[:, :-1, :] |= dy
    edge[:, :, 1:] |= dx
    edge[:, :, :-1] |= dx
    return edge


def _mitochondria(rng: np.random.Generator, labels: np.ndarray) -> np.ndarray:
    """Non-overlapping ellipsoids, elongated along z, each inside one neurite away from membranes."""
    shape = labels.shape
    mito = np.zeros(shape, dtype=np.int32)
    inside = ndimage.distance_transform_edt(labels > 0, sampling=VOXEL_NM)
    n = max(1, int(round(labels.size * _MITO_PER_VOXEL)))
    candidates = np.flatnonzero(inside.reshape(-1) > 70.0)
    if candidates.size == 0:
        return mito
    count = 0
    for centre in rng.choice(candidates, size=min(n * 3, candidates.size), replace=False):
        if count == n:
            break
        cz, cy, cx = np.unravel_index(centre, shape)
        radius_nm = min(rng.uniform(40.0, 85.0), float(inside[cz, cy, cx]) - 20.0)
        a = radius_nm / VOXEL_NM[1]  # in-plane semi-axes (voxels)
        b = a * rng.uniform(0.7, 1.0)
        c = rng.uniform(100.0, 360.0) / VOXEL_NM[0]  # along z
        theta = rng.uniform(0, np.pi)
        r = int(np.ceil(a)) + 1
        rz = int(np.ceil(c)) + 1
        z0, z1 = max(cz - rz, 0), min(cz + rz + 1, shape[0])
        y0, y1 = max(cy - r, 0), min(cy + r + 1, shape[1])
        x0, x1 = max(cx - r, 0), min(cx + r + 1, shape[2])
        zz, yy, xx = np.ogrid[z0 - cz : z1 - cz, y0 - cy : y1 - cy, x0 - cx : x1 - cx]
        u = yy * np.cos(theta) + xx * np.sin(theta)
        v = -yy * np.sin(theta) + xx * np.cos(theta)
        body = (zz / c) ** 2 + (u / a) ** 2 + (v / b) ** 2 <= 1.0
        box = (slice(z0, z1), slice(y0, y1), slice(x0, x1))
        body &= labels[box] == labels[cz, cy, cx]
        if (mito[box][body] != 0).any() or body.sum() < 50:
            continue
        count += 1
        mito[box][body] = count
    return mito


def _render(rng: np.random.Generator, labels: np.ndarray, membrane: np.ndarray, mito: np.ndarray) -> np.ndarray:
    """uint8 image: cytoplasm shade per neurite, dark membranes and mitochondria, texture, blur, noise."""
    shade = rng.normal(0.0, 9.0, int(labels.max()) + 1).astype(np.float32)
    image = np.float32(172.0) + shade[labels]
    texture = ndimage.gaussian_filter(rng.standard_normal(labels.shape, dtype=np.float32), (0.5, 1.5, 1.5))
    image += texture * np.float32(14.0 / (texture.std() + 1e-6))
    image[membrane] = 58.0
    body = mito > 0
    image[body] = 104.0 + 0.5 * (image[body] - 172.0)
    image[body & _membranes(mito)] = 72.0
    image = ndimage.gaussian_filter(image, (0.4, 1.0, 1.0), mode="nearest")
    image += rng.normal(0.0, 12.0, labels.shape).astype(np.float32)
    depth = int(labels.shape[0])
    gain = 1.0 + rng.normal(0.0, 0.04, depth).astype(np.float32)
    offset = rng.normal(0.0, 5.0, depth).astype(np.float32)
    image = (image - 128.0) * gain[:, None, None] + 128.0 + offset[:, None, None]
    np.clip(image, 0, 255, out=image)
    return np.rint(image).astype(np.uint8)


def generate_em(seed: int, shape: Sequence[int] = DEFAULT_SHAPE) -> dict[str, np.ndarray]:
    """Generate the phantom: ``image`` uint8, ``labels`` and ``mito`` int32, all ``shape`` (z, y, x)."""
    z, y, x = (int(s) for s in shape)
    rng = np.random.default_rng(seed_key(seed, (z, y, x)))
    cells = _neurites(rng, (z, y, x))
    membrane = _membranes(cells)
    labels = np.where(membrane, 0, cells).astype(np.int32)
    mito = _mitochondria(rng, labels)
    image = _render(rng, cells, membrane, mito)
    return {"image": image, "labels": labels, "mito": mito}


def check_shape(shape: Sequence[int], key: str = "source.em_shape") -> tuple[int, int, int]:
    try:
        out = tuple(int(s) for s in shape)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: expected [z, y, x] integers, got {shape!r}") from None
    if len(out) != 3 or any(s < lo or s > hi for s, lo, hi in zip(out, MIN_SHAPE, MAX_SHAPE)):
        raise ConfigError(
            f"{key}: expected [z, y, x] between {list(MIN_SHAPE)} and {list(MAX_SHAPE)}, got {list(shape)}"
        )
    return out


class PhantomEMSource(VolumeSource):
    """Serves the EM phantom in its own frame: x, y, z from 0 to the shape (half-open).

    Cached under ``<cache_dir>/phantom_em/<version>/seed<seed>_<z>x<y>x<x>/<channel>.npy``.
    ``extent`` and ``z_extent`` are known without generating anything (preflight reads no data).
    """

    channels = EM_CHANNELS
    voxel_size = VOXEL_NM

    def __init__(
        self, seed: int = 0, cache_dir: str = "~/.cache/mtneuro_lab", shape: Sequence[int] = DEFAULT_SHAPE
    ) -> None:
        if int(seed) < 0:
            raise ConfigError(f"source.seed: must be >= 0, got {seed}")
        self.seed = int(seed)
        self.shape = check_shape(shape)
        depth, height, width = self.shape
        self.extent: tuple[Range, Range, Range] = ((0, width), (0, height), (0, depth))
        self.root = (
            Path(cache_dir).expanduser()
            / "phantom_em"
            / GENERATOR_VERSION
            / f"seed{self.seed}_{depth}x{height}x{width}"
        )
        self._arrays: dict[str, np.ndarray] | None = None

    @property
    def z_extent(self) -> Range:
        return self.extent[2]

    def describe(self) -> str:
        return f"PhantomEMSource(seed={self.seed}, shape={list(self.shape)}, cache={self.root})"

    def _ensure_cached(self) -> dict[str, np.ndarray]:
        """Generate once (any process); later calls memory-map the verified cache entries."""
        if self._arrays is None:
            paths = {name: self.root / f"{name}.npy" for name in self.channels}
            if not all(cache.has_array(p) for p in paths.values()):
                volume = generate_em(self.seed, self.shape)
                meta = {
                    "generator": f"phantom_em/{GENERATOR_VERSION}",
                    "seed": self.seed,
                    "shape": list(self.shape),
                    "voxel_size_nm": list(VOXEL_NM),
                }
                for name, path in paths.items():
                    cache.save_array(path, volume[name], {**meta, "channel": name})
            self._arrays = {name: cache.load_array(path) for name, path in paths.items()}
        return self._arrays

    def cutout(self, channel: str, x: Range, y: Range, z: Range) -> np.ndarray:
        """Read-only ``(z, y, x)`` view of ``channel``; ranges must lie inside the phantom."""
        self.check_channel(channel)
        request = (as_range(x, "x"), as_range(y, "y"), as_range(z, "z"))
        if not all(lo <= r[0] and r[1] <= hi for r, (lo, hi) in zip(request, self.extent)):
            asked = " ".join(f"{a}={list(r)}" for a, r in zip("xyz", request))
            raise DataError(
                f"phantom_em: {channel} cutout {asked} lies outside the phantom's box "
                f"x=[0, {self.shape[2]}] y=[0, {self.shape[1]}] z=[0, {self.shape[0]}]"
            )
        (x0, x1), (y0, y1), (z0, z1) = request
        return self._ensure_cached()[channel][z0:z1, y0:y1, x0:x1]

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_arrays"] = None  # memory maps are reopened in the child process (DDP spawn)
        return state
