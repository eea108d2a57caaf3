"""``source=bossdb`` without a server: how errors are described in one line (a non-JSON error
page, an unexplained connection failure, anything else), constructor options, and which chunks
of a box are still missing from the cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import requests

from mtneuro_lab.data import cache
from mtneuro_lab.data.sources.bossdb import BossDBSource, Box, describe_error, plan_chunks
from mtneuro_lab.errors import ConfigError


def _http_error(status: int, reason: str, body: bytes) -> requests.HTTPError:
    response = requests.Response()
    response.status_code, response.reason, response._content = status, reason, body
    return requests.HTTPError(response=response)


def test_errors_are_described_in_one_line() -> None:
    page = _http_error(503, "Service Unavailable", b"<html>\n  <body>maintenance\n</body></html>")
    assert describe_error(page, 5.0) == "HTTP 503 Service Unavailable: <html> <body>maintenance </body></html>"
    boss = _http_error(403, "Forbidden", b'{"status": 403, "code": 2002, "message": "Permission denied"}')
    assert describe_error(boss, 5.0) == "HTTP 403 Forbidden: Permission denied"
    assert describe_error(requests.ConnectionError("proxy said no"), 5.0) == "connection failed"
    assert describe_error(RuntimeError("odd\n  failure"), 5.0) == "RuntimeError: odd failure"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"protocol": "ftp"}, "source.protocol (or $BOSS_PROTOCOL): must be https or http, got 'ftp'"),
        ({"channels": {}}, "source.channels: needs at least one channel"),
        ({"resolution": -1}, "source.resolution: must be >= 0, got -1"),
    ],
)
def test_constructor_options_name_their_key(
    kwargs: dict, message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("BOSS_PROTOCOL", "INTERN_PROTOCOL"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ConfigError) as err:
        BossDBSource(cache_dir=str(tmp_path), **kwargs)
    assert str(err.value) == message


def test_missing_lists_the_chunks_not_yet_cached(tmp_path: Path) -> None:
    source = BossDBSource(cache_dir=str(tmp_path), chunk=[128, 128, 16], progress=False)
    box = Box((4600, 4856), (900, 1156), (110, 118))
    chunks = plan_chunks(box, source.chunk)
    assert source.missing("image", box) == chunks and len(chunks) == 8
    first = chunks[0]
    cache.save_array(source.chunk_path("image", first), np.zeros(first.shape, np.uint8))
    assert source.missing("image", box) == chunks[1:]
