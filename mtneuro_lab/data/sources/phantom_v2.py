"""The v2 X-ray phantom (the default): tissue that varies inside every cube and between cube sets.

The v1 phantom (:mod:`mtneuro_lab.data.sources.phantom`) hits each region's class fractions in
every cube and is nearly uniform inside it, so a few tile statistics name the region. Here, as
in the real manual masks, composition varies a lot from place to place, while each region keeps
an *arrangement* of its own that survives that variation:

* smooth random fields (:mod:`mtneuro_lab.data.sources.phantom_fields`: patches of ~``patch``
  voxels in-plane, on whole sections that differ every ``slab`` slices) modulate vessel, cell
  and axon density and cell size; they and the brightness drift change along z within a few
  slabs, so any z range tens of slices thick samples the cube's whole variation;
* axons form the region's pattern: round fascicles running through the section (striatum's
  "pencils"), two in-plane fibre families at overlapping angle ranges that segregate into
  patches of parallel tracts (vp) or cross everywhere (zi), none (cortex): slice-wide
  orientation statistics overlap between vp and zi, the local arrangement differs;
  the density field moves the threshold that cuts the pattern, so a patch holds anything from a
  few thin bundles to solid fibre;
* cells avoid fibre-dense patches (grey-matter islands), cluster, and change size with a field;
  cortical cells (and their size) follow layers along a depth axis, its vessels run radially;
* each cube set draws its own blur, noise level, tissue contrast, fibre tilt and shifts of
  density and size (:func:`~mtneuro_lab.data.sources.phantom_tissue.draw_set`), on top of v1's per-cube
  brightness and gain nuisance.

Labels are exact: each voxel's intensity is rendered from its own label
(:func:`~mtneuro_lab.data.sources.phantom.clean_image`), every cell is one 26-connected
component, and cube-level fractions equal the configured ones (times the set's shift).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from mtneuro_lab.data.sources.phantom import (
    AXON,
    BACKGROUND,
    CELL,
    VESSEL,
    _cell_template,
    _curve,
    _place_templates,
    _render,
    _strides,
    _Template,
    _tube_voxels,
    oriented_field,
    oriented_fields,
)
from mtneuro_lab.data.sources.phantom_fields import (
    CoarseField,
    as_shape3,
    node_positions,
    sample_points,
    section_field,
    smooth_field,
    two_scale_field,
)
from mtneuro_lab.data.sources.phantom_tissue import SetDraw, TissueConfig
from mtneuro_lab.errors import DataError

GENERATOR_VERSION = "v2"
_TEMPLATES = 48
#: log-normal spread of a single cell's radius around the local size
_CELL_JITTER = 0.16


@dataclass(frozen=True)
class Morphology:
    """What identifies a region beyond its composition (fixed: it is what makes the region).

    ``axons``: none | pencils | fibres; fibres run ``fibre_polar`` degrees from z, the pattern is
    a Gaussian of std ``along`` x ``across`` voxels. Fibres come in two families
    ``family_angle`` (a range, degrees) apart in-plane; a smooth field of amplitude ``balance``
    decides where one family dominates and where both cross. ``large_vessels`` of all vessels
    have a radius in ``large_radius``, the rest are capillaries. ``grey_matter`` in [0, 1]: how
    strongly cells avoid fibre-dense patches. ``layers``: cortical bands of cell density and size.
    """

    axons: str
    fibre_polar: float
    along: float
    across: float
    large_vessels: float
    large_radius: tuple[float, float]
    grey_matter: float
    family_angle: tuple[float, float] = (0.0, 0.0)
    balance: float = 0.0
    section_balance: float = 0.0
    layers: bool = False


MORPHOLOGY: dict[str, Morphology] = {
    "cortex": Morphology("none", 0.0, 0.0, 0.0, 0.02, (3.5, 4.5), 0.0, layers=True),
    "striatum": Morphology("pencils", 15.0, 60.0, 5.0, 0.04, (3.5, 5.5), 0.6),
    # vp and zi: two fibre families, 20-90 degrees apart (overlapping ranges, as their slice-wide
    # orientation coherence overlaps in the masks' vp and the phantom's zi: docs/phantom.md).
    # vp: the families segregate into patches of parallel tracts; zi: they cross within a
    # patch, but one dominates whole sections here and there (its slice-wide coherence varies
    # from crossing-low to single-family-high, over vp's range)
    "vp": Morphology("fibres", 85.0, 34.0, 2.8, 0.12, (4.0, 7.0), 0.6, (20.0, 65.0), 1.2, 0.4),
    "zi": Morphology("fibres", 85.0, 34.0, 2.8, 0.15, (5.0, 8.5), 0.4, (45.0, 90.0), 0.3, 1.0),
}


def seed_key(seed: int, region: str, x0: int, y0: int) -> int:
    """Stable 32-bit key of one v2 cube."""
    return zlib.crc32(f"phantom_xray/{GENERATOR_VERSION}/{seed}/{region}/{x0}/{y0}".encode())


def _unit(polar_deg: float, azimuth: float) -> np.ndarray:
    """(z, y, x) unit vector ``polar_deg`` from z, ``azimuth`` (radians) from x in-plane."""
    polar = np.radians(polar_deg)
    return np.array([np.cos(polar), np.sin(polar) * np.sin(azimuth), np.sin(polar) * np.cos(azimuth)])


# --------------------------------------------------------------------------- axons


def _fibre(rng: np.random.Generator, m: Morphology, azimuth: float, draw: SetDraw) -> tuple[np.ndarray, float, float]:
    """One fibre family's filter: direction (polar angle tilted per set, jittered per cube),
    lengths times the set's size scale."""
    direction = _unit(m.fibre_polar + draw.fibre_tilt + rng.normal(0.0, 5.0), azimuth).astype(np.float32)
    return direction, m.along * draw.radius_scale, m.across * draw.radius_scale


