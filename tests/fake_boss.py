"""A fake BossDB server on 127.0.0.1 that the real ``intern`` client talks to over HTTP.

It speaks the REST endpoints intern 1.4 uses for reading (``/v1/collection/...`` metadata,
``/v1/coord/<frame>``, ``/v1/cutout/<coll>/<exp>/<chan>/<res>/<x0:x1>/<y0:y1>/<z0:z1>/`` with
blosc bodies) and serves the X-ray phantom at the paper's channel URIs: ``image`` (uint8) in
``prasad/prasad2020``, ``pixel_labels`` and ``roi_labels`` (uint64) in ``prasad/prasad_analysis``.
Every request is recorded, and faults can be injected per test (status codes, delays beyond the
client's timeout, truncated or corrupt bodies, connection resets; ``stop()`` makes further
connections be refused).

Usage::

    with FakeBoss(z_extent=(100, 140)) as boss:
        boss.fail("status", times=2, status=500)
        ... BossDBSource(host=boss.host, protocol="http", ...)
        assert boss.count("cutout") == 3
"""

from __future__ import annotations

import json
import os
import re
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Literal

import blosc
import numpy as np
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
COLLECTION = "prasad"
#: experiment -> {channel: datatype}
EXPERIMENTS = {
    "prasad2020": {"image": "uint8"},
    "prasad_analysis": {"pixel_labels": "uint64", "roi_labels": "uint64"},
}
FRAME = "prasad_coord_frame"
FaultKind = Literal["status", "delay", "truncate", "corrupt", "reset"]

_CUTOUT = re.compile(r"^/v1/cutout/([^/]+)/([^/]+)/([^/]+)/(\d+)/(\d+):(\d+)/(\d+):(\d+)/(\d+):(\d+)/?$")
_CHANNEL = re.compile(r"^/v1/collection/([^/]+)/experiment/([^/]+)/channel/([^/]+)/?$")
_EXPERIMENT = re.compile(r"^/v1/collection/([^/]+)/experiment/([^/]+)/?$")
_COLLECTION = re.compile(r"^/v1/collection/([^/]+)/?$")
_COORD = re.compile(r"^/v1/coord/([^/]+)/?$")


@dataclass
class Fault:
    """Applied to requests of ``kind`` ("cutout", "meta" or "any") after skipping ``after`` of
    them, ``times`` times (None: for ever)."""

    what: FaultKind
    match: str = "cutout"
    times: int | None = 1
    after: int = 0
    status: int = 500
    message: str = "internal server error"
    delay: float = 0.0
    seen: int = 0


@dataclass
class Seen:
    method: str
    path: str
    kind: str
    authorization: str
    answer: str = ""


@dataclass
class _State:
    lock: threading.Lock = field(default_factory=threading.Lock)
    requests: list[Seen] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)


def paper_cubes() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "mtneuro_lab" / "conf" / "cubes" / "paper.yaml").read_text())


#: the token the ``boss`` fixture (conftest.py) serves with; tests check it never lands in a file
TOKEN = "tok-3f9a1c77e2-secret"


class FakeBoss:
    """The server; ``host`` is ``127.0.0.1:<port>`` (port chosen by the OS)."""

    def __init__(
        self,
        z_extent: tuple[int, int] = (100, 140),
        token: str | None = None,
        cache_dir: str | os.PathLike | None = None,
    ) -> None:
        from mtneuro_lab.data.sources.phantom_source import PhantomXraySource

        cubes = paper_cubes()
        cache_dir = cache_dir or os.environ.get("MTNEURO_CACHE", str(ROOT / ".cache"))
        self.phantom = PhantomXraySource(
            cubes=cubes["sets"],
            regions=cubes["regions"],
            roi_ids=cubes["roi_ids"],
            cache_dir=str(cache_dir),
            z_extent=z_extent,
        )
        boxes = [box for members in cubes["sets"].values() for box in members.values()]
        self.frame = {
            "name": FRAME,
            "description": "fake",
            "x_start": 0,
            "x_stop": max(b["x"][1] for b in boxes) + 64,
            "y_start": 0,
            "y_stop": max(b["y"][1] for b in boxes) + 64,
            "z_start": int(z_extent[0]),
            "z_stop": int(z_extent[1]),
            "x_voxel_size": 1.17,
            "y_voxel_size": 1.17,
            "z_voxel_size": 1.17,
            "voxel_unit": "micrometers",
        }
        self.token = token
        self.state = _State()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> FakeBoss:
        handler = type("Handler", (_Handler,), {"boss": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), handler)
        self._server.daemon_threads = True
        self._server.handle_error = lambda request, address: None  # resets/timeouts are the point
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket: later connections are refused."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeBoss:  # noqa: PYI034
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    # -- test controls -------------------------------------------------------------------------
    def fail(self, what: FaultKind, **kwargs: Any) -> Fault:
        fault = Fault(what, **kwargs)
        with self.state.lock:
            self.state.faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        with self.state.lock:
            self.state.faults.clear()

    @property
    def requests(self) -> list[Seen]:
        with self.state.lock:
            return list(self.state.requests)

    def count(self, kind: str | None = None) -> int:
        return sum(1 for r in self.requests if kind is None or r.kind == kind)

    def reset_counts(self) -> None:
        with self.state.lock:
            self.state.requests.clear()

    def _take_fault(self, kind: str) -> Fault | None:
        with self.state.lock:
            for fault in self.state.faults:
                if fault.match not in (kind, "any"):
                    continue
                fault.seen += 1
                if fault.seen <= fault.after:
                    continue
                if fault.times is not None and fault.seen > fault.after + fault.times:
                    continue
                return fault
        return None

    # -- data ----------------------------------------------------------------------------------
    def cutout(self, channel: str, x: tuple[int, int], y: tuple[int, int], z: tuple[int, int]) -> np.ndarray:
        """What the server holds: the phantom (labels as uint64, like BossDB), zeros elsewhere."""
        from mtneuro_lab.errors import DataError

        dtype = next(d[channel] for d in EXPERIMENTS.values() if channel in d)
        try:
            data = np.asarray(self.phantom.cutout(channel, x, y, z))
        except DataError:
            data = np.zeros((z[1] - z[0], y[1] - y[0], x[1] - x[0]))
        return np.ascontiguousarray(data.astype(dtype))


