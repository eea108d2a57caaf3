"""Cube sets and region names.

The coordinates themselves live in one place, ``mtneuro_lab/conf/cubes/paper.yaml`` (so they are part of
every composed config and saved with each run); this module turns that config into typed
:class:`Cube` objects and validates it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mtneuro_lab.errors import ConfigError


@dataclass(frozen=True)
class Cube:
    """One annotated cube: a region's 256x256 in-plane window of a cube set."""

    set_name: str
    region: str
    x: tuple[int, int]
    y: tuple[int, int]

    @property
    def key(self) -> str:
        return f"{self.set_name}/{self.region}"


@dataclass(frozen=True)
class CubeCatalog:
    """All cube sets of a dataset plus the region order used for class indices."""

    regions: tuple[str, ...]
    roi_ids: Mapping[str, int]
    sets: Mapping[str, Mapping[str, Cube]]

    def cube(self, set_name: str, region: str) -> Cube:
        if set_name not in self.sets:
            raise ConfigError(f"cubes.sets: unknown cube set {set_name!r}; known: {sorted(self.sets)}")
        if region not in self.sets[set_name]:
            raise ConfigError(
                f"cubes.sets.{set_name}: no cube for region {region!r}; has: {sorted(self.sets[set_name])}"
            )
        return self.sets[set_name][region]

    def region_index(self, region: str) -> int:
        return self.regions.index(region)


def _pair(value: Any, key: str) -> tuple[int, int]:
    try:
        start, stop = (int(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: expected [start, stop], got {value!r}") from None
    if start < 0 or stop <= start:
        raise ConfigError(f"{key}: expected 0 <= start < stop, got [{start}, {stop}]")
    return start, stop


def catalog_from_config(cfg: Mapping[str, Any]) -> CubeCatalog:
    """Build a :class:`CubeCatalog` from the ``cubes`` config section."""
    regions = tuple(str(r) for r in cfg["regions"])
    roi_ids = {str(k): int(v) for k, v in dict(cfg["roi_ids"]).items()}
    missing = [r for r in regions if r not in roi_ids]
    if missing:
        raise ConfigError(f"cubes.roi_ids: no id for region(s) {missing}")
    sets: dict[str, dict[str, Cube]] = {}
    for set_name, members in dict(cfg["sets"]).items():
        sets[str(set_name)] = {}
        for region, box in dict(members).items():
            if region not in regions:
                raise ConfigError(f"cubes.sets.{set_name}.{region}: unknown region; known: {list(regions)}")
            key = f"cubes.sets.{set_name}.{region}"
            sets[str(set_name)][str(region)] = Cube(
                str(set_name), str(region), _pair(box["x"], f"{key}.x"), _pair(box["y"], f"{key}.y")
            )
    return CubeCatalog(regions=regions, roi_ids=roi_ids, sets=sets)
