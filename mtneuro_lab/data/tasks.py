"""Task definitions: which cubes and slices form each split, and what the targets are.

A task turns ``(source, cube catalog)`` into :class:`SplitArrays` held in memory as uint8,
allocated once per split and filled cube by cube, so holding a split costs its uint8 bytes and
not a float copy. Casting, normalisation and augmentation happen later, per batch, on the
device the model runs on (see :mod:`mtneuro_lab.data.augment`).

Ranges are half-open ``[start, stop)`` everywhere: ROI-C1's paper ranges z_train 110-379,
z_val 380-409, z_test 420-470 are ``[110, 380)``, ``[380, 410)``, ``[420, 470)``.

A split entry names either a cube set (``{set: A, z: [..], regions: [..]}``) or, for a plain
file that is not a paper cube, an in-plane box in source coordinates (``{box: {x: [..], y:
[..]}, z: [..], regions: [name]}``; the region defaults to the catalog's first). Entries whose
x/y windows intersect are the same tissue: their z ranges must not overlap across splits and
test keeps ``test_buffer`` slices away from train/val. Windows that merely *touch* (a shared face
or corner over shared slices) are not independent either: they are listed in ``task.contacts``
and logged at start-up, and ``guard_px`` trims the touching sides of val/test windows (see
:mod:`mtneuro_lab.data.contacts`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mtneuro_lab.data.contacts import EVAL_SPLITS, Contact, Window, contact_between, find_contacts, trim_window
from mtneuro_lab.data.contract import Task
from mtneuro_lab.data.cubes import Cube, CubeCatalog
from mtneuro_lab.data.sources.base import VolumeSource
from mtneuro_lab.errors import ConfigError, DataError

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


@dataclass
class SplitArrays:
    """One split in memory: uint8 samples plus per-sample bookkeeping.

    ``images``: ``(N, H, W)`` for 2D tasks or ``(N, D, H, W)`` for 3D tasks, uint8.
    ``targets``: ``(N,)`` int64 class indices, or uint8 masks shaped like ``images``.
    ``regions``: ``(N,)`` region index of the cube each sample comes from.
    ``z``: ``(N,)`` first slice index of each sample (BossDB z).
    """

    images: np.ndarray
    targets: np.ndarray
    regions: np.ndarray
    z: np.ndarray
    cubes: list[str] = field(default_factory=list)
    cube_index: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def nbytes(self) -> int:
        return int(self.images.nbytes + self.targets.nbytes)


@dataclass(frozen=True)
class SplitPart:
    """One entry of a split: a cube set (all or some regions), or an x/y box, over a z range."""

    set_name: str
    z: tuple[int, int]
    regions: tuple[str, ...] | None = None
    box: tuple[tuple[int, int], tuple[int, int]] | None = None  # (x, y) when not a cube set


def _parse_box(value: Any, key: str) -> tuple[tuple[int, int], tuple[int, int]]:
    """``{x: [x0, x1], y: [y0, y1]}`` -> ((x0, x1), (y0, y1)), half-open, validated."""
    if not isinstance(value, Mapping) or set(value) != {"x", "y"}:
        raise ConfigError(f"{key}: expected {{x: [x0, x1], y: [y0, y1]}}, got {value!r}")
    out = []
    for axis in ("x", "y"):
        try:
            lo, hi = (int(v) for v in value[axis])
        except (TypeError, ValueError):
            raise ConfigError(f"{key}.{axis}: expected [start, stop), got {value[axis]!r}") from None
        if lo < 0 or hi <= lo:
            raise ConfigError(f"{key}.{axis}: expected [start, stop) with 0 <= start < stop, got [{lo}, {hi}]")
        out.append((lo, hi))
    return out[0], out[1]


def parse_split(name: str, entries: Iterable[Mapping[str, Any]], catalog: CubeCatalog) -> list[SplitPart]:
    parts = []
    for i, entry in enumerate(entries):
        key = f"task.splits.{name}[{i}]"
        entry = dict(entry)
        unknown = set(entry) - {"set", "box", "z", "regions"}
        if unknown:
            raise ConfigError(f"{key}: unknown key(s) {sorted(unknown)}; allowed: set, box, z, regions")
        if ("set" in entry) == ("box" in entry) or "z" not in entry:
            raise ConfigError(f"{key}: needs 'z' and exactly one of 'set' (a cube set) or 'box' ({{x, y}})")
        if "box" in entry:
            parts.append(_parse_box_part(entry, key, catalog))
            continue
        set_name = str(entry["set"])
        if set_name not in catalog.sets:
            raise ConfigError(f"{key}.set: unknown cube set {set_name!r}; known: {sorted(catalog.sets)}")
        z = parse_z(entry["z"], key)
        regions = entry.get("regions")
        if regions is not None:
            regions = tuple(str(r) for r in regions)
            for r in regions:
                catalog.cube(set_name, r)
        parts.append(SplitPart(set_name, z, regions))
    return parts


def parse_z(value: Any, key: str, axis: str = "z") -> tuple[int, int]:
    """A half-open ``[start, stop)`` range of ``<key>.<axis>`` (z by default; EM splits take x too)."""
    try:
        z = tuple(int(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}.{axis}: expected [start, stop), got {value!r}") from None
    if len(z) != 2 or z[0] < 0 or z[1] <= z[0]:
        raise ConfigError(f"{key}.{axis}: expected [start, stop) with 0 <= start < stop, got {list(value)}")
    return z


def _parse_box_part(entry: Mapping[str, Any], key: str, catalog: CubeCatalog) -> SplitPart:
    x, y = _parse_box(entry["box"], f"{key}.box")
    regions = entry.get("regions")
    if regions is not None:
        regions = tuple(str(r) for r in regions)
        if len(regions) != 1 or regions[0] not in catalog.regions:
            raise ConfigError(
                f"{key}.regions: a box entry takes one region of {list(catalog.regions)}, got {list(regions)}"
            )
    return SplitPart(f"box_x{x[0]}_y{y[0]}", parse_z(entry["z"], key), regions, (x, y))


def downsample_area(stack: np.ndarray, factor: int) -> np.ndarray:
    """Mean-pool the last two axes by ``factor`` (uint8 in, uint8 out), in slabs to bound memory."""
    if factor == 1:
        return np.ascontiguousarray(stack)
    *lead, h, w = stack.shape
    if h % factor or w % factor:
        raise DataError(f"tile of {h}x{w} is not divisible by downsample {factor}")
    flat = stack.reshape(-1, h, w)
    out = np.empty((flat.shape[0], h // factor, w // factor), dtype=np.uint8)
    for s in range(0, flat.shape[0], 32):
        block = np.asarray(flat[s : s + 32], dtype=np.float32)
        pooled = block.reshape(-1, h // factor, factor, w // factor, factor).mean(axis=(2, 4))
        out[s : s + 32] = np.rint(pooled).astype(np.uint8)
    return out.reshape(*lead, h // factor, w // factor)


def downsample_nearest(stack: np.ndarray, factor: int) -> np.ndarray:
    """Label downsampling: keep the centre-ish pixel of each block (labels must not be averaged)."""
    if factor == 1:
        return np.ascontiguousarray(stack)
    off = factor // 2
    return np.ascontiguousarray(stack[..., off::factor, off::factor])


class CubeTask(Task):
    """Common machinery: split parsing, overlap/buffer checks, contacts and guards, per-cube iteration.

    ``guard_px`` (full-resolution voxels, default 0 = off) trims that many voxels off every side
    of a val/test window that touches a training window. A sample is always one whole window
    (tile) of the training shape, and a trimmed window no longer holds one; it is not resized,
    padded or slid onto unannotated tissue, so its samples are left out of the split (logged).
    """

    def __init__(
        self,
        name: str,
        splits: Mapping[str, Sequence[Mapping[str, Any]]],
        downsample: int = 2,
        regions: Sequence[str] | None = None,
        test_buffer: int = 10,
        guard_px: int = 0,
    ) -> None:
        if downsample not in (1, 2, 4):
            raise ConfigError(f"task.downsample: must be one of 1, 2, 4, got {downsample}")
        if test_buffer < 0:
            raise ConfigError(f"task.test_buffer: must be >= 0, got {test_buffer}")
        if guard_px < 0:
            raise ConfigError(f"task.guard_px: must be >= 0, got {guard_px}")
        missing = [s for s in SPLITS if s not in splits]
        if missing:
            raise ConfigError(f"task.splits: missing split(s) {missing}; need train, val, test")
        extra = set(splits) - set(SPLITS)
        if extra:
            raise ConfigError(f"task.splits: unknown split(s) {sorted(extra)}; allowed: train, val, test")
        self.name = name
        self.downsample = int(downsample)
        self.test_buffer = int(test_buffer)
        self.guard_px = int(guard_px)
        self.region_filter = tuple(regions) if regions is not None else None
        self._raw_splits = {k: list(v) for k, v in splits.items()}
        self.catalog: CubeCatalog | None = None
        self.splits: dict[str, list[SplitPart]] = {}
        #: every val/test window touching a training window (set by :meth:`bind`)
        self.contacts: tuple[Contact, ...] = ()
        self._guarded: dict[str, list[Window]] = {}
        self._left_out: list[tuple[str, Cube, Cube, tuple[int, int]]] = []  # split, window, trimmed, z

    # -- binding and validation ------------------------------------------------------------
    def bind(self, catalog: CubeCatalog) -> CubeTask:
        """Resolve cube-set names against ``catalog`` and check the splits never leak."""
        self.catalog = catalog
        if self.region_filter is not None:
            for r in self.region_filter:
                if r not in catalog.regions:
                    raise ConfigError(f"task.regions: unknown region {r!r}; known: {list(catalog.regions)}")
        self.splits = {k: parse_split(k, v, catalog) for k, v in self._raw_splits.items()}
        for k, parts in self.splits.items():
            if not parts:
                raise ConfigError(f"task.splits.{k}: is empty")
        self._check_disjoint()
        self.contacts = find_contacts({s: self._windows(s) for s in SPLITS})
        self._apply_guard()
        return self

    def _apply_guard(self) -> None:
        """Trim touching sides of val/test windows by ``guard_px``; leave out windows left partial."""
        self._guarded, self._left_out = {}, []
        if not self.guard_px:
            return
        cube, _ = self._windows("train")[0]
        tile_h, tile_w = cube.y[1] - cube.y[0], cube.x[1] - cube.x[0]
        if 2 * self.guard_px >= min(tile_h, tile_w):
            raise ConfigError(
                f"task.guard_px: must be < half the {tile_h}x{tile_w} tile (full resolution), got {self.guard_px}"
            )
        train = self._windows("train")
        for split in EVAL_SPLITS:
            kept = []
            for cube, z in self._windows(split):
                sides = {s for t in train if (c := contact_between(split, (cube, z), t)) for s in c.sides}
                if sides:  # a sample is a whole window: a trimmed one holds no whole tile
                    self._left_out.append((split, cube, trim_window(cube, sides, self.guard_px), z))
                else:
                    kept.append((cube, z))
            if not kept:
                raise ConfigError(
                    f"task.guard_px: {self.guard_px} px guards leave no whole {split} window "
                    f"(every {split} window touches a training window); use task.guard_px=0"
                )
            self._guarded[split] = kept

    def log_contacts(self) -> None:
        """WARNING lines naming each touching window and each window the guard leaves out."""
        for contact in self.contacts:
            log.warning(contact.describe(self.name))
        for split, cube, trimmed, z in self._left_out:
            log.warning(
                "%s: task.guard_px=%d trims %s window %s to x%s y%s, less than a whole tile: its %d "
                "slices z[%d, %d) are left out of %s",
                self.name,
                self.guard_px,
                split,
                cube.key,
                list(trimmed.x),
                list(trimmed.y),
                z[1] - z[0],
                z[0],
                z[1],
                split,
            )

    def _slabs(self, split: str) -> list[Window]:
        """The windows a split's samples are cut from: :meth:`_windows` minus those the guard leaves out."""
        return self._guarded.get(split) or self._windows(split)

    def _windows(self, split: str) -> list[Window]:
        """Every configured window of a split (cube or box, region, z range), before any guard."""
        assert self.catalog is not None, "call bind() first"
        out = []
        for part in self.splits[split]:
            for region in self.regions_of(part):
                if part.box is not None:
                    out.append((Cube(part.set_name, region, *part.box), part.z))
                else:
                    out.append((self.catalog.cube(part.set_name, region), part.z))
        return out

    def regions_of(self, part: SplitPart) -> tuple[str, ...]:
        assert self.catalog is not None
        if part.box is not None:
            chosen = part.regions or self.catalog.regions[:1]
        else:
            chosen = part.regions or tuple(self.catalog.sets[part.set_name])
        if self.region_filter is not None:
            chosen = tuple(r for r in chosen if r in self.region_filter)
        return tuple(r for r in self.catalog.regions if r in chosen)

    def _check_disjoint(self) -> None:
        """Same tissue (intersecting x/y windows) in two splits: z ranges must not overlap, and
        test keeps a buffer. Different cubes (e.g. A's and D's cortex: same x, other y) are free."""

        def intersects(a: Cube, b: Cube) -> bool:
            return a.x[0] < b.x[1] and b.x[0] < a.x[1] and a.y[0] < b.y[1] and b.y[0] < a.y[1]

        pairs = [("train", "val", 0), ("train", "test", self.test_buffer), ("val", "test", self.test_buffer)]
        for a, b, gap in pairs:
            for cube_a, za in self._windows(a):
                for cube_b, zb in self._windows(b):
                    if not intersects(cube_a, cube_b):
                        continue
                    distance = max(zb[0] - za[1], za[0] - zb[1])
                    if distance < gap:
                        what = "overlap" if distance < 0 else f"are only {distance} slices apart"
                        raise ConfigError(
                            f"task.splits: {a} z{list(za)} and {b} z{list(zb)} {what} in cube "
                            f"{cube_a.region} x{cube_a.x[0]} y{cube_a.y[0]}"
                            + ("" if cube_a == cube_b else f" (overlapping {cube_b.key} x{cube_b.x[0]} y{cube_b.y[0]})")
                            + f"; need a gap of >= {gap} slices"
                        )

    def check_extent(self, z_extent: tuple[int, int] | None) -> None:
        """Fail early if a split asks for slices the source does not have."""
        if z_extent is None:
            return
        for split, parts in self.splits.items():
            for part in parts:
                if part.z[0] < z_extent[0] or part.z[1] > z_extent[1]:
                    raise ConfigError(
                        f"task.splits.{split}: z{list(part.z)} lies outside the source's z range {list(z_extent)}"
                    )

    def check_source(self, source: VolumeSource) -> None:
        """Fail before any read if a split needs slices (z) or windows (x/y) the source lacks.

        Sources with a bounded box expose ``extent = (x, y, z)`` ranges (``source=local``);
        others may expose only ``z_extent``.
        """
        extent = getattr(source, "extent", None)
        self.check_extent(getattr(source, "z_extent", None) or (extent[2] if extent is not None else None))
        if extent is None:
            return
        (sx, sy, _) = extent
        for split in self.splits:
            for cube, _z in self._windows(split):
                if cube.x[0] < sx[0] or cube.x[1] > sx[1] or cube.y[0] < sy[0] or cube.y[1] > sy[1]:
                    raise ConfigError(
                        f"task.splits.{split}: {cube.key} x{list(cube.x)} y{list(cube.y)} lies outside the "
                        f"source's box x{list(sx)} y{list(sy)} (for source=local set source.origin)"
                    )

    # -- building --------------------------------------------------------------------------
    def build(self, split: str, source: VolumeSource) -> SplitArrays:  # pragma: no cover - abstract
        raise NotImplementedError

    def sample_shape(self) -> tuple[int, ...]:
        """Spatial shape of one sample (after downsampling), known before any data is read."""
        assert self.catalog is not None, "call bind() first"
        cube, _ = self._slabs("train")[0]
        return ((cube.y[1] - cube.y[0]) // self.downsample, (cube.x[1] - cube.x[0]) // self.downsample)

    @property
    def num_classes(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def class_names(self) -> list[str]:  # pragma: no cover - abstract
        raise NotImplementedError


class RegionClassificationTask(CubeTask):
    """Task 1 (ROI-C1/C2/C3): each slice of a cube is one tile labelled by its brain region.

    ``label_mode="cube"`` labels a tile by the region of the cube it comes from.
    ``label_mode="roi_majority"`` (the reference code's way) takes the majority value of the
    ``roi_labels`` channel over the tile and drops tiles whose majority is unlabelled (0)
    instead of counting them as cortex.
    """

    kind = "classification"

    def __init__(
        self,
        name: str,
        splits: Mapping[str, Sequence[Mapping[str, Any]]],
        downsample: int = 2,
        regions: Sequence[str] | None = None,
        test_buffer: int = 10,
        label_mode: str = "cube",
        guard_px: int = 0,
    ) -> None:
        super().__init__(name, splits, downsample, regions, test_buffer, guard_px)
        if label_mode not in ("cube", "roi_majority"):
            raise ConfigError(f"task.label_mode: must be 'cube' or 'roi_majority', got {label_mode!r}")
        self.label_mode = label_mode

    @property
    def class_names(self) -> list[str]:
        assert self.catalog is not None
        return list(self.catalog.regions)

    def bind(self, catalog: CubeCatalog) -> RegionClassificationTask:
        """As :meth:`CubeTask.bind`, plus: every tile of every split has one in-plane shape."""
        super().bind(catalog)
        shapes = {(c.y[1] - c.y[0], c.x[1] - c.x[0]): (s, c.key) for s in SPLITS for c, _ in self._slabs(s)}
        if len(shapes) > 1:
            described = ", ".join(f"{s}/{k} {h}x{w}" for (h, w), (s, k) in shapes.items())
            raise ConfigError(f"task.splits: tiles must share one in-plane shape, got {described}")
        return self

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def build(self, split: str, source: VolumeSource) -> SplitArrays:
        assert self.catalog is not None
        slabs = self._slabs(split)
        n = sum(z[1] - z[0] for _, z in slabs)
        first = slabs[0][0]
        h = (first.y[1] - first.y[0]) // self.downsample
        w = (first.x[1] - first.x[0]) // self.downsample
        images = np.empty((n, h, w), dtype=np.uint8)
        targets = np.empty(n, dtype=np.int64)
        regions = np.empty(n, dtype=np.int64)
        zs = np.empty(n, dtype=np.int64)
        cube_index = np.empty(n, dtype=np.int64)
        keep = np.ones(n, dtype=bool)
        row = 0
        for ci, (cube, z) in enumerate(slabs):
            stack = source.cutout("image", cube.x, cube.y, z)
            count = z[1] - z[0]
            images[row : row + count] = downsample_area(stack, self.downsample)
            region_index = self.catalog.region_index(cube.region)
            regions[row : row + count] = region_index
            targets[row : row + count] = region_index
            if self.label_mode == "roi_majority":
                labels, ok = self._majority_labels(source, cube, z)
                targets[row : row + count] = labels
                keep[row : row + count] = ok
            zs[row : row + count] = np.arange(z[0], z[1])
            cube_index[row : row + count] = ci
            row += count
        if not keep.all():
            log.info(
                "%s/%s: dropped %d tiles whose roi_labels majority is unlabelled", self.name, split, int((~keep).sum())
            )
            images, targets, regions = images[keep], targets[keep], regions[keep]
            zs, cube_index = zs[keep], cube_index[keep]
        return SplitArrays(images, targets, regions, zs, [c.key for c, _ in slabs], cube_index)

    def _majority_labels(self, source: VolumeSource, cube: Cube, z: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        assert self.catalog is not None
        roi = source.cutout("roi_labels", cube.x, cube.y, z)
        id_to_class = {
            v: self.catalog.region_index(k) for k, v in self.catalog.roi_ids.items() if k in self.catalog.regions
        }
        majority = np.empty(roi.shape[0], dtype=np.int64)
        for s in range(0, roi.shape[0], 16):  # bounded memory: 16 tiles at a time
            flat = np.asarray(roi[s : s + 16]).reshape(-1, roi.shape[1] * roi.shape[2])
            values, inverse = np.unique(flat, return_inverse=True)
            rows = np.repeat(np.arange(flat.shape[0]) * len(values), flat.shape[1])
            counts = np.bincount(rows + inverse.ravel(), minlength=flat.shape[0] * len(values))
            counts = counts.reshape(flat.shape[0], len(values))
            majority[s : s + 16] = values[counts.argmax(axis=1)]  # ties: the smallest value
        labels = np.array([id_to_class.get(int(m), -1) for m in majority], dtype=np.int64)
        return labels, labels >= 0


def describe_counts(task: CubeTask, arrays: Mapping[str, SplitArrays]) -> str:
    """A one-paragraph summary of samples per split and region, printed at setup."""
    assert task.catalog is not None
    lines = []
    for split, arr in arrays.items():
        per_region = {r: int((arr.regions == i).sum()) for i, r in enumerate(task.catalog.regions)}
        per_region = {k: v for k, v in per_region.items() if v}
        shape = "x".join(str(s) for s in arr.images.shape[1:])
        lines.append(f"{task.name}/{split}: {len(arr)} samples of {shape} ({per_region})")
    return "; ".join(lines)
