"""``source=local``: volumes from files the user downloaded.

Each channel name (``image``, ``pixel_labels``, ``roi_labels`` or any other name a task asks
for) maps to one file holding a ``(z, y, x)`` volume: ``.npy``, ``.npz``, multi-page TIFF,
HDF5, zarr, or a folder of 2D slices (PNG/TIFF, sorted naturally: ``s2.png`` before
``s10.png``). ``origin`` is the BossDB coordinate ``[x, y, z]`` of the files' first voxel, so a
downloaded cutout answers task requests in the dataset's own frame.

Construction only reads headers (the CLI builds sources in a preflight): it checks that files
and keys exist, that dtypes fit (``image`` uint8, every other channel integer labels) and that
all channels share one shape. Cutouts read lazily: ``.npy`` is memory-mapped, HDF5 and zarr are
sliced, TIFF reads only the requested pages, slice folders read only the requested files.
``.npz`` members cannot be sliced on disk, so they are loaded whole on first use.
"""

from __future__ import annotations

import re
import zipfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mtneuro_lab.data.sources.base import Range, VolumeSource, as_range
from mtneuro_lab.errors import ConfigError, DataError

SLICE_SUFFIXES = (".png", ".tif", ".tiff")
_PIL_DTYPES = {
    "L": np.uint8,
    "1": np.bool_,
    "I;16": np.uint16,
    "I;16L": np.uint16,
    "I;16B": np.uint16,
    "I": np.int32,
    "F": np.float32,
}


def natural_key(name: str) -> list[Any]:
    """Sort key putting ``slice2`` before ``slice10``."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


class VolumeReader(ABC):
    """Reads ``(z, y, x)`` boxes of one array stored in a file; a 2D array is one z slice.

    Readers keep no open handles between calls, so sources stay picklable (DDP spawn).
    """

    def __init__(self, path: Path, shape: Sequence[int], dtype: np.dtype) -> None:
        if len(shape) not in (2, 3):
            raise DataError(f"{path}: expected a (z, y, x) volume or a 2D image, got shape {tuple(shape)}")
        self.path = path
        self.stored_ndim = len(shape)
        z, y, x = (int(s) for s in ((1, *shape) if len(shape) == 2 else shape))
        self.shape = (z, y, x)
        self.dtype = np.dtype(dtype)

    def read(self, z: Range, y: Range, x: Range) -> np.ndarray:
        """The box ``[z0, z1) x [y0, y1) x [x0, x1)`` in file coordinates, as ``(z, y, x)``."""
        out = self._read(z, y, x)
        return out if out.ndim == 3 else out[None]

    def _slices(self, z: Range, y: Range, x: Range) -> tuple[slice, ...]:
        yx = (slice(*y), slice(*x))
        return yx if self.stored_ndim == 2 else (slice(*z), *yx)

    @abstractmethod
    def _read(self, z: Range, y: Range, x: Range) -> np.ndarray:
        """Read the box; may return ``(y, x)`` for 2D files."""


class NpyReader(VolumeReader):
    """``.npy``: memory-mapped, only the touched pages are read."""

    def __init__(self, path: Path) -> None:
        arr = self._open(path)
        super().__init__(path, arr.shape, arr.dtype)

    @staticmethod
    def _open(path: Path) -> np.ndarray:
        try:
            return np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError) as err:
            raise DataError(f"{path}: not a readable .npy array ({err})") from None

    def _read(self, z: Range, y: Range, x: Range) -> np.ndarray:
        return self._open(self.path)[self._slices(z, y, x)]


class NpzReader(VolumeReader):
    """``.npz`` member: shape/dtype from the member's header; data loaded whole on first read."""

    def __init__(self, path: Path, key: str | None) -> None:
        try:
            with zipfile.ZipFile(path) as zf:
                members = [n[:-4] for n in zf.namelist() if n.endswith(".npy")]
                self.key = _choose_key(path, key, members)
                with zf.open(f"{self.key}.npy") as fh:
                    read_header = (
                        np.lib.format.read_array_header_1_0
                        if np.lib.format.read_magic(fh) == (1, 0)
                        else np.lib.format.read_array_header_2_0
                    )
                    shape, _, dtype = read_header(fh)
        except zipfile.BadZipFile:
            raise DataError(f"{path}: not a valid .npz archive") from None
        self._data: np.ndarray | None = None
        super().__init__(path, shape, dtype)

    def _read(self, z: Range, y: Range, x: Range) -> np.ndarray:
        if self._data is None:
            with np.load(self.path, allow_pickle=False) as archive:
                self._data = archive[self.key]
        return self._data[self._slices(z, y, x)]


