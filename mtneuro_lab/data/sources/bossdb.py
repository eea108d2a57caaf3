"""``source=bossdb``: cutouts of the MTNeuro volume read from BossDB with ``intern``.

Why not ``intern.array``: it asks the public BossDB host to infer its provider (ignoring a custom
host), splits big cutouts over a multiprocessing pool and never retries. This source talks to
``intern.remote.boss.BossRemote`` directly, cuts every request into chunks (``chunk`` voxels,
x/y/z), downloads each chunk with bounded retries (exponential backoff with jitter), verifies it
(size, dtype) and stores it atomically in the local cache (:mod:`mtneuro_lab.data.cache`, sha256
+ sidecar) before any of it is used. A later request for a cached chunk never touches the network;
``offline=True`` never does at all. The token is held in memory only: it is never logged, never
written to the cache, and must not be put into the config (it would end up in run directories),
so it comes from the environment.

To pre-download what a task config needs: ``python -m mtneuro_lab.download task=roi_c1
[source.host=... other overrides]`` (:mod:`mtneuro_lab.download`).
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np

from mtneuro_lab.data import cache
from mtneuro_lab.data.sources.base import Range, VolumeSource, as_range
from mtneuro_lab.errors import ConfigError, DataError
from mtneuro_lab.io import atomic_write_bytes

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_HOST = "api.bossdb.io"
PUBLIC_TOKEN = "public"
#: environment variables, first set wins (the INTERN_* ones are intern's own names)
HOST_ENV = ("BOSS_HOST", "INTERN_HOST")
PROTOCOL_ENV = ("BOSS_PROTOCOL", "INTERN_PROTOCOL")
TOKEN_ENV = ("BOSSDB_TOKEN", "INTERN_TOKEN")

PAPER_CHANNELS = {
    "image": "bossdb://prasad/prasad2020/image",
    "pixel_labels": "bossdb://prasad/prasad_analysis/pixel_labels",
    "roi_labels": "bossdb://prasad/prasad_analysis/roi_labels",
}

_URI = re.compile(r"^bossdb://([A-Za-z0-9_.\-]+)/([A-Za-z0-9_.\-]+)/([A-Za-z0-9_.\-]+)$")
_HOST = re.compile(r"^[A-Za-z0-9.\-]+(:[0-9]{1,5})?$")
#: HTTP statuses worth another attempt; every other 4xx is the server's final word
TRANSIENT_STATUS = frozenset({408, 425, 429})


def _env(names: Sequence[str]) -> str | None:
    for name in names:
        if os.environ.get(name):
            return os.environ[name]
    return None


@dataclass(frozen=True)
class ChannelURI:
    collection: str
    experiment: str
    channel: str

    @classmethod
    def parse(cls, uri: str, key: str) -> ChannelURI:
        match = _URI.match(str(uri))
        if not match:
            raise ConfigError(f"{key}: expected bossdb://<collection>/<experiment>/<channel>, got {uri!r}")
        return cls(*match.groups())

    def __str__(self) -> str:
        return f"bossdb://{self.collection}/{self.experiment}/{self.channel}"


@dataclass(frozen=True)
class Box:
    """A half-open x/y/z box in voxels of the requested resolution."""

    x: Range
    y: Range
    z: Range

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.z[1] - self.z[0], self.y[1] - self.y[0], self.x[1] - self.x[0])

    @property
    def name(self) -> str:
        return f"x{self.x[0]}-{self.x[1]}_y{self.y[0]}-{self.y[1]}_z{self.z[0]}-{self.z[1]}"

    def __str__(self) -> str:
        return f"x=[{self.x[0]}, {self.x[1]}) y=[{self.y[0]}, {self.y[1]}) z=[{self.z[0]}, {self.z[1]})"

    def slices_in(self, outer: Box) -> tuple[slice, slice, slice]:
        """Where this box sits inside ``outer``'s ``(z, y, x)`` array."""
        return tuple(
            slice(a[0] - b[0], a[1] - b[0]) for a, b in ((self.z, outer.z), (self.y, outer.y), (self.x, outer.x))
        )  # type: ignore[return-value]