class _Handler(BaseHTTPRequestHandler):
    boss: FakeBoss
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        kind = "cutout" if path.startswith("/v1/cutout/") else "meta"
        seen = Seen("GET", path, kind, self.headers.get("Authorization", ""))
        with self.boss.state.lock:
            self.boss.state.requests.append(seen)
        fault = self.boss._take_fault(kind)
        if fault is not None and fault.what == "reset":
            seen.answer = "reset"
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            self.connection.close()
            return
        if fault is not None and fault.what == "status":
            seen.answer = str(fault.status)
            return self._json({"status": fault.status, "code": 0, "message": fault.message}, fault.status)
        if fault is not None and fault.what == "delay":
            time.sleep(fault.delay)
        expected = f"Token {self.boss.token}"
        if self.boss.token is not None and seen.authorization != expected:
            seen.answer = "401"
            return self._json({"detail": "Invalid token."}, 401)
        status, body, ctype = self._answer(path)
        seen.answer = str(status)
        if fault is not None and fault.what == "corrupt":
            body = bytes(np.random.default_rng(0).integers(0, 256, len(body), dtype=np.uint8))
        self._send(status, body, ctype, truncate=fault is not None and fault.what == "truncate")

    def _answer(self, path: str) -> tuple[int, bytes, str]:
        if m := _CUTOUT.match(path):
            coll, exp, chan, res, *r = m.groups()
            if coll != COLLECTION or chan not in EXPERIMENTS.get(exp, {}):
                return self._error(404, f"Channel {coll}/{exp}/{chan} not found")
            x0, x1, y0, y1, z0, z1 = map(int, r)
            f = self.boss.frame
            if (
                int(res) != 0
                or x0 < f["x_start"]
                or x1 > f["x_stop"]
                or y0 < f["y_start"]
                or y1 > f["y_stop"]
                or z0 < f["z_start"]
                or z1 > f["z_stop"]
            ):
                return self._error(400, "Cutout request out of bounds of the coordinate frame")
            data = self.boss.cutout(chan, (x0, x1), (y0, y1), (z0, z1))
            return 200, blosc.compress(data.tobytes(), typesize=data.dtype.itemsize), "application/blosc"
        if m := _CHANNEL.match(path):
            coll, exp, chan = m.groups()
            dtype = EXPERIMENTS.get(exp, {}).get(chan) if coll == COLLECTION else None
            if dtype is None:
                return self._error(404, f"Channel {chan} not found")
            kind = "image" if chan == "image" else "annotation"
            return self._ok(
                {
                    "name": chan,
                    "description": "",
                    "experiment": exp,
                    "creator": "fake",
                    "default_time_sample": 0,
                    "type": kind,
                    "base_resolution": 0,
                    "datatype": dtype,
                    "sources": [],
                    "related": [],
                    "downsample_status": "DOWNSAMPLED",
                }
            )
        if m := _EXPERIMENT.match(path):
            coll, exp = m.groups()
            if coll != COLLECTION or exp not in EXPERIMENTS:
                return self._error(404, f"Experiment {exp} not found")
            return self._ok(
                {
                    "name": exp,
                    "description": "",
                    "collection": coll,
                    "creator": "fake",
                    "coord_frame": FRAME,
                    "num_hierarchy_levels": 1,
                    "hierarchy_method": "anisotropic",
                    "num_time_samples": 1,
                    "time_step": None,
                    "time_step_unit": "",
                    "channels": list(EXPERIMENTS[exp]),
                }
            )
        if m := _COORD.match(path):
            if m.group(1) != FRAME:
                return self._error(404, f"Coordinate frame {m.group(1)} not found")
            return self._ok(self.boss.frame)
        if m := _COLLECTION.match(path):
            if m.group(1) != COLLECTION:
                return self._error(404, f"Collection {m.group(1)} not found")
            return self._ok(
                {"name": COLLECTION, "description": "", "creator": "fake", "experiments": list(EXPERIMENTS)}
            )
        return self._error(404, f"no route for {path}")

    @staticmethod
    def _ok(payload: dict[str, Any]) -> tuple[int, bytes, str]:
        return 200, json.dumps(payload).encode(), "application/json"

    @staticmethod
    def _error(status: int, message: str) -> tuple[int, bytes, str]:
        return status, json.dumps({"status": status, "code": 0, "message": message}).encode(), "application/json"

    def _json(self, payload: dict[str, Any], status: int) -> None:
        self._send(status, json.dumps(payload).encode(), "application/json")

    def _send(self, status: int, body: bytes, ctype: str, truncate: bool = False) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            if truncate:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body[: len(body) // 2] if truncate else body)
            self.wfile.flush()
        except OSError:  # the client gave up (timeout) or we were told to misbehave
            pass
        if truncate:
            self.close_connection = True


@pytest.fixture
def fake_boss() -> Iterator[FakeBoss]:
    """A running fake server for one test (import this fixture into the test module)."""
    with FakeBoss() as boss:
        yield boss