def _pencils(
    rng: np.random.Generator, shape: tuple[int, int, int], m: Morphology, density: CoarseField, draw: SetDraw
) -> np.ndarray:
    """Shot noise of sparse seeds (more where ``density`` is high) smeared along the fibre
    direction: round fascicles of assorted calibre running through the section."""
    n = max(int(np.prod(shape) * 4.5e-6), 8)
    seeds = sample_points(rng, density, n, 0, np.asarray(shape))
    volume = np.zeros(shape, dtype=np.float32)
    np.add.at(volume, tuple(seeds.T), rng.lognormal(0.0, 0.45, size=n).astype(np.float32))
    return oriented_field(volume, *_fibre(rng, m, rng.uniform(0, 2 * np.pi), draw))


def axon_pattern(
    rng: np.random.Generator,
    shape: tuple[int, int, int],
    m: Morphology,
    density: CoarseField,
    balance: CoarseField,
    draw: SetDraw,
) -> np.ndarray | None:
    """The region's fibre pattern (float32, about unit scale), None without axons. Pencils are
    seeded by ``density`` (fibre fields are modulated by it later, through the threshold); of
    two fibre families, ``first + b`` or ``second - b`` wins, ``b = balance`` (:func:`balance_field`).
    ``draw``: the set's tilt of the fibres against the section and scale of their calibre and length."""
    if m.axons == "none":
        return None
    if m.axons == "pencils":
        return _pencils(rng, shape, m, density, draw)
    azimuth = rng.uniform(0, 2 * np.pi)
    first_family = _fibre(rng, m, azimuth, draw)
    second_family = _fibre(rng, m, azimuth + np.radians(rng.uniform(*m.family_angle)), draw)
    filters = [first_family, second_family]
    first, second = oriented_fields(rng.standard_normal(shape, dtype=np.float32), filters)
    shift = balance.full()
    first += shift
    second -= shift
    np.maximum(first, second, out=first)
    return first


def balance_field(
    rng: np.random.Generator, shape: tuple[int, int, int], m: Morphology, patch: float, slab: float
) -> CoarseField:
    """Where one fibre family dominates: patches (``m.balance``) plus whole sections
    (``m.section_balance``), both changing along z within ``slab`` slices. Separate amplitudes,
    because whole-slice statistics see only the section part: a region whose families
    segregate into patches can look, slice-wide, like one whose families cross everywhere."""
    patches = smooth_field(rng, shape, (min(patch, slab), patch, patch)) * m.balance
    return patches + section_field(rng, shape, slab) * m.section_balance


# --------------------------------------------------------------------------- vessels


