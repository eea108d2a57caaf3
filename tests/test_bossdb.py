"""``source=bossdb`` against a fake Boss server: the real intern client over HTTP on 127.0.0.1."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import compose, read_metrics, run_inproc
from fake_boss import TOKEN, FakeBoss

from mtneuro_lab.data.sources.bossdb import BossDBSource, Box, plan_chunks
from mtneuro_lab.errors import ConfigError, DataError

CUBE = {"x": (4600, 4856), "y": (900, 1156)}  # set A cortex
Z = (110, 118)  # two z chunks on the 16-grid: [110, 112) and [112, 118)
CHUNK = [128, 128, 16]  # -> 2 x 2 x 2 = 8 chunks per cube cutout
N_CHUNKS = 8


def make(boss: FakeBoss, cache_dir: Path, **kwargs: Any) -> BossDBSource:
    opts: dict[str, Any] = {
        "host": boss.host,
        "protocol": "http",
        "cache_dir": str(cache_dir),
        "chunk": CHUNK,
        "retries": 3,
        "backoff": 0.01,
        "timeout": 2.0,
        "progress": False,
    }
    return BossDBSource(**{**opts, **kwargs})


def files_under(path: Path) -> list[Path]:
    return [p for p in path.rglob("*") if p.is_file()]


def test_plan_chunks_tile_the_box_once() -> None:
    box = Box((4600, 4856), (900, 1156), (110, 150))
    chunks = plan_chunks(box, (100, 512, 16))
    cover = np.zeros(box.shape, dtype=np.int64)
    for c in chunks:
        cover[c.slices_in(box)] += 1
    assert (cover == 1).all()
    assert sorted({c.z for c in chunks}) == [(110, 112), (112, 128), (128, 144), (144, 150)]
    assert sorted({c.x for c in chunks}) == [(4600, 4700), (4700, 4800), (4800, 4856)]


def test_cutout_equals_phantom_and_labels_are_uint8(boss: FakeBoss, tmp_path: Path) -> None:
    src = make(boss, tmp_path)
    image = src.cutout("image", CUBE["x"], CUBE["y"], Z)
    labels = src.cutout("pixel_labels", CUBE["x"], CUBE["y"], Z)
    assert image.dtype == np.uint8 and labels.dtype == np.uint8
    np.testing.assert_array_equal(image, boss.phantom.cutout("image", CUBE["x"], CUBE["y"], Z))
    np.testing.assert_array_equal(labels, boss.phantom.cutout("pixel_labels", CUBE["x"], CUBE["y"], Z))
    assert boss.count("cutout") == 2 * N_CHUNKS
    assert all(r.authorization == f"Token {TOKEN}" for r in boss.requests)
    assert src.z_extent == (100, 140)  # learnt from the coordinate frame, kept in the cache


def test_second_instance_reads_only_the_cache(boss: FakeBoss, tmp_path: Path) -> None:
    first = make(boss, tmp_path).cutout("image", CUBE["x"], CUBE["y"], Z)
    boss.reset_counts()
    again = make(boss, tmp_path)
    np.testing.assert_array_equal(again.cutout("image", CUBE["x"], CUBE["y"], Z), first)
    # a sub-range made of whole cached chunks is served from them too
    again.cutout("image", CUBE["x"], CUBE["y"], (112, 118))
    assert boss.count() == 0
    offline = make(boss, tmp_path, offline=True)
    np.testing.assert_array_equal(offline.cutout("image", CUBE["x"], CUBE["y"], Z), first)
    assert boss.count() == 0


@pytest.mark.parametrize(
    "fault",
    [
        {"what": "status", "status": 500, "times": 2},
        {"what": "status", "status": 503, "match": "meta"},
        {"what": "truncate"},
        {"what": "corrupt"},
        {"what": "reset"},
        {"what": "delay", "delay": 4.0},
    ],
    ids=["500x2", "503-meta", "truncated", "corrupt", "reset", "timeout"],
)
def test_transient_faults_are_retried(boss: FakeBoss, tmp_path: Path, fault: dict) -> None:
    injected = boss.fail(**{"after": 1, **fault})
    # a short client timeout only where the fault is a delay: elsewhere a request slowed by a
    # loaded machine would time out and be retried once more than the fault explains
    src = make(boss, tmp_path, timeout=1.0 if fault["what"] == "delay" else 30.0)
    image = src.cutout("image", CUBE["x"], CUBE["y"], Z)
    np.testing.assert_array_equal(image, boss.phantom.cutout("image", CUBE["x"], CUBE["y"], Z))
    times = injected.times or 1
    assert injected.seen >= injected.after + times  # the fault really happened
    kind = fault.get("match", "cutout")
    base = N_CHUNKS if kind == "cutout" else 3  # experiment, coordinate frame, channel
    assert boss.count(kind) == base + times


def _assert_nothing_cached(cache_dir: Path) -> None:
    leftovers = [p for p in files_under(cache_dir) if p.suffix in (".npy",) or p.name.startswith(".tmp-")]
    assert leftovers == []


def test_permanent_failure_is_one_clear_line(boss: FakeBoss, tmp_path: Path) -> None:
    boss.fail("status", status=403, times=None, message="Permission denied for prasad2020")
    src = make(boss, tmp_path)
    with pytest.raises(DataError) as info:
        src.cutout("image", CUBE["x"], CUBE["y"], Z)
    text = str(info.value)
    assert "\n" not in text
    assert "image cutout bossdb://prasad/prasad2020/image" in text
    assert "x=[4600, 4728) y=[900, 1028) z=[110, 112)" in text
    assert "HTTP 403" in text and "Permission denied for prasad2020" in text
    assert boss.count("cutout") == 1  # a 403 is not retried
    _assert_nothing_cached(tmp_path)


def test_exhausted_retries_and_refused_connections(boss: FakeBoss, tmp_path: Path) -> None:
    boss.fail("status", status=502, times=None, message="bad gateway upstream")
    src = make(boss, tmp_path, retries=2)
    with pytest.raises(DataError, match=r"after 3 attempt\(s\): HTTP 502 .*bad gateway upstream"):
        src.cutout("image", CUBE["x"], CUBE["y"], Z)
    assert boss.count("cutout") == 3
    boss.stop()
    with pytest.raises(
        DataError,
        match=r"pixel_labels.* after 2 attempt\(s\): connection failed: "
        r"Connection refused",
    ):
        make(boss, tmp_path, retries=1).cutout("pixel_labels", CUBE["x"], CUBE["y"], Z)
    _assert_nothing_cached(tmp_path)


def test_interrupted_download_resumes_at_the_next_missing_chunk(boss: FakeBoss, tmp_path: Path) -> None:
    boss.fail("status", status=500, times=None, after=3)
    with pytest.raises(DataError):
        make(boss, tmp_path, retries=0).cutout("image", CUBE["x"], CUBE["y"], Z)
    done = {r.path for r in boss.requests if r.kind == "cutout" and r.answer == "200"}
    assert len(done) == 3
    assert len(list(tmp_path.rglob("*.npy"))) == 3
    assert not [p for p in files_under(tmp_path) if p.name.startswith(".tmp-")]
    boss.clear_faults()
    boss.reset_counts()
    image = make(boss, tmp_path).cutout("image", CUBE["x"], CUBE["y"], Z)
    again = {r.path for r in boss.requests if r.kind == "cutout"}
    assert len(again) == N_CHUNKS - 3 and not again & done
    np.testing.assert_array_equal(image, boss.phantom.cutout("image", CUBE["x"], CUBE["y"], Z))


def test_offline_names_the_missing_cutout_and_never_connects(boss: FakeBoss, tmp_path: Path) -> None:
    src = make(boss, tmp_path, offline=True)
    with pytest.raises(DataError) as info:
        src.cutout("roi_labels", CUBE["x"], CUBE["y"], Z)
    text = str(info.value)
    assert "offline" in text and "roi_labels" in text
    assert "x=[4600, 4856) y=[900, 1156) z=[110, 118)" in text and "8 of 8 chunks missing" in text
    assert boss.count() == 0


def test_corrupt_cache_entry_is_downloaded_again(boss: FakeBoss, tmp_path: Path) -> None:
    make(boss, tmp_path).ensure("image", Box(CUBE["x"], CUBE["y"], Z))  # downloads, never loads
    victim = min(tmp_path.rglob("*.npy"))
    raw = bytearray(victim.read_bytes())
    raw[-1] ^= 0xFF
    victim.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="corrupt"):
        make(boss, tmp_path, offline=True).cutout("image", CUBE["x"], CUBE["y"], Z)
    boss.reset_counts()
    image = make(boss, tmp_path).cutout("image", CUBE["x"], CUBE["y"], Z)
    assert boss.count("cutout") == 1
    np.testing.assert_array_equal(image, boss.phantom.cutout("image", CUBE["x"], CUBE["y"], Z))


def test_outside_the_coordinate_frame_fails_before_any_cutout_request(boss: FakeBoss, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"outside the coordinate frame .*\(z must be within \[100, 140\)"):
        make(boss, tmp_path).cutout("image", CUBE["x"], CUBE["y"], (130, 150))
    assert boss.count("cutout") == 0


def test_token_is_never_written_or_shown(boss: FakeBoss, tmp_path: Path) -> None:
    src = make(boss, tmp_path)
    src.cutout("image", CUBE["x"], CUBE["y"], Z)
    src.cutout("roi_labels", CUBE["x"], CUBE["y"], Z)
    assert files_under(tmp_path)
    for path in files_under(tmp_path):
        assert TOKEN.encode() not in path.read_bytes(), path
    side = json.loads(next(p for p in tmp_path.rglob("*.json") if p.name != "frame.json").read_text())
    assert side["meta"]["uri"].startswith("bossdb://prasad/") and "token" not in json.dumps(side)
    assert TOKEN not in repr(src) and TOKEN not in str(src)
    with pytest.raises(ConfigError, match="source.token: .*BOSSDB_TOKEN"):
        make(boss, tmp_path, token=TOKEN)


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"host": "https://api.bossdb.io/v1"}, "source.host"),
        ({"chunk": [512, 512]}, "source.chunk"),
        ({"channels": {"image": "prasad/prasad2020/image"}}, "source.channels.image"),
        ({"timeout": 0}, "source.timeout"),
        ({"retries": -1}, "source.retries"),
    ],
)
def test_bad_config_values_name_their_key(kwargs: dict, key: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        BossDBSource(cache_dir=str(tmp_path), **kwargs)


def test_defaults_come_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("BOSS_HOST", "INTERN_HOST", "BOSS_PROTOCOL", "INTERN_PROTOCOL", "BOSSDB_TOKEN", "INTERN_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    src = BossDBSource(cache_dir=str(tmp_path))
    assert (src.host, src.protocol, src._token) == ("api.bossdb.io", "https", "public")
    monkeypatch.setenv("INTERN_HOST", "boss.example.org:8443")
    monkeypatch.setenv("BOSS_PROTOCOL", "http")
    monkeypatch.setenv("INTERN_TOKEN", "abc")
    src = BossDBSource(cache_dir=str(tmp_path))
    assert (src.host, src.protocol, src._token) == ("boss.example.org:8443", "http", "abc")


def test_source_group_composes() -> None:
    cfg = compose(["source=bossdb"])
    assert cfg.source._target_.endswith("BossDBSource") and cfg.source.token is None


SPLITS = (
    "task.splits.train=[{set:A,z:[110,118]}]",
    "task.splits.val=[{set:A,z:[118,122]}]",
    "task.splits.test=[{set:A,z:[132,136]}]",
)


def test_cli_train_downloads_once_then_runs_from_cache(boss: FakeBoss, tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    args = (
        "source=bossdb",
        f"source.host={boss.host}",
        "source.protocol=http",
        "source.backoff=0.01",
        f"paths.cache_dir={cache_dir}",
        *SPLITS,
    )
    env = {"BOSSDB_TOKEN": TOKEN}
    first = run_inproc("train.py", *args, run_dir=tmp_path / "run1", env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    assert boss.count("cutout") == 4 * 4  # 4 cubes x (2 train + 1 val + 1 test) chunks
    boss.reset_counts()
    second = run_inproc("train.py", *args, run_dir=tmp_path / "run2", env=env)
    assert second.returncode == 0, second.stderr[-3000:]
    assert boss.count() == 0
    assert set(read_metrics(tmp_path / "run2")) == set(read_metrics(tmp_path / "run1"))
    for path in files_under(tmp_path):
        assert TOKEN.encode() not in path.read_bytes(), path


@pytest.mark.slow
def test_download_command_fills_the_cache_for_an_offline_run(boss: FakeBoss, tmp_path: Path) -> None:
    import subprocess
    import sys

    from conftest import ROOT

    cache_dir = tmp_path / "cache"
    args = (
        f"source.host={boss.host}",
        "source.protocol=http",
        "task.label_mode=roi_majority",
        f"paths.cache_dir={cache_dir}",
        *SPLITS,
    )
    proc = subprocess.run(
        [sys.executable, "-m", "mtneuro_lab.download", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "roi_c1/test: 16 samples" in proc.stdout
    assert boss.count("cutout") == 2 * 4 * 4  # image and roi_labels (roi_majority reads both)
    boss.reset_counts()
    run = run_inproc("train.py", "source=bossdb", "source.offline=true", *args, run_dir=tmp_path / "run")
    assert run.returncode == 0, run.stderr[-3000:]
    assert boss.count() == 0 and read_metrics(tmp_path / "run")
    bad = run_inproc(
        "train.py",
        "source=bossdb",
        "source.offline=true",
        *args[:-1],
        "task.splits.test=[{set:B,z:[132,136]}]",
        run_dir=tmp_path / "bad",
    )
    assert bad.returncode == 2
    last = bad.stderr.strip().splitlines()[-1]
    assert last.startswith("error: bossdb offline: image cutout") and "x=[5312, 5568)" in last
    assert boss.count() == 0
