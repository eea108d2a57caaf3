"""``PhantomXraySource``: the phantom cubes at the paper's cube coordinates, generated on first
use by the v2 (default, :mod:`~mtneuro_lab.data.sources.phantom_v2`) or v1
(:mod:`~mtneuro_lab.data.sources.phantom`) generator and cached on disk."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from mtneuro_lab.data import cache
from mtneuro_lab.data.sources import phantom, phantom_v2
from mtneuro_lab.data.sources.base import Range, VolumeSource, as_range
from mtneuro_lab.data.sources.phantom import DEFAULT_ROI_IDS
from mtneuro_lab.data.sources.phantom_tissue import TissueConfig, draw_set, tissue_config
from mtneuro_lab.errors import ConfigError, DataError


@dataclass(frozen=True)
class _CubeBox:
    region: str
    x: Range
    y: Range

    @property
    def name(self) -> str:
        return f"{self.region}_x{self.x[0]}_y{self.y[0]}"


#: ``source.generator``: v2 (default) varies tissue inside cubes and between sets; v1 is the
#: uniform phantom, kept byte-identical for tests that pin old behaviour
GENERATORS = ("v1", "v2")


class PhantomXraySource(VolumeSource):
    """Serves phantom cubes at the paper's cube coordinates (BossDB frame).

    Any cutout lying inside one known cube (a region's x/y window of any cube set, over
    ``z_extent``) is answered; the cube is generated on first use and cached under
    ``<cache_dir>/phantom_xray/<version>/seed<seed>/<region>_x<x0>_y<y0>_z<z0>-<z1>/``, where
    ``<version>`` is ``v1``, or ``v2-<digest of source.tissue>`` so changed settings regenerate.
    A v2 cube belongs to the first cube set (by name) listing it, whose draw it uses.
    ``pixel_labels`` and ``roi_labels`` are returned as uint8 (BossDB serves uint64; the
    values are identical and a cube costs 8x less memory).

    ``downsample_cache`` is accepted so one source config schema fits every source; the phantom
    is generated at full resolution only, so ``True`` is rejected.
    """

    def __init__(
        self,
        cubes: Mapping[str, Mapping[str, Mapping[str, Sequence[int]]]],
        regions: Sequence[str] = ("cortex", "striatum", "vp", "zi"),
        roi_ids: Mapping[str, int] | None = None,
        seed: int = 0,
        cache_dir: str = "~/.cache/mtneuro_lab",
        z_extent: Sequence[int] = (100, 480),
        downsample_cache: bool = False,
        generator: Literal["v1", "v2"] = "v2",
        tissue: TissueConfig | Mapping[str, Any] | None = None,
    ) -> None:
        if downsample_cache:
            raise ConfigError("source.downsample_cache: not supported by the phantom source")
        if generator not in GENERATORS:
            raise ConfigError(f"source.generator: must be one of {', '.join(GENERATORS)}, got {generator!r}")
        self.generator = generator
        self.tissue = tissue_config(tissue)
        version = phantom.GENERATOR_VERSION if generator == "v1" else f"v2-{self.tissue.digest()}"
        self.regions = tuple(str(r) for r in regions)
        self.roi_ids = {str(k): int(v) for k, v in dict(roi_ids or DEFAULT_ROI_IDS).items()}
        self.seed = int(seed)
        self.z = as_range(tuple(z_extent), "source.z_extent")
        self.version = version
        self.root = Path(cache_dir).expanduser() / "phantom_xray" / version / f"seed{self.seed}"
        self.sets = self._parse_cubes(cubes)
        self.set_of: dict[_CubeBox, str] = {}
        for set_name in sorted(self.sets):
            for box in self.sets[set_name].values():
                self.set_of.setdefault(box, set_name)
        self.boxes = sorted(
            {box for members in self.sets.values() for box in members.values()},
            key=lambda b: b.name,
        )
        self._loaded: dict[_CubeBox, dict[str, np.ndarray]] = {}

    def _parse_cubes(self, cubes: Mapping) -> dict[str, dict[str, _CubeBox]]:
        sets: dict[str, dict[str, _CubeBox]] = {}
        for set_name, members in dict(cubes).items():
            sets[str(set_name)] = {}
            for region, box in dict(members).items():
                key = f"source.cubes.{set_name}.{region}"
                region = str(region)
                if region not in self.regions or region not in self.roi_ids:
                    raise ConfigError(f"{key}: unknown region {region!r}; known: {list(self.regions)}")
                if region not in phantom.PROFILES:
                    raise ConfigError(f"{key}: the phantom has no tissue profile for {region!r}")
                try:
                    x = as_range(tuple(box["x"]), f"{key}.x")
                    y = as_range(tuple(box["y"]), f"{key}.y")
                except (KeyError, TypeError) as err:
                    raise ConfigError(f"{key}: expected {{x: [x0, x1], y: [y0, y1]}}, got {box!r}") from err
                except DataError as err:
                    raise ConfigError(str(err)) from None
                sets[str(set_name)][region] = _CubeBox(region, x, y)
        return sets

    @property
    def z_extent(self) -> Range:
        """The slices every phantom cube spans: tasks check their z splits against it up front."""
        return self.z

    def describe(self) -> str:
        cubes = f"{len(self.boxes)} cubes, z={list(self.z)}"
        return f"PhantomXraySource({self.version}, seed={self.seed}, {cubes}, cache={self.root})"

    def cube_dir(self, box: _CubeBox) -> Path:
        return self.root / f"{box.name}_z{self.z[0]}-{self.z[1]}"

    def _find(self, channel: str, x: Range, y: Range, z: Range) -> _CubeBox:
        if self.z[0] <= z[0] and z[1] <= self.z[1]:
            for box in self.boxes:
                inside_x = box.x[0] <= x[0] and x[1] <= box.x[1]
                if inside_x and box.y[0] <= y[0] and y[1] <= box.y[1]:
                    return box
        raise DataError(
            f"phantom: {channel} cutout x={list(x)} y={list(y)} z={list(z)} is not inside any "
            f"known cube (z extent {list(self.z)}); phantom data exists only for configured cubes"
        )

    def _ensure_cached(self, box: _CubeBox) -> Path:
        """Generate ``box`` once and store it; later calls (any process) find it on disk."""
        directory = self.cube_dir(box)
        roi_id = self.roi_ids[box.region]
        paths = {name: directory / f"{name}.npy" for name in self.channels}
        meta = {
            "generator": f"phantom_xray/{self.version}",
            "seed": self.seed,
            "region": box.region,
            "x": list(box.x),
            "y": list(box.y),
            "z": list(self.z),
        }
        shape = (self.z[1] - self.z[0], box.y[1] - box.y[0], box.x[1] - box.x[0])
        if not (cache.has_array(paths["image"]) and cache.has_array(paths["pixel_labels"])):
            cube = self._generate(box, shape)
            count = int(cube["cell_count"])
            cache.save_array(paths["image"], cube["image"], {**meta, "channel": "image"})
            cache.save_array(
                paths["pixel_labels"],
                cube["pixel_labels"],
                {**meta, "channel": "pixel_labels", "cell_count": count},
            )
        # roi ids come from config, not the generator: rewrite when the mapping changes
        roi_path = paths["roi_labels"]
        if not cache.has_array(roi_path) or cache.read_meta(roi_path).get("roi_id") != roi_id:
            cache.save_array(
                paths["roi_labels"],
                np.full(shape, roi_id, dtype=np.uint8),
                {**meta, "channel": "roi_labels", "roi_id": roi_id},
            )
        return directory

    def _generate(self, box: _CubeBox, shape: tuple[int, int, int]) -> dict[str, np.ndarray]:
        if self.generator == "v1":
            return phantom.generate_cube(box.region, phantom.seed_key(self.seed, box.region, box.x[0], box.y[0]), shape)
        key = phantom_v2.seed_key(self.seed, box.region, box.x[0], box.y[0])
        draw = draw_set(self.seed, self.set_of[box], self.tissue)
        return phantom_v2.generate_cube(box.region, key, shape, self.tissue, draw)

    def _cube(self, box: _CubeBox) -> dict[str, np.ndarray]:
        if box not in self._loaded:
            directory = self._ensure_cached(box)
            self._loaded[box] = {name: cache.load_array(directory / f"{name}.npy") for name in self.channels}
        return self._loaded[box]

    def cutout(self, channel: str, x: Range, y: Range, z: Range) -> np.ndarray:
        """Read-only ``(z, y, x)`` view of ``channel``; the range must lie inside one known cube."""
        self.check_channel(channel)
        x, y, z = as_range(x, "x"), as_range(y, "y"), as_range(z, "z")
        box = self._find(channel, x, y, z)
        array = self._cube(box)[channel]
        return array[
            z[0] - self.z[0] : z[1] - self.z[0],
            y[0] - box.y[0] : y[1] - box.y[0],
            x[0] - box.x[0] : x[1] - box.x[0],
        ]

    def cell_count(self, set_name: str, region: str) -> int:
        """Cells the generator placed in a cube (= 26-connected components of class 2)."""
        try:
            box = self.sets[set_name][region]
        except KeyError:
            raise DataError(f"phantom: no cube {set_name}/{region}") from None
        directory = self._ensure_cached(box)
        return int(cache.read_meta(directory / "pixel_labels.npy")["cell_count"])
