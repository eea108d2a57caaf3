"""Task 3 read-outs of trained Task 1 encoders and PCA: pooled, region-only and within-region R².

    .venv/bin/python benchmarks/bench_task3.py --runs outputs/sweeps/task1   # every Task 1 run below it
    .venv/bin/python benchmarks/bench_task3.py --runs DIR --tiny --limit 1   # smoke test (20 slices)

For every run directory below ``--runs`` with ``config.yaml`` and a best checkpoint (the one
``metrics.json``'s ``best_epoch`` names, else the only ``checkpoints/*.ckpt`` that is not
``last.ckpt``), and for PCA fitted on ``task.fit_samples`` at each encoder resolution, the
user's command ``evaluate.py task=semantic`` runs twice, one subprocess each (``--jobs`` in
parallel, CPU threads split between them): with the default blocked z folds and with
``task.cv=shuffled``. The per-feature table (mean ± std over the seeds found) goes into
docs/task3.md, block ``task3_readout``. Nothing here chooses anything on the read-out: the
checkpoints were chosen on Task 1 validation, and the table names the metric that chose them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.cli_runs import run_many  # noqa: E402
from benchmarks.doc_blocks import write_block  # noqa: E402
from mtneuro_lab.analysis.tables import fmt, mean_std  # noqa: E402
from mtneuro_lab.data.features import FEATURES  # noqa: E402
from mtneuro_lab.data.sources.phantom_tissue import GENERATOR_REVISION  # noqa: E402

DOC = ROOT / "docs" / "task3.md"
BLOCK = "task3_readout"
TINY = (
    "task.samples=[{set: A, z: [110, 130]}]",
    "task.fit_samples=[{set: A, z: [130, 150]}]",
    "task.cv_gap=1",
    "model.n_components=64",
)
#: (column title, fold mode, metrics.json key prefix) of the table, in order
COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("pooled CV R²", "blocked", "r2_cv"),
    ("region-only CV R²", "blocked", "test/r2_region_only"),
    ("within-region CV R²", "blocked", "test/r2_within"),
    ("pooled CV R², shuffled folds", "shuffled", "r2_cv"),
)


# -- finding the encoders -------------------------------------------------------------------
def best_checkpoint(run: Path) -> Path | None:
    """The checkpoint Task 1 validation chose, or None (only ``last.ckpt``, or ambiguous)."""
    metrics = _read_json(run / "metrics.json")
    if not metrics:
        return None  # not finished (or failed): its checkpoints are not the chosen ones yet
    if metrics.get("selection/metric") == "last":
        return None  # no monitored checkpoint: the run tested its last weights
    if "best_epoch" in metrics:
        named = run / "checkpoints" / f"epoch{int(metrics['best_epoch']):03d}.ckpt"
        if named.is_file():
            return named
    others = [p for p in sorted((run / "checkpoints").glob("*.ckpt")) if p.name != "last.ckpt"]
    return others[0] if len(others) == 1 else None


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def find_encoders(runs: Path, limit: int | None = None, models: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Every Task 1 run below ``runs`` with a best checkpoint (of one of ``models``, if given)."""
    from omegaconf import OmegaConf

    found = []
    for config in sorted(runs.rglob("config.yaml")):
        run = config.parent
        if not (run / "checkpoints").is_dir():
            continue
        ckpt = best_checkpoint(run)
        if ckpt is None:
            print(f"skipped {run}: unfinished, or no best checkpoint (only last.ckpt, or several)", file=sys.stderr)
            continue
        cfg = OmegaConf.load(config)
        if models and _model_name(run, cfg) not in models:
            continue
        metrics = _read_json(run / "metrics.json")
        found.append(
            {
                "run": str(run),
                "ckpt": str(ckpt),
                "task": str(cfg.task.name),
                "model": _model_name(run, cfg),
                "seed": int(cfg.seed),
                "downsample": int(cfg.task.downsample),
                "selection_metric": metrics.get("selection/metric"),
                "selection_value": metrics.get("selection/value"),
            }
        )
    return found[:limit] if limit else found


def _model_name(run: Path, cfg: Any) -> str:
    """The Hydra choice (``supervised``, ``byol``...) the run was trained with, else the class name."""
    from mtneuro_lab.report import describe

    return describe(run).get("model") or str(cfg.model._target_).rsplit(".", 1)[-1]


# -- running the read-outs ------------------------------------------------------------------
def readout_overrides(entry: Mapping[str, Any], cv: str, extra: Sequence[str]) -> list[str]:
    """Overrides of the user's ``evaluate.py task=semantic`` for one encoder (or PCA) and fold mode."""
    args = ["task=semantic", "logger=none", "task.umap=false", f"task.cv={cv}", f"seed={entry['seed']}"]
    if entry["model"] == "pca" and not entry.get("ckpt"):
        args += ["model=pca", f"task.downsample={entry['downsample']}"]
    else:
        args.append(f"ckpt_path={entry['ckpt']}")
    # model.* overrides only apply to the PCA fitted here (a checkpoint's model is rebuilt from its run)
    return args + [e for e in extra if entry.get("ckpt") is None or not e.startswith("model.")]


