"""Synthetic X-ray microCT "phantom", v1 generator (``source.generator=v1``) and shared pieces.

The real MTNeuro volume (``bossdb://prasad/prasad2020``, 1.17 um voxels) needs a network and
hundreds of MB per cube, so tests, smoke runs and examples read this phantom instead. It imitates
what the tasks can learn from: region-specific tissue composition (the paper's class fractions),
cell size and density, and fibre orientation. It also adds nuisance intensity variation (per-slice
gain/offset drift, a smooth bias field) so that mean brightness is *not* a reliable region cue
and a linear model on raw pixels does clearly worse than a texture-aware CNN.

Pixel labels use BossDB's encoding: 0 background, 1 blood vessel, 2 cell, 3 myelinated axon.

Every cube is generated once, deterministically from ``(seed, region, x0, y0)`` and its shape,
then cached on disk and served by :class:`~mtneuro_lab.data.sources.phantom_source.PhantomXraySource`.
v1 regions are nearly uniform inside a cube; the default v2 generator
(:mod:`~mtneuro_lab.data.sources.phantom_v2`) reuses its pieces (curves, cell templates, rendering).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import fft, ndimage

from mtneuro_lab.errors import DataError

#: bump when the generator changes so old caches are never mixed with new cubes
GENERATOR_VERSION = "v1"

BACKGROUND, VESSEL, CELL, AXON = 0, 1, 2, 3

DEFAULT_ROI_IDS = {"cortex": 1, "striatum": 2, "vp": 3, "zi": 4}


@dataclass(frozen=True)
class RegionProfile:
    """What a region's tissue looks like.

    Fractions are of all voxels (paper, per region). ``cell_radius`` is the median equivalent
    radius of a cell in voxels, chosen so that 2D cell profiles match the median profile area
    of the real manual masks (see ``benchmarks/bench_phantom.py``). Fibres run along the unit
    vector given by ``fibre_polar`` (degrees from z) and ``fibre_azimuth`` (degrees from x in
    the xy plane, ``None`` = random per cube); ``fibre_len``/``fibre_width`` are Gaussian
    correlation lengths (voxels) along and across it.
    """

    vessel: float
    cell: float
    axon: float
    cell_radius: float
    fibre_polar: float
    fibre_azimuth: float | None
    fibre_len: float
    fibre_width: float


PROFILES: dict[str, RegionProfile] = {
    # cortex has no myelinated tracts; its field only gives faint radial neuropil texture
    "cortex": RegionProfile(0.023, 0.046, 0.0, 3.75, 90.0, 90.0, 6.0, 1.5),
    # striatum: round fascicles (Wilson's pencils) running mostly along z
    "striatum": RegionProfile(0.025, 0.057, 0.192, 4.5, 20.0, None, 24.0, 4.5),
    # vp and zi: dense in-plane fibre tracts at different angles
    "vp": RegionProfile(0.047, 0.057, 0.668, 5.35, 80.0, 30.0, 12.0, 1.6),
    "zi": RegionProfile(0.054, 0.094, 0.530, 5.7, 75.0, 120.0, 10.0, 2.0),
}

#: image intensities before nuisance: (base, slope on the fibre field's z-score)
_CLASS_LEVEL = np.array([142.0, 195.0, 100.0, 72.0], dtype=np.float32)
_CLASS_SLOPE = np.array([-5.0, 0.0, 0.0, -4.0], dtype=np.float32)

_TEMPLATES_PER_CUBE = 48
_CUBE3 = np.ones((3, 3, 3), dtype=bool)


def seed_key(seed: int, region: str, x0: int, y0: int) -> int:
    """Stable 32-bit key for one cube (``hash()`` is salted per process, crc32 is not)."""
    return zlib.crc32(f"phantom_xray/{GENERATOR_VERSION}/{seed}/{region}/{x0}/{y0}".encode())


# --------------------------------------------------------------------------- vessels


def _ball_offsets(radius: float) -> np.ndarray:
    """Integer (dz, dy, dx) offsets of a digital ball."""
    r = int(np.ceil(radius))
    grid = np.mgrid[-r : r + 1, -r : r + 1, -r : r + 1].reshape(3, -1).T
    return grid[(grid**2).sum(1) <= radius**2 + 1e-6]


def _smooth_walk(rng: np.random.Generator, n: int, sigma: float) -> np.ndarray:
    """``(n, 3)`` smooth random perturbation with unit-order amplitude."""
    noise = ndimage.gaussian_filter1d(rng.standard_normal((n, 3)), sigma, axis=0, mode="wrap")
    return noise / (noise.std() + 1e-9)


def _curve(
    rng: np.random.Generator,
    shape: tuple[int, int, int],
    pad: float,
    start: np.ndarray | None = None,
    direction: np.ndarray | None = None,
) -> np.ndarray:
    """Points (1 voxel apart) of a smooth random curve through the cube, cut where it leaves.

    ``start``/``direction`` (z, y, x) are drawn uniformly when not given.
    """
    start = rng.uniform(0, shape) if start is None else np.asarray(start, dtype=np.float64)
    direction = rng.standard_normal(3) if direction is None else np.array(direction, dtype=np.float64)
    direction /= np.linalg.norm(direction)
    n = int(2 * np.linalg.norm(shape))
    halves = []
    for sign in (1.0, -1.0):
        steps = sign * direction + 0.45 * _smooth_walk(rng, n, sigma=25.0)
        steps /= np.linalg.norm(steps, axis=1, keepdims=True)
        points = start + np.cumsum(steps, axis=0)
        outside = np.any((points < -pad) | (points >= np.asarray(shape) + pad), axis=1)
        stop = int(np.argmax(outside)) if outside.any() else n
        halves.append(points[:stop])
    return np.concatenate([halves[1][::-1], start[None], halves[0]])


def _strides(shape: tuple[int, int, int]) -> np.ndarray:
    """Flat-index strides of a C-ordered ``(z, y, x)`` volume."""
    return np.array([shape[1] * shape[2], shape[2], 1])


def _tube_voxels(curve: np.ndarray, radius: float, dims: np.ndarray, strides: np.ndarray, step: int = 1) -> np.ndarray:
    """Sorted unique flat indices of the voxels within ``radius`` of every ``step``-th point of a
    curve (and its last), inside the cube."""
    if step > 1:
        curve = np.concatenate([curve[::step], curve[-1:]])
    points = np.rint(curve).astype(np.int64)
    voxels = (points[:, None, :] + _ball_offsets(radius)[None]).reshape(-1, 3)
    voxels = voxels[np.all((voxels >= 0) & (voxels < dims), axis=1)]
    return np.unique(voxels @ strides)


def _draw_vessels(rng: np.random.Generator, shape: tuple[int, int, int], target_voxels: int) -> np.ndarray:
    """Tubes (radius 2-5, mostly capillary-sized) along random curves, until the target volume."""
    mask = np.zeros(int(np.prod(shape)), dtype=bool)
    filled = 0
    dims = np.asarray(shape)
    strides = _strides(shape)
    while filled < target_voxels:
        radius = round(2.0 * (1.0 + 1.5 * rng.beta(1.2, 4.0))) / 2.0
        flat = _tube_voxels(_curve(rng, shape, pad=radius), radius, dims, strides)
        filled += int(np.count_nonzero(~mask[flat]))
        mask[flat] = True
    return mask.reshape(shape)


# --------------------------------------------------------------------------- cells


@dataclass(frozen=True)
class _Template:
    """One cell shape: flat offsets of its body and of its 1-voxel halo, and body intensities."""

    body: np.ndarray
    halo: np.ndarray
    values: np.ndarray


def _cell_template(
    rng: np.random.Generator, size: float, strides: np.ndarray, elongation: float = 0.12
) -> tuple[_Template, int]:
    """A randomly rotated ellipsoid of equivalent radius ``size`` (axes jittered by
    ``elongation``, log-normal); returns it and the half-size of its halo box."""
    axes = size * np.exp(elongation * rng.standard_normal(3))
    axes *= size / np.cbrt(np.prod(axes))
    rotation, _ = np.linalg.qr(rng.standard_normal((3, 3)))
    r = int(np.ceil(axes.max())) + 1
    grid = np.mgrid[-r : r + 1, -r : r + 1, -r : r + 1].reshape(3, -1).T
    rho = np.linalg.norm((grid @ rotation) / axes, axis=1)
    inside = rho <= 1.0
    halo = ndimage.binary_dilation(inside.reshape((2 * r + 1,) * 3), _CUBE3).reshape(-1)
    # brighter nucleus in a darker soma
    values = 100.0 + 45.0 * np.exp(-((rho[inside] / 0.45) ** 2))
    return _Template(grid[inside] @ strides, grid[halo] @ strides, values.astype(np.float32)), r


def _cell_templates(
    rng: np.random.Generator, radius: float, shape: tuple[int, int, int]
) -> tuple[list[_Template], int]:
    """Random ellipsoids around ``radius``; returns them and the half-size of their halo box."""
    strides = _strides(shape)
    templates, half = [], 0
    for _ in range(_TEMPLATES_PER_CUBE):
        size = radius * np.exp(0.15 * rng.standard_normal())
        template, r = _cell_template(rng, size, strides)
        templates.append(template)
        half = max(half, r)
    return templates, half


def _random_centres(rng: np.random.Generator, shape: tuple[int, int, int], half: int, n: int) -> np.ndarray:
    """Flat indices of ``n`` centres whose halo box lies fully inside the cube."""
    coords = [rng.integers(half, dim - half, size=n) for dim in shape]
    return (coords[0] * shape[1] + coords[1]) * shape[2] + coords[2]


def _place_cells(
    rng: np.random.Generator,
    shape: tuple[int, int, int],
    blocked: np.ndarray,
    target_voxels: int,
    radius: float,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Place non-touching cells until ``target_voxels`` cell voxels (vectorised, in rounds).

    Each round proposes random (centre, template) pairs, drops those whose body hits ``blocked``
    (vessels and earlier cells plus their 1-voxel halo), and resolves conflicts among the rest by
    letting the highest id own every halo voxel it touches: a candidate wins only if it owns its
    whole halo, so winners' halos are disjoint and no two cells are 26-adjacent. Cells lie fully
    inside the cube, so each is exactly one 26-connected component.

    Returns flat indices and intensities of all cell voxels, and the number of cells placed.
    """
    templates, half = _cell_templates(rng, radius, shape)
    return _place_templates(rng, shape, blocked, target_voxels, templates, half)


