"""Paper-style tables from finished runs: group by experiment, mean ± std over seeds.

Pure functions over :class:`RunRecord` lists (no file access), so the report module and
notebooks share one definition of "a group", "a missing seed" and "mean ± std".
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

#: flat config keys (prefixes) that never make two runs different experiments
IGNORED_PREFIXES = (
    "seed",
    "paths",
    "hydra",
    "ckpt_path",
    "logger",
    "callbacks",
    "extras",
    "sweep",
    "tags",
    "trainer.enable_progress_bar",
    "trainer.enable_model_summary",
    "trainer.log_every_n_steps",
    "trainer.default_root_dir",
)
IGNORED_SUFFIXES = ("save_dir", "dirpath", "cache_dir", "data_dir")


@dataclass
class RunRecord:
    """One job directory: its status, seed, config (flattened), label and metrics."""

    path: str
    status: str  # done | failed | incomplete
    seed: int | None
    config: dict[str, Any]
    label: dict[str, str]  # what a reader calls the experiment: task, model, swept keys
    metrics: dict[str, float] = field(default_factory=dict)
    #: the text entries of metrics.json, e.g. ``selection/metric: val/acc``, ``selection/mode: max``
    info: dict[str, str] = field(default_factory=dict)
    error: str = ""
    table: str = "runs"  # sweep.name, or "runs"
    expected_seeds: tuple[int, ...] = ()
    layout: dict[str, Any] = field(default_factory=dict)


@dataclass
class Group:
    """Runs that differ only in their seed."""

    label: dict[str, str]
    runs: list[RunRecord]
    expected_seeds: tuple[int, ...] = ()

    @property
    def done(self) -> list[RunRecord]:
        return sorted((r for r in self.runs if r.status == "done"), key=lambda r: r.seed or 0)

    @property
    def failed(self) -> list[RunRecord]:
        done = {r.seed for r in self.done}
        return sorted((r for r in self.runs if r.status == "failed" and r.seed not in done), key=lambda r: r.seed or 0)

    @property
    def missing_seeds(self) -> list[int]:
        seen = {r.seed for r in self.runs if r.status in ("done", "failed")}
        return sorted(s for s in self.expected_seeds if s not in seen)

    def stat(self, metric: str) -> tuple[float, float, int]:
        """Mean, sample standard deviation (nan for n < 2) and n over the finished seeds."""
        values = [r.metrics[metric] for r in self.done if metric in r.metrics]
        return mean_std(values)

    def notes(self) -> list[str]:
        out = [f"seed {r.seed} failed ({r.error})" for r in self.failed]
        out += [
            f"seed {r.seed} incomplete (no metrics.json)"
            for r in self.runs
            if r.status == "incomplete" and r.seed not in {d.seed for d in self.done}
        ]
        if self.missing_seeds:
            out.append("missing seeds " + ", ".join(map(str, self.missing_seeds)))
        return out


def mean_std(values: Sequence[float]) -> tuple[float, float, int]:
    n = len(values)
    if n == 0:
        return math.nan, math.nan, 0
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan, 1
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var), n


def fmt(mean: float, std: float, digits: int = 3) -> str:
    if math.isnan(mean):
        return "—"
    if math.isnan(std):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists become tuples (hashable)."""
    if isinstance(tree, Mapping):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    if isinstance(tree, (list, tuple)):
        return {prefix[:-1]: tuple(repr(x) for x in tree)}
    return {prefix[:-1]: tree}


def experiment_key(config: Mapping[str, Any], ignore: Iterable[str] = ()) -> tuple:
    """The config minus seed, paths, loggers and other run noise: equal keys = one experiment."""
    prefixes = tuple(IGNORED_PREFIXES) + tuple(ignore)
    items = []
    for key, value in config.items():
        if any(key == p or key.startswith(p + ".") for p in prefixes):
            continue
        if key.rsplit(".", 1)[-1] in IGNORED_SUFFIXES:
            continue
        items.append((key, repr(value)))
    return tuple(sorted(items))