class TiffReader(VolumeReader):
    """Multi-page TIFF: reads only the requested pages (one page per z slice)."""

    def __init__(self, path: Path) -> None:
        import tifffile

        try:
            with tifffile.TiffFile(path) as tif:
                series = tif.series[0]
                shape, dtype, pages = series.shape, series.dtype, len(series.pages)
        except (tifffile.TiffFileError, ValueError, IndexError) as err:
            raise DataError(f"{path}: not a readable TIFF ({err})") from None
        self._per_page = len(shape) == 3 and pages == shape[0]
        self._whole: np.ndarray | None = None
        super().__init__(path, shape, dtype)

    def _read(self, z: Range, y: Range, x: Range) -> np.ndarray:
        import tifffile

        if self._per_page or self.stored_ndim == 2:
            with tifffile.TiffFile(self.path) as tif:
                pages = tif.asarray(key=list(range(*z)) if self.stored_ndim == 3 else 0, series=0)
            pages = pages.reshape(-1, *self.shape[1:])
            return pages[:, slice(*y), slice(*x)]
        if self._whole is None:  # a single page holding the whole stack: no page-wise access
            self._whole = tifffile.imread(self.path, series=0)
        return self._whole[self._slices(z, y, x)]


class Hdf5Reader(VolumeReader):
    """HDF5 dataset (``key``, optional when the file holds exactly one dataset), sliced on disk."""

    def __init__(self, path: Path, key: str | None) -> None:
        import h5py

        try:
            with h5py.File(path, "r") as fh:
                names: list[str] = []
                fh.visititems(lambda n, obj: names.append(n) if isinstance(obj, h5py.Dataset) else None)
                self.key = _choose_key(path, key, names)
                shape, dtype = fh[self.key].shape, fh[self.key].dtype
        except OSError as err:
            raise DataError(f"{path}: not a readable HDF5 file ({err})") from None
        super().__init__(path, shape, dtype)

    def _read(self, z: Range, y: Range, x: Range) -> np.ndarray:
        import h5py

        with h5py.File(self.path, "r") as fh:
            return fh[self.key][self._slices(z, y, x)]


class ZarrReader(VolumeReader):
    """zarr array, or an array inside a zarr group (``key``, optional if there is one array)."""

    def __init__(self, path: Path, key: str | None) -> None:
        import zarr

        node = self._open_root(path)
        if isinstance(node, zarr.Group):
            names = [n for n, m in node.members(max_depth=None) if isinstance(m, zarr.Array)]
            self.key: str | None = _choose_key(path, key, names)
            node = node[self.key]
        elif key is not None:
            raise DataError(f"{path}: is a single zarr array, so key must be null (got {key!r})")
        else:
            self.key = None
        super().__init__(path, node.shape, node.dtype)

    @staticmethod
    def _open_root(path: Path) -> Any:
        import zarr

        try:
            return zarr.open(str(path), mode="r")
        except Exception as err:  # noqa: BLE001 - zarr raises several types for a bad store
            raise DataError(f"{path}: not a readable zarr store ({type(err).__name__}: {err})") from None

    def _read(self, z: Range, y: Range, x: Range) -> np.ndarray:
        node = self._open_root(self.path)
        if self.key is not None:
            node = node[self.key]
        return np.asarray(node[self._slices(z, y, x)])