#: ``n -> (flat centres, template indices)`` of ``n`` proposed cells
Proposer = Callable[[int], tuple[np.ndarray, np.ndarray]]


def _place_templates(
    rng: np.random.Generator,
    shape: tuple[int, int, int],
    blocked: np.ndarray,
    target_voxels: int,
    templates: Sequence[_Template],
    half: int,
    propose: Proposer | None = None,
) -> tuple[np.ndarray, np.ndarray, int]:
    """:func:`_place_cells` with given templates; ``propose`` draws candidate cells (default:
    uniform centres whose halo box lies inside the cube, uniform templates)."""
    if propose is None:

        def propose(n: int) -> tuple[np.ndarray, np.ndarray]:
            return _random_centres(rng, shape, half, n), rng.integers(len(templates), size=n)

    blocked = blocked.reshape(-1).astype(bool)
    if any(dim <= 2 * half for dim in shape):
        return np.empty(0, np.int64), np.empty(0, np.float32), 0
    owner = np.zeros(blocked.size, dtype=np.int32)
    mean_volume = float(np.mean([t.body.size for t in templates]))
    bodies, values, placed, count = [], [], 0, 0
    success = 1.0  # fraction of proposals accepted in the previous round
    for _ in range(40):
        deficit = target_voxels - placed
        if deficit <= 0:
            break
        n = min(int(1.2 * deficit / mean_volume / max(success, 0.005)) + 8, 400_000)
        centres, kinds = propose(n)
        free = np.ones(n, dtype=bool)
        for k, t in enumerate(templates):
            sel = np.flatnonzero(kinds == k)
            free[sel] = ~blocked[centres[sel, None] + t.body].any(axis=1)
        candidates = np.flatnonzero(free)
        halos = []
        for k, t in enumerate(templates):
            sel = candidates[kinds[candidates] == k]
            idx = centres[sel, None] + t.halo
            np.maximum.at(owner, idx, (sel + 1).astype(np.int32)[:, None])
            halos.append((sel, idx))
        won = [sel[(owner[idx] == (sel + 1)[:, None]).all(axis=1)] for sel, idx in halos]
        for _, idx in halos:
            owner[idx] = 0
        winners = np.sort(np.concatenate(won))
        volumes = np.array([templates[kinds[w]].body.size for w in winners], dtype=np.int64)
        keep = winners[: int(np.searchsorted(np.cumsum(volumes), deficit)) + 1]
        for w in keep:
            t = templates[kinds[w]]
            blocked[centres[w] + t.halo] = True
            bodies.append(centres[w] + t.body)
            values.append(t.values)
            placed += t.body.size
        count += keep.size
        success = max(winners.size, 1) / n
    if not bodies:
        return np.empty(0, np.int64), np.empty(0, np.float32), 0
    return np.concatenate(bodies), np.concatenate(values), count


