"""benchmarks/bench_task3.py: the table built from read-out metrics, and which checkpoint is read out."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_task3 import best_checkpoint, readout_markdown, readout_overrides  # noqa: E402


def _entry(
    model: str, seed: int, pooled: float, region: float, within: float, shuffled: float, value: float | None = 0.9
) -> dict:
    blocked = {
        "r2_cv/axon_density": pooled,
        "test/r2_region_only/axon_density": region,
        "test/r2_within/axon_density": within,
    }
    return {
        "task": "roi_c1",
        "model": model,
        "seed": seed,
        "downsample": 4,
        "ckpt": f"/r/{seed}/e.ckpt",
        "selection_metric": "val/acc" if value is not None else None,
        "selection_value": value,
        "blocked": blocked,
        "shuffled": {"r2_cv/axon_density": shuffled},
    }


def _row(markdown: str, feature: str, label: str) -> list[str]:
    section = markdown.split(f"**{feature}**", 1)[1]
    line = next(x for x in section.splitlines() if x.startswith(f"| {label} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_markdown_aggregates_seeds_per_encoder_and_column():
    entries = [
        _entry("supervised", 1, 0.90, 0.80, 0.30, 0.95, 0.91),
        _entry("supervised", 2, 0.94, 0.82, 0.50, 0.97, 0.93),
        _entry("byol", 1, 0.70, 0.80, 0.10, 0.75),
    ]
    pca = {
        "task": "fit_samples",
        "model": "pca",
        "seed": 1,
        "downsample": 4,
        "ckpt": None,
        "selection_metric": None,
        "selection_value": None,
        "blocked": {"r2_cv/axon_density": 0.5},
        "shuffled": {},
    }
    md = readout_markdown([*entries, pca], features=("axon_density",))
    # mean ± sample std (ddof 1) over seeds 1 and 2: pooled 0.92 ± 0.028, within 0.40 ± 0.141
    assert _row(md, "axon_density", "supervised (roi_c1, ds 4)") == [
        "supervised (roi_c1, ds 4)",
        "0.920 ± 0.028",
        "0.810 ± 0.014",
        "0.400 ± 0.141",
        "0.960 ± 0.014",
    ]
    assert _row(md, "axon_density", "byol (roi_c1, ds 4)")[1:] == ["0.700", "0.800", "0.100", "0.750"]
    assert _row(md, "axon_density", "pca (fit_samples, ds 4)")[1:] == ["0.500", "n/a", "n/a", "n/a"]
    header = md.split("**axon_density**", 1)[1].splitlines()[2]
    assert header == (
        "| encoder | pooled CV R² | region-only CV R² | within-region CV R² | pooled CV R², shuffled folds |"
    )
    assert "| supervised (roi_c1, ds 4) | roi_c1 | supervised | 1, 2 | val/acc = 0.910, 0.930 |" in md
    assert "| pca (fit_samples, ds 4) | fit_samples | pca | 1 | none (fitted on task.fit_samples) |" in md


def test_markdown_says_when_no_selection_was_recorded():
    md = readout_markdown([_entry("mixup", 3, 0.5, 0.4, 0.2, 0.6, value=None)], features=("axon_density",))
    assert "| mixup (roi_c1, ds 4) | roi_c1 | mixup | 3 | not recorded |" in md


def _run(tmp_path: Path, names: list[str], metrics: dict | None) -> Path:
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    for name in names:
        (run / "checkpoints" / name).write_bytes(b"x")
    if metrics is not None:
        (run / "metrics.json").write_text(json.dumps(metrics))
    return run


@pytest.mark.parametrize(
    "names, metrics, expected",
    [
        (["epoch002.ckpt", "epoch005.ckpt", "last.ckpt"], {"best_epoch": 5}, "epoch005.ckpt"),
        (["epoch002.ckpt", "last.ckpt"], {"test/acc": 0.9}, "epoch002.ckpt"),  # the only non-last one
        (["epoch002.ckpt", "epoch005.ckpt", "last.ckpt"], {"test/acc": 0.9}, None),  # ambiguous: not guessed
        (["epoch000.ckpt", "last.ckpt"], None, None),  # still training: no metrics.json
        (["last.ckpt"], {"best_epoch": 3}, None),  # last.ckpt is never read out
        (["epoch003.ckpt", "last.ckpt"], {"best_epoch": 3, "selection/metric": "last"}, None),
    ],
)
def test_best_checkpoint_follows_best_epoch_and_never_takes_last(tmp_path, names, metrics, expected):
    found = best_checkpoint(_run(tmp_path, names, metrics))
    assert (found.name if found else None) == expected


def test_pca_is_fitted_here_and_encoders_are_read_from_their_checkpoint():
    pca = {"model": "pca", "ckpt": None, "seed": 1, "downsample": 2}
    cmd = readout_overrides(pca, "shuffled", ["model.n_components=64"])
    assert {"model=pca", "task.downsample=2", "task.cv=shuffled", "model.n_components=64"} <= set(cmd)
    enc = {"model": "byol", "ckpt": "/r/epoch001.ckpt", "seed": 7, "downsample": 4}
    cmd = readout_overrides(enc, "blocked", ["model.n_components=64", "task.cv_gap=1"])
    assert "ckpt_path=/r/epoch001.ckpt" in cmd and "seed=7" in cmd and "task.cv_gap=1" in cmd
    assert not any(c.startswith("model") for c in cmd)