def group_runs(runs: Iterable[RunRecord], ignore: Iterable[str] = ()) -> dict[str, list[Group]]:
    """Groups per table (sweep name), in first-seen order; expected seeds per table."""
    tables: dict[str, dict[tuple, Group]] = {}
    expected: dict[str, set[int]] = {}
    for run in runs:
        groups = tables.setdefault(run.table, {})
        key = experiment_key(run.config, ignore)
        if key not in groups:
            groups[key] = Group(label=dict(run.label), runs=[])
        groups[key].runs.append(run)
        expected.setdefault(run.table, set()).update(run.expected_seeds)
    out: dict[str, list[Group]] = {}
    for name, groups in tables.items():
        seeds = expected[name] or {r.seed for g in groups.values() for r in g.runs if r.seed is not None}
        for g in groups.values():
            g.expected_seeds = tuple(sorted(seeds))
        out[name] = list(groups.values())
    _disambiguate(out)
    return out


def _disambiguate(tables: dict[str, list[Group]]) -> None:
    """Keep in each label only the keys that vary inside its table; name duplicates apart."""
    for groups in tables.values():
        keys = sorted({k for g in groups for k in g.label})
        varying = [k for k in keys if len({g.label.get(k, "") for g in groups}) > 1]
        for g in groups:
            g.label = {k: g.label.get(k, "") for k in varying} or {"experiment": "all"}
        seen: dict[tuple, int] = {}
        for g in groups:
            sig = tuple(sorted(g.label.items()))
            seen[sig] = seen.get(sig, 0) + 1
            if seen[sig] > 1:
                g.label["variant"] = str(seen[sig])


def metric_names(groups: Sequence[Group]) -> list[str]:
    names: list[str] = []
    for g in groups:
        for r in g.done:
            for m in r.metrics:
                if m not in names:
                    names.append(m)
    return sorted(names)


def label_columns(groups: Sequence[Group]) -> list[str]:
    cols: list[str] = []
    for g in groups:
        for k in g.label:
            if k not in cols:
                cols.append(k)
    return cols


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    def cell(x: str) -> str:
        return str(x).replace("|", "\\|")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def long_table(groups: Sequence[Group], metrics: Sequence[str]) -> tuple[list[str], list[list[str]]]:
    """One row per experiment: its label, ``mean ± std`` per metric, n, notes."""
    cols = label_columns(groups)
    header = [*cols, *metrics, "n", "notes"]
    rows = []
    for g in groups:
        stats = [fmt(*g.stat(m)[:2]) for m in metrics]
        rows.append([*(g.label.get(c, "") for c in cols), *stats, str(len(g.done)), "; ".join(g.notes())])
    return header, rows


def pivot_table(
    groups: Sequence[Group], rows_key: str, cols_key: str | None, metric: str
) -> tuple[list[str], list[list[str]]]:
    """Paper layout: ``rows_key`` down, ``cols_key`` across, ``mean ± std (n)`` of one metric."""
    row_values = list(dict.fromkeys(g.label.get(rows_key, "") for g in groups))
    col_values = list(dict.fromkeys(g.label.get(cols_key, "") for g in groups)) if cols_key else [metric]
    cells: dict[tuple[str, str], str] = {}
    for g in groups:
        mean, std, n = g.stat(metric)
        col = g.label.get(cols_key, "") if cols_key else metric
        cells[(g.label.get(rows_key, ""), col)] = f"{fmt(mean, std)} (n={n})"
    header = [rows_key, *col_values]
    body = [[r, *(cells.get((r, c), "—") for c in col_values)] for r in row_values]
    return header, body


def selection_of(groups: Sequence[Group]) -> tuple[str, str] | None:
    """``(metric, mode)`` that chose the checkpoints of every finished run, if they all agree."""
    found = {(r.info.get("selection/metric", ""), r.info.get("selection/mode", "")) for g in groups for r in g.done}
    if len(found) != 1:
        return None
    metric, mode = found.pop()
    return (metric, mode) if metric.startswith("val/") and mode in ("max", "min") else None


def best_group(groups: Sequence[Group], metric: str, maximize: bool) -> Group | None:
    scored = [(g.stat(metric)[0], g) for g in groups if not math.isnan(g.stat(metric)[0])]
    if not scored:
        return None
    return (max if maximize else min)(scored, key=lambda t: t[0])[1]