# --------------------------------------------------------------------------- fibres


def _fibre_direction(rng: np.random.Generator, profile: RegionProfile) -> np.ndarray:
    """Unit (z, y, x) fibre direction, jittered per cube so the exact angle is not a region tag."""
    polar = np.radians(profile.fibre_polar + rng.normal(0.0, 5.0))
    if profile.fibre_azimuth is None:
        azimuth = rng.uniform(0.0, 2 * np.pi)
    else:
        azimuth = np.radians(profile.fibre_azimuth + rng.normal(0.0, 12.0))
    return np.array([np.cos(polar), np.sin(polar) * np.sin(azimuth), np.sin(polar) * np.cos(azimuth)])


def _fibre_field(rng: np.random.Generator, shape: tuple[int, int, int], profile: RegionProfile) -> np.ndarray:
    """Anisotropic Gaussian random field (z-scored, float32): long along fibres, thin across.

    White noise filtered in the Fourier domain by a Gaussian with std ``fibre_len`` along the
    fibre direction and ``fibre_width`` across it (periodic, which only matters at the faces).
    """
    u = _fibre_direction(rng, profile).astype(np.float32)
    scale = np.exp(rng.normal(0.0, 0.08))
    along, across = profile.fibre_len * scale, profile.fibre_width * scale
    return oriented_field(rng.standard_normal(shape, dtype=np.float32), u, along, across)