class SliceFolderReader(VolumeReader):
    """A folder of 2D images (PNG or single-page TIFF), one per z slice, in natural order."""

    def __init__(self, path: Path) -> None:
        from PIL import Image

        self.files = sorted(
            (p for p in path.iterdir() if p.suffix.lower() in SLICE_SUFFIXES), key=lambda p: natural_key(p.name)
        )
        if not self.files:
            raise DataError(f"{path}: folder holds no {'/'.join(SLICE_SUFFIXES)} slices")
        with Image.open(self.files[0]) as img:
            if img.mode not in _PIL_DTYPES:
                raise DataError(f"{self.files[0]}: image mode {img.mode} is not single-channel grayscale")
            shape = (len(self.files), img.height, img.width)
            dtype = np.dtype(_PIL_DTYPES[img.mode])
        super().__init__(path, shape, dtype)

    def _read(self, z: Range, y: Range, x: Range) -> np.ndarray:
        from PIL import Image

        out = np.empty((z[1] - z[0], y[1] - y[0], x[1] - x[0]), dtype=self.dtype)
        for i, file in enumerate(self.files[z[0] : z[1]]):
            with Image.open(file) as img:
                plane = np.asarray(img)
            if plane.shape != self.shape[1:]:
                raise DataError(
                    f"{file}: slice shape {plane.shape} differs from {self.files[0].name}'s {self.shape[1:]}"
                )
            out[i] = plane[y[0] : y[1], x[0] : x[1]]
        return out


def _choose_key(path: Path, key: str | None, available: Sequence[str]) -> str:
    """The requested key, or the only one when ``key`` is null; otherwise one line listing keys."""
    if key is None:
        if len(available) == 1:
            return available[0]
        raise DataError(f"{path}: holds {len(available)} arrays, set key to one of: {', '.join(available) or '(none)'}")
    if key not in available:
        raise DataError(f"{path}: no array {key!r}; available keys: {', '.join(available) or '(none)'}")
    return key