def pca_entries(encoders: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One PCA read-out per encoder resolution (PCA is fitted here, on ``task.fit_samples``)."""
    resolutions = sorted({int(e["downsample"]) for e in encoders}) or [2]
    seed = min((int(e["seed"]) for e in encoders), default=1)
    return [
        {
            "run": "",
            "ckpt": None,
            "task": "fit_samples",
            "model": "pca",
            "seed": seed,
            "downsample": d,
            "selection_metric": None,
            "selection_value": None,
        }
        for d in resolutions
    ]


def run_all(entries: Sequence[dict[str, Any]], out: Path, jobs: int, extra: Sequence[str]) -> list[dict[str, Any]]:
    """Both fold modes of every entry through ``benchmarks/cli_runs.run_many``; entries gain their metrics."""
    runs = {}
    for i, entry in enumerate(entries):
        # named by what it reads out (not by position), so a rerun with more encoders reuses it
        name = f"{entry['task']}_{entry['model']}_ds{entry['downsample']}_seed{entry['seed']}"
        for cv in ("blocked", "shuffled"):
            runs[(i, cv)] = (out / name / cv, readout_overrides(entry, cv, extra))
    for (i, cv), metrics in run_many(runs, jobs=jobs, script="evaluate.py").items():
        entries[i][cv] = metrics
    return list(entries)


# -- the table (pure) -----------------------------------------------------------------------
def encoder_label(entry: Mapping[str, Any]) -> str:
    return f"{entry['model']} ({entry['task']}, ds {entry['downsample']})"


def _mean_std(values: Sequence[float]) -> str:
    """``mean ± sample std`` over seeds (the report's own formatting); one value alone."""
    return fmt(*mean_std(values)[:2]) if values else "n/a"


def _groups(entries: Sequence[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for entry in entries:
        groups.setdefault(encoder_label(entry), []).append(entry)
    return groups


def _selection_text(group: Sequence[Mapping[str, Any]]) -> str:
    chosen = [e for e in group if e.get("selection_metric")]
    if group[0]["model"] == "pca" and not group[0].get("ckpt"):
        return "none (fitted on task.fit_samples)"
    if not chosen:
        return "not recorded"
    metric = chosen[0]["selection_metric"]
    values = ", ".join(f"{float(e['selection_value']):.3f}" for e in chosen if e.get("selection_value") is not None)
    return f"{metric} = {values}" if values else str(metric)


def readout_markdown(entries: Sequence[Mapping[str, Any]], features: Sequence[str] = FEATURES) -> str:
    """Markdown of the read-outs: the encoders, then one table per feature (mean ± std over seeds).

    Each entry holds ``task``, ``model``, ``seed``, ``downsample``, ``selection_metric``,
    ``selection_value`` and the ``blocked`` and ``shuffled`` read-outs' metrics.json dicts. The
    std is the sample std over seeds (ddof 1); one seed shows the value alone.
    """
    groups = _groups(entries)
    lines = ["| encoder | Task 1 task | model | seeds | checkpoint chosen by (validation) |", "|---|---|---|---|---|"]
    for label, group in groups.items():
        seeds = ", ".join(str(s) for s in sorted({int(e["seed"]) for e in group}))
        lines.append(f"| {label} | {group[0]['task']} | {group[0]['model']} | {seeds} | {_selection_text(group)} |")
    for feature in features:
        lines += [
            "",
            f"**{feature}**",
            "",
            "| encoder | " + " | ".join(c[0] for c in COLUMNS) + " |",
            "|---" * (len(COLUMNS) + 1) + "|",
        ]
        for label, group in groups.items():
            cells = []
            for _, cv, key in COLUMNS:
                values = [float(e[cv][f"{key}/{feature}"]) for e in group if f"{key}/{feature}" in e.get(cv, {})]
                cells.append(_mean_std(values))
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--runs",
        type=Path,
        default=ROOT / "outputs" / "bench_task1" / "roi_c1",
        help="directory holding trained Task 1 run directories (default: bench_task1's ROI-C1 runs)",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench_task3_readout")
    parser.add_argument("--jobs", type=int, default=1, help="read-out subprocesses at a time")
    parser.add_argument("--limit", type=int, default=None, help="read out only the first N encoders")
    parser.add_argument("--tiny", action="store_true", help="20 slices, small PCA: a smoke test, not figures")
    parser.add_argument("--no-pca", action="store_true")
    parser.add_argument(
        "--models",
        nargs="+",
        default=["supervised", "mixup", "byol", "myow", "myow_m"],
        help="Task 1 models whose checkpoints are read out (encoders; PCA is fitted here)",
    )
    parser.add_argument("--doc", type=Path, default=DOC, help="Markdown file receiving the block")
    parser.add_argument(
        "--block", default=BLOCK, help="bench block of --doc (another name keeps the default's figures)"
    )
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs: must be >= 1, got {args.jobs}")
    if not args.runs.is_dir():
        parser.error(f"--runs: no directory {args.runs}")
    start = time.perf_counter()
    encoders = find_encoders(args.runs, args.limit, args.models)
    if not encoders:
        parser.error(f"--runs: no run directory with config.yaml and a best checkpoint below {args.runs}")
    entries = encoders + ([] if args.no_pca else pca_entries(encoders))
    extra = list(TINY) if args.tiny else []
    run_all(entries, args.out, args.jobs, extra)
    markdown = readout_markdown(entries)
    gap = "1-slice" if args.tiny else "12-slice"
    facts = {
        "folds": f"5 (blocked z folds, {gap} gap; shuffled KFold for the last column)",
        "read-outs": str(args.out.resolve().relative_to(ROOT) if args.out.resolve().is_relative_to(ROOT) else args.out),
        "phantom": f"source.generator default: v2 revision {GENERATOR_REVISION}",
    }
    if args.tiny:
        facts["mode"] = "TINY smoke test (20 slices), not figures"
    write_block(args.doc, args.block, markdown, time.perf_counter() - start, facts)
    print(markdown)
    return markdown


if __name__ == "__main__":
    main()
