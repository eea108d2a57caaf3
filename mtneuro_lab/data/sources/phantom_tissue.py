"""``source.tissue.*``: what the v2 phantom's tissue looks like, and each cube set's own draw.

The v2 generator (:mod:`mtneuro_lab.data.sources.phantom_v2`) makes densities vary inside every
cube and between cube sets. Its knobs live here as a dataclass, so the config schema validates
them against this signature before any work and a bad value is a one-line error naming its key.

Per-region volume fractions sit between the paper's per-region percentages and the released
manual masks (``../shared/data/prasad2020_sparse_masks``), which disagree (the masks hold about
half the paper's cell volume and less vessel volume): every fraction stays within 15 % of the
paper's, and as close to the masks' as that allows (``benchmarks/bench_phantom.py`` measures
both; docs/phantom.md explains the compromise).
"""

from __future__ import annotations

import hashlib
import json
import zlib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from mtneuro_lab.config.schema import merge_dataclass
from mtneuro_lab.errors import ConfigError

REGIONS = ("cortex", "striatum", "vp", "zi")
#: part of every v2 cache digest: bump it when the generator's output changes for the same
#: settings (2: fields and brightness drifts change along z within a few slabs, session 5;
#: 3: vp and zi fibre arrangements overlap slice-wide, session 6)
GENERATOR_REVISION = 3


@dataclass
class RegionTissue:
    """One region's mean composition: volume fractions in [0, 1] and the median cell radius (voxels)."""

    vessel: float
    cell: float
    axon: float
    cell_radius: float


def _default(vessel: float, cell: float, axon: float, cell_radius: float) -> Any:
    return field(default_factory=lambda: RegionTissue(vessel, cell, axon, cell_radius))