def open_volume(path: str | Path, key: str | None = None) -> VolumeReader:
    """A lazy reader for the volume in ``path``, chosen by extension (or folder contents)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    suffix = path.suffix.lower()
    is_zarr = suffix == ".zarr" or (
        path.is_dir() and any((path / m).exists() for m in ("zarr.json", ".zarray", ".zgroup"))
    )
    keyless: dict[str, Callable[[Path], VolumeReader]] = {".npy": NpyReader, ".tif": TiffReader, ".tiff": TiffReader}
    if path.is_file() and suffix in keyless:
        if key is not None:
            raise DataError(f"{path}: {suffix} files hold one array, so key must be null (got {key!r})")
        return keyless[suffix](path)
    if path.is_file() and suffix == ".npz":
        return NpzReader(path, key)
    if path.is_file() and suffix in (".h5", ".hdf5", ".hdf"):
        return Hdf5Reader(path, key)
    if is_zarr:
        return ZarrReader(path, key)
    if path.is_dir():
        if key is not None:
            raise DataError(f"{path}: a folder of slices has no keys, so key must be null (got {key!r})")
        return SliceFolderReader(path)
    raise DataError(
        f"{path}: unsupported file type {suffix or '(none)'}; supported: .npy, .npz, "
        ".tif/.tiff, .h5/.hdf5, .zarr, or a folder of .png/.tif slices"
    )


class LocalVolumeSource(VolumeSource):
    """Channels read from local files placed at ``origin`` in the dataset's coordinate frame.

    ``channels`` maps a channel name to ``{path: ..., key: ...}`` (or just a path string, or
    null for a channel the files do not provide). ``image`` must be uint8; every other channel
    holds integer labels. All channels must share one ``(z, y, x)`` shape.
    """

    def __init__(self, channels: Mapping[str, Any], origin: Sequence[int] = (0, 0, 0)) -> None:
        if not isinstance(channels, Mapping) or not channels:
            raise ConfigError(f"source.channels: expected a mapping of channel name -> {{path, key}}, got {channels!r}")
        try:
            origin = tuple(int(v) for v in origin)
        except (TypeError, ValueError):
            raise ConfigError(f"source.origin: expected [x, y, z] integers, got {origin!r}") from None
        if len(origin) != 3 or min(origin) < 0:
            raise ConfigError(f"source.origin: expected [x, y, z] with non-negative values, got {list(origin)}")
        self.origin: tuple[int, int, int] = origin
        self.readers: dict[str, VolumeReader] = {}
        for name, spec in channels.items():
            path, key = _channel_spec(str(name), spec)
            if path is None:
                continue
            try:
                reader = open_volume(path, key)
            except DataError as err:
                raise DataError(f"source.channels.{name}: {err}") from None
            _check_dtype(str(name), reader)
            self.readers[str(name)] = reader
        if not self.readers:
            raise ConfigError(
                "source.channels: no channel has a path; set e.g. source.channels.image.path=/data/volume.tif"
            )
        first_name, first = next(iter(self.readers.items()))
        for name, reader in self.readers.items():
            if reader.shape != first.shape:
                raise DataError(
                    f"source.channels: {name} ({reader.path}) has shape {reader.shape} but "
                    f"{first_name} ({first.path}) has {first.shape}; all channels must share one (z, y, x) shape"
                )
        self.channels = tuple(self.readers)
        depth, height, width = first.shape
        x0, y0, z0 = self.origin
        #: the files' box in dataset coordinates: (x range, y range, z range), half-open
        self.extent: tuple[Range, Range, Range] = ((x0, x0 + width), (y0, y0 + height), (z0, z0 + depth))

    @property
    def z_extent(self) -> Range:
        return self.extent[2]

    def check_channel(self, channel: str) -> None:
        if channel not in self.readers:
            raise DataError(
                f"source=local: channel {channel!r} is not configured (set "
                f"source.channels.{channel}.path); configured: {', '.join(self.channels)}"
            )

    def cutout(self, channel: str, x: Range, y: Range, z: Range) -> np.ndarray:
        """``channel`` over the half-open ranges (dataset coordinates) as a ``(z, y, x)`` array."""
        self.check_channel(channel)
        request = (as_range(x, "x"), as_range(y, "y"), as_range(z, "z"))
        if not all(lo <= r[0] and r[1] <= hi for r, (lo, hi) in zip(request, self.extent)):
            box = " ".join(f"{a}={list(r)}" for a, r in zip("xyz", self.extent))
            asked = " ".join(f"{a}={list(r)}" for a, r in zip("xyz", request))
            raise DataError(
                f"source=local: {channel} cutout {asked} lies outside {self.readers[channel].path}'s "
                f"box {box} (origin {list(self.origin)})"
            )
        (x0, x1), (y0, y1), (z0, z1) = request
        ox, oy, oz = self.origin
        return self.readers[channel].read((z0 - oz, z1 - oz), (y0 - oy, y1 - oy), (x0 - ox, x1 - ox))


def _channel_spec(name: str, spec: Any) -> tuple[str | None, str | None]:
    key = f"source.channels.{name}"
    if spec is None:
        return None, None
    if isinstance(spec, (str, Path)):
        return str(spec), None
    if not isinstance(spec, Mapping):
        raise ConfigError(f"{key}: expected null, a path, or {{path: ..., key: ...}}, got {spec!r}")
    unknown = set(spec) - {"path", "key"}
    if unknown:
        raise ConfigError(f"{key}: unknown key(s) {sorted(unknown)}; allowed: path, key")
    path, array_key = spec.get("path"), spec.get("key")
    if array_key is not None and not isinstance(array_key, str):
        raise ConfigError(f"{key}.key: expected a string or null, got {array_key!r}")
    if path is not None and not isinstance(path, (str, Path)):
        raise ConfigError(f"{key}.path: expected a file or folder path, got {path!r}")
    return (str(path) if path is not None else None), array_key


def _check_dtype(name: str, reader: VolumeReader) -> None:
    """``image`` is held as uint8; every other channel is a label volume (integer or bool)."""
    if name == "image":
        if reader.dtype != np.uint8:
            raise DataError(
                f"source.channels.image: {reader.path} has dtype {reader.dtype}, expected uint8 "
                "(rescale the volume to 0-255 uint8 first)"
            )
    elif not (np.issubdtype(reader.dtype, np.integer) or reader.dtype == np.bool_):
        raise DataError(
            f"source.channels.{name}: {reader.path} has dtype {reader.dtype}; label channels must hold integers"
        )