def oriented_field(volume: np.ndarray, u: np.ndarray, along: float, across: float) -> np.ndarray:
    """``volume`` (float32) smoothed by a Gaussian with std ``along`` in the direction ``u``
    (unit, z y x) and ``across`` perpendicular to it, then z-scored (periodic borders)."""
    return oriented_fields(volume, [(u, along, across)])[0]


def oriented_fields(volume: np.ndarray, filters: Sequence[tuple[np.ndarray, float, float]]) -> list[np.ndarray]:
    """:func:`oriented_field` of one ``volume`` for several ``(u, along, across)``: one forward FFT."""
    shape = volume.shape
    spectrum = fft.rfftn(volume, workers=1)
    return [_filtered(spectrum if len(filters) == 1 else spectrum.copy(), shape, *f) for f in filters]


def _filtered(spectrum: np.ndarray, shape: tuple[int, ...], u: np.ndarray, along: float, across: float) -> np.ndarray:
    """In place on ``spectrum``: the anisotropic Gaussian gain, inverse FFT, z-score."""
    wz = (2 * np.pi * fft.fftfreq(shape[0])).astype(np.float32)[:, None, None]
    wy = (2 * np.pi * fft.fftfreq(shape[1])).astype(np.float32)[None, :, None]
    wx = (2 * np.pi * fft.rfftfreq(shape[2])).astype(np.float32)[None, None, :]
    # exp(-(a^2 |w|^2 + (l^2 - a^2) (w.u)^2) / 2): the |w|^2 part is separable, so only the
    # (w.u)^2 part costs full-size passes
    gain = (wz * u[0] + wy * u[1]) + wx * u[2]
    gain *= gain
    gain *= np.float32(-0.5 * (along**2 - across**2))
    np.exp(gain, out=gain)
    gain *= np.exp(-0.5 * across**2 * (wz**2 + wy**2))
    gain *= np.exp(-0.5 * across**2 * wx**2)
    spectrum *= gain
    del gain
    field = fft.irfftn(spectrum, s=shape, workers=1)
    return zscore(field)


def zscore(field: np.ndarray) -> np.ndarray:
    """In place: zero mean, unit std (estimated on every 3rd voxel per axis, which is enough)."""
    sample = field[::3, ::3, ::3]
    field -= np.float32(sample.mean())
    field *= np.float32(1.0 / (sample.std() + 1e-12))
    return field


# --------------------------------------------------------------------------- image


def _smooth_profile(
    rng: np.random.Generator, n: int, shortest_period: float, longest_period: float | None = None
) -> np.ndarray:
    """Smooth random 1D function in [-1, 1]: a few low-frequency cosines, periods between
    ``shortest_period`` and ``longest_period`` (default ``4 n``: drifts across the whole axis)."""
    t = np.arange(n, dtype=np.float32)
    longest = max(4.0 * n, 1.0) if longest_period is None else longest_period
    freqs = rng.uniform(1.0 / longest, 1.0 / shortest_period, size=3)
    phases = rng.uniform(0, 2 * np.pi, size=3)
    amps = rng.uniform(0.5, 1.0, size=3)
    curve = (amps[:, None] * np.cos(2 * np.pi * freqs[:, None] * t + phases[:, None])).sum(0)
    return (curve / amps.sum()).astype(np.float32)