@dataclass
class TissueConfig:
    """Knobs of the v2 phantom (``source.tissue.*``); spreads are standard deviations, >= 0.

    ``*_spread``: how strongly a smooth random field modulates the density (vessel, cell, axon)
    or the cell size inside a cube (0 = uniform, as the v1 phantom). Each field is the sum of
    patches about ``patch`` voxels across in-plane and of section-wide changes (whole sections
    differ, as between the real masks' slices); both change along z within about ``slab``
    slices. ``drift``: [shortest, longest] period (slices) of the per-slice brightness and gain
    drift. Both are short against a task's z splits (30-270 slices), so its train, val and test
    slabs are draws of one process: with 96-slice sections and drifts up to 4x the cube
    (session 4), ROI-C1's test slab of vp sat brighter than any of its training slices
    (docs/phantom.md). ``set_*``: each cube set
    (A, B, C, D) draws its own acquisition and location: blur sigma and noise level uniformly
    in the given [low, high] ranges, relative shifts of the axon and cell densities
    (``set_density_shift``), of the cell radius and fibre calibre (``set_size_shift``) and of
    the tissue contrast against background (``set_contrast_shift``), and a tilt of the fibres
    against the section (``set_fibre_tilt``, degrees): acquisitions differ in more than brightness.
    """

    cortex: RegionTissue = _default(0.0205, 0.043, 0.0, 4.1)
    striatum: RegionTissue = _default(0.0225, 0.053, 0.192, 4.9)
    vp: RegionTissue = _default(0.0402, 0.057, 0.62, 5.75)
    zi: RegionTissue = _default(0.047, 0.088, 0.56, 5.75)
    vessel_spread: float = 0.8
    cell_spread: float = 0.5
    size_spread: float = 0.12
    axon_spread: float = 1.0
    patch: float = 48.0
    slab: float = 8.0
    set_density_shift: float = 0.04
    set_size_shift: float = 0.04
    set_contrast_shift: float = 0.15
    set_fibre_tilt: float = 20.0
    set_blur: list[float] = field(default_factory=lambda: [0.6, 1.6])
    set_noise: list[float] = field(default_factory=lambda: [24.0, 60.0])
    drift: list[float] = field(default_factory=lambda: [8.0, 32.0])

    def __post_init__(self) -> None:
        for region in REGIONS:
            _check_region(getattr(self, region), f"source.tissue.{region}")
        for name in ("vessel_spread", "cell_spread", "size_spread", "axon_spread"):
            _check_nonnegative(getattr(self, name), f"source.tissue.{name}")
        for name in ("set_density_shift", "set_size_shift", "set_contrast_shift"):
            value = _check_nonnegative(getattr(self, name), f"source.tissue.{name}")
            if value >= 0.5:
                raise ConfigError(f"source.tissue.{name}: must be in [0, 0.5), got {value}")
        tilt = _check_nonnegative(self.set_fibre_tilt, "source.tissue.set_fibre_tilt")
        if tilt > 45:
            raise ConfigError(f"source.tissue.set_fibre_tilt: must be in [0, 45] degrees, got {tilt}")
        for name in ("patch", "slab"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value < 4:
                raise ConfigError(f"source.tissue.{name}: must be a length >= 4 voxels, got {value!r}")
        _check_range(self.set_blur, "source.tissue.set_blur", 0.0, 4.0)
        _check_range(self.set_noise, "source.tissue.set_noise", 0.0, 200.0)
        _check_range(self.drift, "source.tissue.drift", 2.0, 10000.0)

    def region(self, name: str) -> RegionTissue:
        return getattr(self, name)

    def digest(self) -> str:
        """Short stable hash of every setting: part of the cache path, so a change regenerates."""
        text = json.dumps({**asdict(self), "generator_revision": GENERATOR_REVISION}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:10]


def _check_nonnegative(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value) or value < 0:
        raise ConfigError(f"{key}: must be a number >= 0, got {value!r}")
    return float(value)


def _check_region(tissue: RegionTissue, key: str) -> None:
    for name in ("vessel", "cell", "axon"):
        value = getattr(tissue, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise ConfigError(f"{key}.{name}: a volume fraction must be in [0, 1], got {value!r}")
    total = tissue.vessel + tissue.cell + tissue.axon
    if total > 0.95:
        raise ConfigError(f"{key}: vessel + cell + axon must leave some background (<= 0.95), got {total:.3f}")
    radius = tissue.cell_radius
    if isinstance(radius, bool) or not isinstance(radius, (int, float)) or not 1.5 <= radius <= 12.0:
        raise ConfigError(f"{key}.cell_radius: must be in [1.5, 12] voxels, got {radius!r}")


def _check_range(value: Any, key: str, low: float, high: float) -> None:
    ok = isinstance(value, (list, tuple)) and len(value) == 2
    ok = ok and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    if not ok or not low <= value[0] <= value[1] <= high:
        raise ConfigError(f"{key}: must be [low, high] with {low} <= low <= high <= {high}, got {value!r}")


def tissue_config(value: TissueConfig | Mapping[str, Any] | None) -> TissueConfig:
    """``source.tissue`` (a mapping from the config, or None = defaults) as a checked TissueConfig."""
    if isinstance(value, TissueConfig):
        return value
    return merge_dataclass(TissueConfig, dict(value or {}), "source.tissue")


@dataclass(frozen=True)
class SetDraw:
    """What one cube set's acquisition and location change (drawn once per ``(seed, set)``)."""

    blur: float
    noise: float
    axon_scale: float
    cell_scale: float
    radius_scale: float
    contrast: float
    fibre_tilt: float


def draw_set(seed: int, set_name: str, tissue: TissueConfig) -> SetDraw:
    """The set's draw: deterministic per ``(seed, set_name)`` and the tissue settings."""
    rng = np.random.default_rng(zlib.crc32(f"phantom_xray/v2/set/{seed}/{set_name}".encode()))
    shift = tissue.set_density_shift
    return SetDraw(
        blur=float(rng.uniform(tissue.set_blur[0], tissue.set_blur[1])),
        noise=float(rng.uniform(tissue.set_noise[0], tissue.set_noise[1])),
        axon_scale=float(1.0 + rng.uniform(-shift, shift)),
        cell_scale=float(1.0 + rng.uniform(-shift, shift)),
        radius_scale=float(1.0 + rng.uniform(-tissue.set_size_shift, tissue.set_size_shift)),
        contrast=float(1.0 + rng.uniform(-tissue.set_contrast_shift, tissue.set_contrast_shift)),
        fibre_tilt=float(rng.uniform(-tissue.set_fibre_tilt, tissue.set_fibre_tilt)),
    )