def _cuts(start: int, stop: int, step: int, origin: int) -> list[Range]:
    edges = list(range(origin + ((start - origin) // step + 1) * step, stop, step))
    bounds = [start, *edges, stop]
    return list(pairwise(bounds))


def plan_chunks(box: Box, chunk: Sequence[int]) -> list[Box]:
    """Chunk boxes covering ``box``: x/y tiles start at the box's corner, z follows the
    absolute grid of ``chunk[2]``, so a cube asked for over different z ranges shares its
    inner chunks (a cube is always requested whole in x/y, so its tiles are always the same)."""
    cx, cy, cz = chunk
    return [
        Box(x, y, z)
        for z in _cuts(*box.z, cz, 0)
        for y in _cuts(*box.y, cy, box.y[0])
        for x in _cuts(*box.x, cx, box.x[0])
    ]


# --------------------------------------------------------------------------- retries


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded attempts: ``retries`` more after the first, waits ``backoff * 2**k`` (capped at
    ``max_backoff``, times a random factor in [0.5, 1]) and never beyond ``max_time`` in total."""

    retries: int = 5
    backoff: float = 1.0
    max_backoff: float = 30.0
    max_time: float = 600.0

    def delay(self, attempt: int, rng: random.Random) -> float:
        return min(self.backoff * 2.0**attempt, self.max_backoff) * rng.uniform(0.5, 1.0)


def _status(err: BaseException) -> int | None:
    response = getattr(err, "response", None)
    return getattr(response, "status_code", None)


def is_transient(err: BaseException) -> bool:
    """5xx/408/429, timeouts, refused or dropped connections, truncated or corrupt bodies."""
    import requests

    status = _status(err)
    if status is not None:
        return status >= 500 or status in TRANSIENT_STATUS
    if isinstance(err, requests.RequestException):
        return True
    return _is_corrupt_payload(err)


def _is_corrupt_payload(err: BaseException) -> bool:
    """blosc could not decompress, or the decompressed size does not fit the box (intern's
    ``np.reshape``): the body was cut short or garbled on the way."""
    import blosc

    return isinstance(err, (blosc.blosc_extension.error, _SizeMismatch)) or (
        isinstance(err, ValueError) and "reshape" in str(err)
    )


class _SizeMismatch(ValueError):
    pass


def describe_error(err: BaseException, timeout: float) -> str:
    """What the server (or the network) said, in a few words and one line."""
    import requests

    status = _status(err)
    if status is not None:
        response = err.response  # type: ignore[attr-defined]
        text = response.text or ""
        try:  # the Boss answers errors as JSON: {"status": ..., "code": ..., "message": ...}
            body = json.loads(text)
            text = str(body.get("message") or body.get("detail") or text) if isinstance(body, dict) else text
        except ValueError:
            pass
        text = " ".join(text.split())[:200]
        return f"HTTP {status} {response.reason or ''}".rstrip() + (f": {text}" if text else "")
    if isinstance(err, requests.Timeout):
        return f"no answer within timeout={timeout:g}s"
    if isinstance(err, requests.exceptions.ChunkedEncodingError):
        return "response body cut short (connection dropped mid-transfer)"
    if isinstance(err, requests.ConnectionError):
        errno = re.search(r"\[Errno -?\d+\] ([^'\")]+)", str(err))
        if errno:
            return f"connection failed: {errno.group(1).strip()}"
        if "Connection aborted" in str(err) or "RemoteDisconnected" in str(err):
            return "connection dropped by the server"
        return "connection failed"
    if _is_corrupt_payload(err):
        return f"corrupt payload ({' '.join(str(err).split())[:120]})"
    return f"{type(err).__name__}: {' '.join(str(err).split())[:200]}"


def with_retries(
    call: Callable[[], T],
    policy: RetryPolicy,
    what: str,
    timeout: float,
    rng: random.Random | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """``call()`` until it succeeds; a permanent error or exhausted attempts raise one DataError
    line naming ``what`` and what the server said."""
    rng = rng or random.Random()
    deadline = time.monotonic() + policy.max_time
    attempt = 0
    while True:
        try:
            return call()
        except Exception as err:  # noqa: BLE001 - classified below, re-raised as DataError
            reason = describe_error(err, timeout)
            if not is_transient(err):
                raise DataError(f"bossdb: {what} failed: {reason}") from None
            wait = policy.delay(attempt, rng)
            attempt += 1
            if attempt > policy.retries or time.monotonic() + wait > deadline:
                raise DataError(f"bossdb: {what} failed after {attempt} attempt(s): {reason}") from None
            log.warning("bossdb: %s: %s; retry %d/%d in %.1fs", what, reason, attempt, policy.retries, wait)
            sleep(wait)


def narrow(array: np.ndarray) -> np.ndarray:
    """Labels (uint32/uint64 in BossDB) as the smallest unsigned dtype holding their values."""
    if array.dtype.kind != "u" or array.dtype.itemsize <= 2 or array.size == 0:
        return array
    return array.astype(np.min_scalar_type(int(array.max())), copy=False)


# --------------------------------------------------------------------------- source


class BossDBSource(VolumeSource):
    """Serves cutouts of the configured BossDB channels through a verified local cache.

    Label channels stored as uint32/uint64 on the server are returned (and cached) as the
    smallest unsigned dtype that holds their values: uint8 for the MTNeuro labels.
    """

    def __init__(
        self,
        channels: Mapping[str, str] | None = None,
        host: str | None = None,
        protocol: Literal["https", "http"] | None = None,
        token: str | None = None,
        resolution: int = 0,
        chunk: Sequence[int] = (512, 512, 16),
        retries: int = 5,
        backoff: float = 1.0,
        max_backoff: float = 30.0,
        max_time: float = 600.0,
        timeout: float = 60.0,
        offline: bool = False,
        progress: bool = True,
        cache_dir: str = "~/.cache/mtneuro_lab",
    ) -> None:
        if token not in (None, PUBLIC_TOKEN):
            raise ConfigError(
                "source.token: a secret token must not be in the config (configs are saved into "
                f"run directories); set it in the environment ({' or '.join(TOKEN_ENV)}); "
                f"allowed values here: null, {PUBLIC_TOKEN}"
            )
        self.host = str(host or _env(HOST_ENV) or DEFAULT_HOST)
        if not _HOST.match(self.host):
            raise ConfigError(
                f"source.host: expected a host name with an optional :port and no scheme or path, got {self.host!r}"
            )
        self.protocol = str(protocol or _env(PROTOCOL_ENV) or "https")
        if self.protocol not in ("https", "http"):
            raise ConfigError(f"source.protocol (or ${PROTOCOL_ENV[0]}): must be https or http, got {self.protocol!r}")
        self._token = token or _env(TOKEN_ENV) or PUBLIC_TOKEN
        mapping = dict(PAPER_CHANNELS if channels is None else channels)
        if not mapping:
            raise ConfigError("source.channels: needs at least one channel")
        self.uris = {str(k): ChannelURI.parse(v, f"source.channels.{k}") for k, v in mapping.items()}
        self.channels = tuple(self.uris)
        if resolution < 0:
            raise ConfigError(f"source.resolution: must be >= 0, got {resolution}")
        self.resolution = int(resolution)
        self.chunk = tuple(int(c) for c in chunk)
        if len(self.chunk) != 3 or min(self.chunk) < 1:
            raise ConfigError(f"source.chunk: expected three positive ints [x, y, z], got {list(chunk)}")
        for key, value, low in (("retries", retries, 0), ("backoff", backoff, 0), ("max_backoff", max_backoff, 0)):
            if value < low:
                raise ConfigError(f"source.{key}: must be >= {low}, got {value}")
        for key, value in (("timeout", timeout), ("max_time", max_time)):
            if value <= 0:
                raise ConfigError(f"source.{key}: must be > 0, got {value}")
        self.policy = RetryPolicy(int(retries), float(backoff), float(max_backoff), float(max_time))
        self.timeout = float(timeout)
        self.offline = bool(offline)
        self.progress = bool(progress)
        self.root = Path(cache_dir).expanduser() / "bossdb" / self.host.replace(":", "_")
        self._remote: Any = None
        self._resources: dict[str, Any] = {}
        self._frames: dict[tuple[str, str], dict[str, Any]] = {}

    # -- description ---------------------------------------------------------------------------
    def __repr__(self) -> str:  # never shows the token
        mode = "offline" if self.offline else f"{self.protocol}://{self.host}"
        return f"BossDBSource({mode}, res {self.resolution}, chunk {list(self.chunk)}, cache={self.root})"

    @property
    def z_extent(self) -> tuple[int, int] | None:
        """z range of the image channel's coordinate frame, once a run has fetched it (cached)."""
        uri = self.uris.get("image") or next(iter(self.uris.values()))
        frame = self._cached_frame(uri)
        return None if frame is None else (int(frame["z_start"]), int(frame["z_stop"]))

    # -- cache layout --------------------------------------------------------------------------
    def channel_dir(self, channel: str) -> Path:
        uri = self.uris[channel]
        return self.root / uri.collection / uri.experiment / uri.channel / f"res{self.resolution}"

    def chunk_path(self, channel: str, box: Box) -> Path:
        return self.channel_dir(channel) / f"{box.name}.npy"

    def _frame_path(self, uri: ChannelURI) -> Path:
        return self.root / uri.collection / uri.experiment / "frame.json"

    def _cached_frame(self, uri: ChannelURI) -> dict[str, Any] | None:
        path = self._frame_path(uri)
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None

    # -- reading -------------------------------------------------------------------------------
    def cutout(self, channel: str, x: Range, y: Range, z: Range) -> np.ndarray:
        """``(z, y, x)`` array of ``channel``; missing chunks are downloaded first (unless offline)."""
        self.check_channel(channel)
        box = Box(as_range(x, "x"), as_range(y, "y"), as_range(z, "z"))
        chunks = self.ensure(channel, box)
        parts = [self._load(channel, c) for c in chunks]
        out = np.empty(box.shape, dtype=np.result_type(*[p.dtype for p in parts]))
        for c, part in zip(chunks, parts):
            out[c.slices_in(box)] = part
        return out

    def missing(self, channel: str, box: Box) -> list[Box]:
        return [c for c in plan_chunks(box, self.chunk) if not cache.has_array(self.chunk_path(channel, c))]

    def ensure(self, channel: str, box: Box) -> list[Box]:
        """Make every chunk of ``box`` a verified cache entry; returns all chunk boxes."""
        chunks = plan_chunks(box, self.chunk)
        todo = [c for c in chunks if not cache.has_array(self.chunk_path(channel, c))]
        if todo and self.offline:
            raise DataError(
                f"bossdb offline: {channel} cutout {box} ({self.uris[channel]}, res {self.resolution}) "
                f"is not in the cache at {self.channel_dir(channel)} ({len(todo)} of {len(chunks)} "
                f"chunks missing, first {todo[0]}); run once with source.offline=false or pre-download "
                f"with python -m mtneuro_lab.data.sources.bossdb"
            )
        if todo:
            self._download(channel, box, todo)
        return chunks

    def _load(self, channel: str, chunk: Box) -> np.ndarray:
        path = self.chunk_path(channel, chunk)
        try:
            return cache.load_array(path)
        except DataError:
            if self.offline:
                raise
            log.warning("bossdb: cache entry %s failed verification; downloading it again", path)
            self._download(channel, chunk, [chunk])
            return cache.load_array(path)

    # -- network -------------------------------------------------------------------------------
    def _connect(self) -> Any:
        if self._remote is None:
            from intern.remote.boss import BossRemote

            remote = BossRemote({"protocol": self.protocol, "host": self.host, "token": self._token})
            for service in (remote.project_service, remote.volume_service):
                service.session_send_opts = {**service.session_send_opts, "timeout": self.timeout}
            self._remote = remote
        return self._remote

    def _retry(self, call: Callable[[], T], what: str) -> T:
        return with_retries(call, self.policy, what, self.timeout)

    def _resource(self, channel: str) -> Any:
        if channel not in self._resources:
            uri = self.uris[channel]
            remote = self._connect()
            self._resources[channel] = self._retry(
                lambda: remote.get_channel(uri.channel, uri.collection, uri.experiment),
                f"{channel} channel metadata {uri} from {self._url()}",
            )
        return self._resources[channel]

    def _frame(self, channel: str) -> dict[str, Any]:
        """The experiment's coordinate frame (fetched once, then kept beside the chunks)."""
        uri = self.uris[channel]
        key = (uri.collection, uri.experiment)
        if key not in self._frames:
            frame = self._cached_frame(uri)
            if frame is None:
                remote = self._connect()
                where = f"bossdb://{uri.collection}/{uri.experiment} (for {channel}) from {self._url()}"
                exp = self._retry(
                    lambda: remote.get_experiment(uri.collection, uri.experiment), f"experiment metadata {where}"
                )
                coord = self._retry(
                    lambda: remote.get_coordinate_frame(exp.coord_frame),
                    f"coordinate frame {exp.coord_frame!r} of {where}",
                )
                frame = {
                    k: getattr(coord, k)
                    for k in ("name", "x_start", "x_stop", "y_start", "y_stop", "z_start", "z_stop")
                }
                frame["voxel_unit"] = str(coord.voxel_unit)
                frame["hierarchy_method"] = str(exp.hierarchy_method)
                frame["voxel_size"] = [coord.x_voxel_size, coord.y_voxel_size, coord.z_voxel_size]
                atomic_write_bytes(self._frame_path(uri), json.dumps(frame, indent=1).encode())
            self._frames[key] = frame
        return self._frames[key]

    def _check_inside_frame(self, channel: str, box: Box) -> None:
        frame = self._frame(channel)
        # each resolution level halves x and y, and z too when the experiment is isotropic
        xy = 2**self.resolution
        zs = xy if frame.get("hierarchy_method") == "isotropic" else 1
        bounds = {
            "x": (frame["x_start"] // xy, -(-frame["x_stop"] // xy)),
            "y": (frame["y_start"] // xy, -(-frame["y_stop"] // xy)),
            "z": (frame["z_start"] // zs, -(-frame["z_stop"] // zs)),
        }
        for axis, (lo, hi) in bounds.items():
            a, b = getattr(box, axis)
            if a < lo or b > hi:
                raise DataError(
                    f"bossdb: {channel} cutout {box} lies outside the coordinate frame of "
                    f"{self.uris[channel]} ({axis} must be within [{lo}, {hi}) at res {self.resolution})"
                )

    def _url(self) -> str:
        return f"{self.protocol}://{self.host}"

    def _download(self, channel: str, box: Box, todo: Sequence[Box]) -> None:
        uri = self.uris[channel]
        self._check_inside_frame(channel, box)
        resource = self._resource(channel)
        expected = np.dtype(resource.datatype)
        remote = self._connect()
        log.info("bossdb: downloading %d chunk(s) of %s %s from %s", len(todo), channel, box, self._url())
        for chunk in self._progress(todo, f"bossdb {channel}"):
            what = f"{channel} cutout {uri} {chunk} (res {self.resolution}) from {self._url()}"

            def fetch(chunk: Box = chunk) -> np.ndarray:
                data = remote.get_cutout(
                    resource, self.resolution, list(chunk.x), list(chunk.y), list(chunk.z), parallel=False
                )
                if data.shape != chunk.shape or data.dtype != expected:
                    raise _SizeMismatch(f"got {data.dtype}{list(data.shape)}, expected {expected}{list(chunk.shape)}")
                return data

            data = self._retry(fetch, what)
            meta = {
                "source": "bossdb",
                "uri": str(uri),
                "host": self.host,
                "channel": channel,
                "resolution": self.resolution,
                "x": list(chunk.x),
                "y": list(chunk.y),
                "z": list(chunk.z),
                "server_dtype": str(expected),
            }
            cache.save_array(self.chunk_path(channel, chunk), narrow(data), meta)

    def _progress(self, items: Sequence[Box], desc: str) -> Iterator[Box]:
        from tqdm.auto import tqdm

        yield from tqdm(
            items, desc=desc, unit="chunk", disable=(not self.progress) or None, leave=False, file=sys.stderr
        )


if __name__ == "__main__":
    # the former command line `python -m mtneuro_lab.data.sources.bossdb ...` still works: the
    # command itself lives in the entry-point layer (mtneuro_lab.download)
    from mtneuro_lab import download

    sys.exit(download.main(sys.argv[1:]))