def _apply_nuisance(rng: np.random.Generator, image: np.ndarray, drift: tuple[float, float] | None = None) -> None:
    """In place: per-slice gain/offset drift and a smooth multiplicative bias field.

    The ranges (gain ~0.75-1.3, offset ~+-60 grey levels) exceed the differences between the
    regions' mean intensities (~45 levels), so region must be read from texture, not brightness.
    ``drift``: (shortest, longest) period in slices of the drifts along z; None (v1) lets them
    run 60-100 slices up to 4x the cube, so a slab tens of slices thick sits at its own level.
    """
    nz, ny, nx = (int(n) for n in image.shape)
    gain_z, bias_z = ((60.0, None), (100.0, None)) if drift is None else (drift, drift)
    gain = np.exp(rng.normal(0.0, 0.08) + 0.15 * _smooth_profile(rng, nz, *gain_z))
    gain *= 1.0 + 0.01 * rng.standard_normal(nz).astype(np.float32)
    offset = rng.uniform(-20.0, 20.0) + 40.0 * _smooth_profile(rng, nz, *gain_z)
    offset += 1.5 * rng.standard_normal(nz).astype(np.float32)
    bias = 0.12 * (_smooth_profile(rng, ny, 150.0)[:, None] * _smooth_profile(rng, nx, 150.0)[None, :])
    bias = 1.0 + bias[None] + 0.06 * _smooth_profile(rng, nz, *bias_z)[:, None, None]
    image -= 120.0
    image *= bias
    image *= gain.astype(np.float32)[:, None, None]
    image += (120.0 + offset).astype(np.float32)[:, None, None]


def clean_image(labels: np.ndarray, field: np.ndarray, cell_idx: np.ndarray, cell_values: np.ndarray) -> np.ndarray:
    """Noise-free float32 intensities, every voxel from its own label: the class level plus the
    fibre texture (``field``), cell voxels their template's soma/nucleus values."""
    image = _CLASS_LEVEL[labels]
    image += _CLASS_SLOPE[labels] * field
    image.reshape(-1)[cell_idx] = cell_values
    return image


def _render(
    rng: np.random.Generator,
    labels: np.ndarray,
    field: np.ndarray,
    cell_idx: np.ndarray,
    cell_values: np.ndarray,
    noise: float = 40.0,
    blur: float = 1.0,
    contrast: float = 1.0,
    drift: tuple[float, float] | None = None,
) -> np.ndarray:
    """uint8 image: class intensities + fibre texture, blur, correlated noise, nuisance.
    ``contrast`` scales every voxel's distance from the background level (1: unchanged);
    ``drift``: periods of the nuisance along z (:func:`_apply_nuisance`)."""
    image = clean_image(labels, field, cell_idx, cell_values)
    if contrast != 1.0:
        image -= _CLASS_LEVEL[BACKGROUND]
        image *= np.float32(contrast)
        image += _CLASS_LEVEL[BACKGROUND]
    image += rng.standard_normal(labels.shape, dtype=np.float32) * np.float32(noise)
    image = ndimage.gaussian_filter(image, blur, mode="nearest")
    _apply_nuisance(rng, image, drift)
    np.clip(image, 0, 255, out=image)
    return np.rint(image, out=image).astype(np.uint8)


def generate_cube(region: str, seed_key: int, shape: tuple[int, int, int]) -> dict[str, np.ndarray]:
    """Generate one phantom cube of ``shape`` (z, y, x) for ``region``.

    Returns ``image`` (uint8), ``pixel_labels`` (uint8, BossDB encoding) and ``cell_count`` (numpy
    int64 scalar: cells placed, each exactly one 26-connected component of class 2).
    """
    if region not in PROFILES:
        raise DataError(f"phantom: no tissue profile for region {region!r}; known: {sorted(PROFILES)}")
    z, y, x = (int(s) for s in shape)
    shape = (z, y, x)
    profile = PROFILES[region]
    rng = np.random.default_rng(seed_key)
    total = int(np.prod(shape))

    vessels = _draw_vessels(rng, shape, round(profile.vessel * total))
    blocked = vessels.view(np.uint8)
    for axis in range(3):
        blocked = ndimage.maximum_filter1d(blocked, 3, axis=axis)
    cell_idx, cell_values, count = _place_cells(rng, shape, blocked, round(profile.cell * total), profile.cell_radius)
    labels = np.zeros(shape, dtype=np.uint8)
    labels[vessels] = VESSEL
    labels.reshape(-1)[cell_idx] = CELL

    field = _fibre_field(rng, shape, profile)
    n_axon = round(profile.axon * total)
    if n_axon:
        free = labels == BACKGROUND
        values = field[free]
        n_axon = min(n_axon, values.size)
        threshold = np.partition(values, values.size - n_axon)[values.size - n_axon]
        labels[free & (field >= threshold)] = AXON
    image = _render(rng, labels, field, cell_idx, cell_values)
    return {"image": image, "pixel_labels": labels, "cell_count": np.int64(count)}
