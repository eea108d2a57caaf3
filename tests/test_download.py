"""``mtneuro_lab.download.main`` in-process against the fake Boss server (the subprocess run of
``python -m mtneuro_lab.download`` is the slow test of test_bossdb.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from fake_boss import FakeBoss

from mtneuro_lab import download

SPLITS = (
    "task.splits.train=[{set:A,z:[110,112]}]",
    "task.splits.val=[{set:A,z:[112,114]}]",
    "task.splits.test=[{set:A,z:[124,126]}]",
)


def args(boss: FakeBoss, cache_dir: Path, *extra: str) -> list[str]:
    return [
        f"source.host={boss.host}",
        "source.protocol=http",
        "source.backoff=0.01",
        "source.progress=false",
        f"paths.cache_dir={cache_dir}",
        *SPLITS,
        *extra,
    ]


def test_main_fetches_every_split_then_an_offline_second_run_reads_the_cache(
    boss: FakeBoss, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert download.main(args(boss, tmp_path / "cache")) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in out] == ["roi_c1/train", "roi_c1/val", "roi_c1/test"]
    assert all(line.endswith(" samples") for line in out)
    fetched = boss.count("cutout")
    assert fetched > 0
    boss.reset_counts()
    assert download.main(args(boss, tmp_path / "cache", "source.offline=true")) == 0
    assert capsys.readouterr().out.splitlines() == out
    assert boss.count() == 0


def test_offline_with_an_empty_cache_is_one_error_line(
    boss: FakeBoss, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert download.main(args(boss, tmp_path / "empty", "source.offline=true")) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: bossdb offline: image cutout"), lines
    assert boss.count() == 0


def test_bad_value_names_its_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert download.main([f"paths.cache_dir={tmp_path}", "source.retries=-1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: source.retries"), err


def test_help_prints_the_usage_and_fetches_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    assert download.main(["--help"]) == 0
    assert "python -m mtneuro_lab.download task=roi_c1" in capsys.readouterr().out
