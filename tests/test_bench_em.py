"""benchmarks/bench_em.py: two invocations on one work directory keep each other's runs, and the
provenance line says how many runs shared the machine."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import bench_em  # noqa: E402


def _run(started: float, wall: float, arand: float = 0.1) -> dict:
    return {"test/arand": arand, "wall_s": wall, "started_unix": started}


def _new(train: dict, seeds: list[int]) -> dict:
    budget = {"steps": 1024, "pretrain_steps": 8000, "seeds": seeds}
    return {"split": "x", "tta": "flips", "budget": budget, "train": train}


def test_two_invocations_read_at_the_same_time_both_keep_their_runs(tmp_path: Path) -> None:
    results = tmp_path / "results.json"
    old = {"split": "x", "tta": "flips", "train": {"gala_fibsem/rsunet/s1": _run(0, 10)}, "wall_s": {"train": 5.0}}
    results.write_text(json.dumps(old))
    # both started from `old`; the second writes after the first and must not drop its runs
    bench_em.record(results, _new({"gala_fibsem/unetr/s1": _run(20, 10)}, [1]), "train", 3.0)
    res = bench_em.record(results, _new({"gala_fibsem/mae/s2": _run(20, 10)}, [2]), "pretrain+train", 4.0)
    assert sorted(res["train"]) == ["gala_fibsem/mae/s2", "gala_fibsem/rsunet/s1", "gala_fibsem/unetr/s1"]
    assert res["budget"]["seeds"] == [1, 2]
    assert res["wall_s"] == {"train": 8.0, "pretrain+train": 4.0}
    assert json.loads(results.read_text()) == res
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")] == []


def test_a_rerun_replaces_its_own_entry() -> None:
    res = bench_em.merge({"train": {"t/m/s1": {"failed": "oom"}}}, _new({"t/m/s1": _run(0, 1)}, [1]), "train", 1.0)
    assert res["train"]["t/m/s1"]["test/arand"] == 0.1
    assert res["split"] == "x" and res["tta"] == "flips"


def test_runs_at_once_from_recorded_start_and_wall_times(tmp_path: Path) -> None:
    sequential = {"train": {"a": _run(0, 10), "b": _run(10, 10), "c": _run(20, 5)}}
    assert bench_em.at_once(sequential, tmp_path) == 1  # one ends as the next starts
    two_tracks = {"train": {"a": _run(0, 10), "b": _run(10, 10), "c": _run(3, 12)}, "pretrain": _run(30, 5)}
    assert bench_em.at_once(two_tracks, tmp_path) == 2
    assert bench_em._runs_at_once(1) == "one run at a time"
    assert bench_em._runs_at_once(2).startswith("up to 2 runs at a time")


def test_runs_recorded_before_start_times_end_at_their_metrics_file(tmp_path: Path) -> None:
    for name, end in (("t/m/s1", 1000.0), ("t/m/s2", 1005.0)):
        run_dir = tmp_path / "runs" / name
        run_dir.mkdir(parents=True)
        (run_dir / "metrics.json").write_text("{}")
        os.utime(run_dir / "metrics.json", (end, end))
    res = {"train": {"t/m/s1": {"wall_s": 100.0}, "t/m/s2": {"wall_s": 100.0}, "t/m/s3": {"failed": "x"}}}
    assert bench_em.at_once(res, tmp_path) == 2  # 900-1000 and 905-1005 overlap
    res["train"]["t/m/s2"]["wall_s"] = 4.0  # 1001-1005: after the first
    assert bench_em.at_once(res, tmp_path) == 1


def _scored(arand: float) -> dict:
    return {"test/arand": arand, "test/voi_split": 0.3, "test/voi_merge": 0.2, "test/infer_cpu_s": 2.0}


def test_real_table_names_missing_seeds_and_compares_mae_with_scratch_on_shared_seeds() -> None:
    seg = {"arand": 0.9, "voi_split": 0.0, "voi_merge": 4.6, "n_pred": 1, "n_gt": 132}
    ws = {"arand": 0.07, "voi_split": 0.5, "voi_merge": 0.1, "n_pred": 400, "n_gt": 132}
    floor = {"test_voxels": 1000, "one_segment": seg, "watershed": ws, "watershed_test_cpu_s": 1.0}
    floor |= {"watershed_val": {"arand": 0.11}, "watershed_params": {"sigma": 1.0}}
    runs = {"gala_fibsem/unetr/s1": _scored(0.30), "gala_fibsem/unetr/s2": _scored(0.20)}
    runs |= {"gala_fibsem/mae/s1": _scored(0.10), "gala_fibsem/mae/s2": {"failed": "diverged"}}
    runs |= {"gala_fibsem/rsunet/s1": _scored(0.04), "gala_fibsem/rsunet/s2": _scored(0.03)}
    for run in runs.values():
        run["test/voxels"], run["val/arand"], run["test/n_pred"] = 1000, 0.2, 63
    text, checks = bench_em.real_table({"train": runs, "floors": {"gala_fibsem": floor}})
    assert "| mae | 0.100 (seeds 1; seed 2 FAILED) | **0.100** | 0.300 / 0.200 | 63 |" in text
    assert "| test segments per seed (132 labelled) |" in text
    assert "| intensity watershed (floor) | | 0.070 | 0.500 / 0.100 | 400 |" in text
    by_name = {c["name"]: c for c in checks}
    mae = by_name["gala_fibsem mae: mean test/arand below unetr from scratch on the same seeds (1 of 2 seeds)"]
    assert (mae["target"], mae["passed"]) == ("< 0.3000", True)  # seed 1's scratch run only
    half = by_name["gala_fibsem rsunet: mean test/arand at most half the watershed floor's"]
    assert (half["value"], half["passed"]) == (0.035, True)
    assert by_name["gala_fibsem unetr: mean test/arand below both floors"]["passed"] is False
