"""Dataclass schemas of config sections whose values are used below the run (data, decoding, perf).

They live here, at the bottom, so that :mod:`mtneuro_lab.config.schema` validates them without
importing the code that uses them: ``data.augment.*`` (:class:`AugmentConfig`, used by
:mod:`mtneuro_lab.data.augment`), ``task.postprocess.*`` (:class:`PostprocessConfig`, used by
:mod:`mtneuro_lab.decoding.postprocess`) and ``perf.*`` (:class:`PerfConfig`, applied by
:mod:`mtneuro_lab.perf`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from mtneuro_lab.errors import ConfigError


@dataclass
class AugmentConfig:
    """Training-time augmentation applied by the datamodule after transfer to the device."""

    hflip: bool = True
    vflip: bool = True
    rot90: bool = True
    intensity_jitter: float = 0.0  # max relative change of contrast and brightness


#: waterz scoring functions shipped precompiled (no C++ compiler needed at run time)
SCORING = {
    "mean": "OneMinus<MeanAffinity<RegionGraphType, ScoreValue>>",
    "median": "OneMinus<HistogramQuantileAffinity<RegionGraphType, 50, ScoreValue, 256, false>>",
}


#: what ``task.postprocess.select`` may be: search the grid on validation, or use the fixed values
SELECT_MODES = ("val", "fixed")


def _default_thresholds() -> list[float]:
    return [0.02, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]


@dataclass
class PostprocessGrid:
    """``task.postprocess.grid.*``: the values searched on the validation volume (``select=val``).

    Affinities: every waterz ``threshold`` comes from ONE agglomeration pass (the fragments and
    the merge order are shared). BC/BCD: every pair of ``seed_foreground`` x ``mask_foreground``
    is one candidate; each seed value floods once and its mask values are cuts of that flood
    (the other seeded-watershed values stay as configured).
    """

    threshold: list[float] = field(default_factory=_default_thresholds)
    seed_foreground: list[float] = field(default_factory=lambda: [0.8, 0.9])
    mask_foreground: list[float] = field(default_factory=lambda: [0.5, 0.7, 0.85])

    def __post_init__(self) -> None:
        for name in ("threshold", "seed_foreground", "mask_foreground"):
            values = list(getattr(self, name))
            if not values:
                raise ConfigError(f"task.postprocess.grid.{name}: empty; give at least one value in [0, 1]")
            bad = [v for v in values if not 0.0 <= float(v) <= 1.0]
            if bad:
                raise ConfigError(f"task.postprocess.grid.{name}: values must lie in [0, 1], got {bad[0]}")
            if len(set(values)) != len(values):
                raise ConfigError(f"task.postprocess.grid.{name}: values repeat in {values}")


@dataclass
class PostprocessConfig:
    """``task.postprocess.*``: how predictions become instances (thresholds are probabilities).

    Affinities: ``threshold`` is waterz's agglomeration threshold (regions merge while
    ``1 - score(affinities between them)`` is below it); ``aff_low``/``aff_high`` bound the
    initial zwatershed; ``scoring`` is mean or median affinity of the boundary.
    BC/BCD: seeds where foreground > ``seed_foreground``, contour < ``seed_contour`` (and
    distance > ``seed_distance`` for BCD), seeds under ``min_seed_size`` voxels dropped; the
    watershed floods where foreground > ``flood_foreground`` and the instances are then cut to
    where foreground > ``mask_foreground`` (the mask is applied after the flood, so every mask
    threshold of a search shares one flood per seed setting; a piece the mask cuts off keeps
    its instance's id). Then, for every kind, segments
    under ``merge_size`` voxels join the neighbour they are most strongly connected to (one
    round; mean affinity across the contact, or contact area for BC/BCD) and segments still
    under ``min_size`` voxels are removed (set to 0).

    ``select=val`` searches ``grid`` on the validation volume by the task's ``metric`` and
    applies the chosen values to the test volume; ``select=fixed`` applies the values above.
    """

    select: str = "val"  # val | fixed (checked in __post_init__: OmegaConf has no Literal)
    threshold: float = 0.5
    aff_low: float = 0.0001
    aff_high: float = 0.9999
    scoring: str = "mean"  # mean | median
    seed_foreground: float = 0.9
    seed_contour: float = 0.8
    seed_distance: float = 0.5
    flood_foreground: float = 0.5
    mask_foreground: float = 0.85
    min_seed_size: int = 32
    merge_size: int = 0
    min_size: int = 0
    grid: PostprocessGrid = field(default_factory=PostprocessGrid)

    def __post_init__(self) -> None:
        if isinstance(self.grid, Mapping):  # built from a plain mapping (not through OmegaConf)
            try:
                self.grid = PostprocessGrid(**self.grid)
            except TypeError as err:
                raise ConfigError(f"task.postprocess.grid: {err}") from None
        if self.select not in SELECT_MODES:
            raise ConfigError(f"task.postprocess.select: must be one of {', '.join(SELECT_MODES)}, got {self.select!r}")
        bounded = (
            "threshold",
            "aff_low",
            "aff_high",
            "seed_foreground",
            "seed_contour",
            "flood_foreground",
            "mask_foreground",
        )
        for name in bounded:
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"task.postprocess.{name}: must lie in [0, 1], got {value}")
        if not -1.0 <= self.seed_distance <= 1.0:
            raise ConfigError(f"task.postprocess.seed_distance: must lie in [-1, 1], got {self.seed_distance}")
        if self.aff_low >= self.aff_high:
            raise ConfigError(f"task.postprocess.aff_low: must be below aff_high ({self.aff_high}), got {self.aff_low}")
        if self.scoring not in SCORING:
            raise ConfigError(f"task.postprocess.scoring: must be one of {', '.join(SCORING)}, got {self.scoring!r}")
        for name in ("min_seed_size", "merge_size", "min_size"):
            if getattr(self, name) < 0:
                raise ConfigError(f"task.postprocess.{name}: must be >= 0, got {getattr(self, name)}")
        # the mask is cut from the flood: a mask below the flooded region would cut nothing
        masks = [("mask_foreground", self.mask_foreground)]
        masks += [("grid.mask_foreground", float(m)) for m in self.grid.mask_foreground]
        for name, value in masks:
            if value < self.flood_foreground:
                raise ConfigError(
                    f"task.postprocess.{name}: {value} is below flood_foreground ({self.flood_foreground}); "
                    "the mask is applied after the flood, so lower task.postprocess.flood_foreground"
                )


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass
class PerfConfig:
    """``perf.*`` (top level): speed options that never change what is computed."""

    compile: bool = False
    compile_mode: str = "default"
    channels_last: bool = False
    data_on_device: bool = False
    memory_check: bool = True  # refuse a batch whose step would not fit in memory (mtneuro_lab/memcheck.py)

    def __post_init__(self) -> None:
        if self.compile_mode not in COMPILE_MODES:
            raise ConfigError(
                f"perf.compile_mode: must be one of {', '.join(COMPILE_MODES)}, got {self.compile_mode!r}"
            )