def _vessel_radius(rng: np.random.Generator, m: Morphology) -> float:
    if rng.random() < m.large_vessels:
        return round(2.0 * rng.uniform(*m.large_radius)) / 2.0
    return round(2.0 * (1.5 + 1.5 * rng.beta(1.2, 3.0))) / 2.0


def draw_vessels(
    rng: np.random.Generator,
    shape: tuple[int, int, int],
    target_voxels: int,
    density: CoarseField,
    m: Morphology,
    depth_axis: np.ndarray | None,
) -> np.ndarray:
    """Tubes along random curves that start where ``density`` is high, until exactly
    ``target_voxels`` (the last tube is shortened); cortical ones mostly run along ``depth_axis``."""
    mask = np.zeros(int(np.prod(shape)), dtype=bool)
    dims, strides = np.asarray(shape), _strides(shape)
    filled, starts = 0, np.empty((0, 3))
    while filled < target_voxels:
        if not len(starts):
            starts = sample_points(rng, density, 64, 0, dims).astype(np.float64)
        start, starts = starts[0], starts[1:]
        radius = _vessel_radius(rng, m)
        direction = rng.standard_normal(3)
        if depth_axis is not None and rng.random() < 0.6:
            direction = depth_axis + 0.25 * direction
        curve = _curve(rng, shape, radius, start=start, direction=direction)
        step = max(1, int(radius // 2))  # consecutive balls overlap: fewer of them, same tube
        flat = _tube_voxels(curve, radius, dims, strides, step)
        new = flat[~mask[flat]]
        if filled + new.size > target_voxels and len(curve) > 1:
            keep = max(1, int(len(curve) * (target_voxels - filled) / new.size))
            flat = _tube_voxels(curve[:keep], radius, dims, strides, step)
            new = flat[~mask[flat]][: target_voxels - filled]
        mask[new] = True
        filled += new.size
    return mask.reshape(shape)


# --------------------------------------------------------------------------- cells


def _templates(rng: np.random.Generator, radius: float, spread: float, shape: tuple[int, int, int]):
    """Ellipsoids whose radii span the local sizes the fields can ask for, smallest first."""
    strides = _strides(shape)
    sigma = float(np.hypot(spread, _CELL_JITTER))
    log_radii = np.log(radius) + np.linspace(-2.2, 2.2, _TEMPLATES) * sigma
    log_radii = np.clip(log_radii, np.log(1.5), np.log(14.0))
    made = [_cell_template(rng, float(np.exp(r)), strides, elongation=0.18) for r in log_radii]
    templates: list[_Template] = [t for t, _ in made]
    return templates, max(r for _, r in made), log_radii


def place_cells(
    rng: np.random.Generator,
    shape: tuple[int, int, int],
    blocked: np.ndarray,
    target_voxels: int,
    radius: float,
    density: CoarseField,
    size: CoarseField,
    size_spread: float,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Non-touching cells (v1's placement) with centres drawn ~ exp(``density``) and each cell's
    log radius ``size_spread * size`` (+ individual jitter) away from ``radius``."""
    templates, half, log_radii = _templates(rng, radius, size_spread, shape)
    if any(dim <= 2 * half for dim in shape):
        return np.empty(0, np.int64), np.empty(0, np.float32), 0
    high = np.asarray(shape) - half

    def propose(n: int) -> tuple[np.ndarray, np.ndarray]:
        points = sample_points(rng, density, n, half, high)
        wanted = np.log(radius) + size_spread * size.at(points) + _CELL_JITTER * rng.standard_normal(n)
        kinds = np.clip(np.searchsorted(log_radii, wanted), 0, len(templates) - 1)
        return (points[:, 0] * shape[1] + points[:, 1]) * shape[2] + points[:, 2], kinds

    return _place_templates(rng, shape, blocked, target_voxels, templates, half, propose)


def _layers(rng: np.random.Generator, shape: tuple[int, int, int], depth_axis: np.ndarray) -> CoarseField:
    """Cortical layers: a smooth periodic profile along the in-plane depth axis."""
    depth = np.tensordot(depth_axis.astype(np.float32), node_positions(shape), axes=1)
    period = rng.uniform(90.0, 140.0)
    phase = rng.uniform(0, 2 * np.pi)
    bands = np.sin(2 * np.pi * depth / period + phase) + 0.5 * np.sin(4 * np.pi * depth / period + 2 * phase)
    return CoarseField((bands / (bands.std() + 1e-12)).astype(np.float32), shape)


# --------------------------------------------------------------------------- cube


@dataclass
class TissueVolume:
    """The structures of one cube before rendering: labels and what the image is drawn from."""

    labels: np.ndarray
    texture: np.ndarray
    cell_idx: np.ndarray
    cell_values: np.ndarray
    cell_count: int


def build_tissue(
    region: str, key: int, shape: tuple[int, int, int], tissue: TissueConfig, draw: SetDraw
) -> TissueVolume:
    """Vessels, then cells (kept off vessels), then axons in the remaining background."""
    if region not in MORPHOLOGY:
        raise DataError(f"phantom: no tissue profile for region {region!r}; known: {sorted(MORPHOLOGY)}")
    shape = as_shape3(shape)
    m, base = MORPHOLOGY[region], tissue.region(region)
    rng = np.random.default_rng(key)
    total = int(np.prod(shape))
    depth_axis = _unit(90.0, rng.uniform(0, 2 * np.pi)) if m.layers else None

    def field() -> CoarseField:
        return two_scale_field(rng, shape, tissue.patch, tissue.slab)

    axon_density, cell_density, cell_size, vessel_density = (field() for _ in range(4))
    # without fibres the balance is unused, but drawn so those regions keep their random stream
    balance = balance_field(rng, shape, m, tissue.patch, tissue.slab) if m.axons == "fibres" else field()
    vessels = draw_vessels(rng, shape, round(base.vessel * total), tissue.vessel_spread * vessel_density, m, depth_axis)

    pattern = axon_pattern(rng, shape, m, tissue.axon_spread * axon_density, balance, draw)
    g = m.grey_matter
    cells_where = cell_density * np.sqrt(1.0 - g * g) + axon_density * (-g)
    if depth_axis is not None:
        layers = _layers(rng, shape, depth_axis)
        cells_where = cells_where + layers * 0.9
        cell_size = cell_size * np.sqrt(0.75) + layers * 0.5
    blocked = vessels.view(np.uint8)
    for axis in range(3):
        blocked = ndimage.maximum_filter1d(blocked, 3, axis=axis)
    cell_idx, cell_values, count = place_cells(
        rng,
        shape,
        blocked,
        round(base.cell * draw.cell_scale * total),
        base.cell_radius * draw.radius_scale,
        tissue.cell_spread * cells_where,
        cell_size,
        tissue.size_spread,
    )
    labels = np.zeros(shape, dtype=np.uint8)
    labels[vessels] = VESSEL
    labels.reshape(-1)[cell_idx] = CELL
    if pattern is None:
        return TissueVolume(labels, np.zeros(shape, np.float32), cell_idx, cell_values, count)

    n_axon = round(min(base.axon * draw.axon_scale, 0.95) * total)
    score = axon_density.full()
    score *= np.float32(tissue.axon_spread * (0.45 if m.axons == "pencils" else 1.0))
    score += pattern
    free = labels == BACKGROUND
    values = score[free]
    n_axon = min(n_axon, values.size)
    if n_axon:
        threshold = np.partition(values, values.size - n_axon)[values.size - n_axon]
        labels[free & (score >= threshold)] = AXON
    return TissueVolume(labels, pattern, cell_idx, cell_values, count)


def generate_cube(
    region: str, key: int, shape: tuple[int, int, int], tissue: TissueConfig, draw: SetDraw
) -> dict[str, np.ndarray]:
    """One v2 cube: ``image`` (uint8), ``pixel_labels`` (uint8, BossDB encoding), ``cell_count``."""
    volume = build_tissue(region, key, shape, tissue, draw)
    rng = np.random.default_rng([key, 1])
    image = _render(
        rng,
        volume.labels,
        volume.texture,
        volume.cell_idx,
        volume.cell_values,
        noise=draw.noise,
        blur=draw.blur,
        contrast=draw.contrast,
        drift=(tissue.drift[0], tissue.drift[1]),
    )
    return {"image": image, "pixel_labels": volume.labels, "cell_count": np.int64(volume.cell_count)}
