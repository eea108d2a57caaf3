"""Turn finished sweeps into paper-style tables: ``python -m mtneuro_lab.report DIR [DIR ...]``.

Reads every job directory below the given directories (``metrics.json``, ``failed.json``,
``config.yaml``, Hydra's ``.hydra/``), groups runs that differ only in their seed, and writes
``report.md``, ``report.csv`` and one PNG per table (mean ± std over seeds, error bars) to
``<first DIR>/report/`` or ``--out``. Failed, incomplete and missing seeds are named in the
notes of their row. See docs/sweeps.md.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from mtneuro_lab.analysis.tables import (
    IGNORED_PREFIXES,
    Group,
    RunRecord,
    best_group,
    flatten,
    fmt,
    group_runs,
    label_columns,
    long_table,
    markdown_table,
    metric_names,
    pivot_table,
    selection_of,
)
from mtneuro_lab.errors import ConfigError
from mtneuro_lab.io import atomic_write_bytes

#: Hydra group choices that name an experiment in a table
LABEL_GROUPS = ("task", "model", "source", "trainer")


def _load_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text()) if path.is_file() else None
    except (OSError, yaml.YAMLError):
        return None


def _parse_override(text: str) -> tuple[str, str]:
    key, _, value = text.lstrip("+~").partition("=")
    return key, value


def _ignored(key: str) -> bool:
    return key == "seed" or any(key == p or key.startswith(p + ".") for p in IGNORED_PREFIXES)


def describe(job_dir: Path, _depth: int = 0) -> dict[str, str]:
    """What a reader calls this run: task/model choices plus explicit overrides (not the seed).

    An ``evaluate.py`` run (``ckpt_path`` into another run directory) inherits the description
    of the training run that made the checkpoint, under its own overrides.
    """
    hydra_cfg = _load_yaml(job_dir / ".hydra" / "hydra.yaml") or {}
    choices = ((hydra_cfg.get("hydra") or {}).get("runtime") or {}).get("choices") or {}
    overrides = dict(_parse_override(o) for o in (_load_yaml(job_dir / ".hydra" / "overrides.yaml") or []))
    label: dict[str, str] = {}
    ckpt = overrides.get("ckpt_path")
    if ckpt and _depth < 3:
        train_dir = _run_dir_of(Path(ckpt))
        if train_dir is not None and train_dir.resolve() != job_dir.resolve():
            label.update(describe(train_dir, _depth + 1))
    if not label:
        label.update({g: str(choices[g]) for g in LABEL_GROUPS if choices.get(g) is not None})
    for key, value in overrides.items():
        if not _ignored(key) and not key.startswith("hydra."):
            label[key] = value
    return label


def _run_dir_of(ckpt: Path) -> Path | None:
    for parent in ckpt.parents:
        if (parent / "config.yaml").is_file():
            return parent
    return None


def read_run(job_dir: Path) -> RunRecord | None:
    """One job directory, or None if it is not a run (no config and no result)."""
    metrics_path, failed_path = job_dir / "metrics.json", job_dir / "failed.json"
    config = _load_yaml(job_dir / "config.yaml")
    if config is None:
        config = _load_yaml(job_dir / ".hydra" / "config.yaml")
    if config is None:
        return None
    metrics: dict[str, float] = {}
    info: dict[str, str] = {}
    error = ""
    if metrics_path.is_file():
        status = "done"
        try:
            for k, v in json.loads(metrics_path.read_text()).items():
                if isinstance(v, str):
                    info[k] = v
                else:
                    metrics[k] = float(v)
        except (ValueError, TypeError, AttributeError) as err:
            status, error = "failed", f"unreadable metrics.json ({err})"
    elif failed_path.is_file():
        status = "failed"
        try:
            error = str(json.loads(failed_path.read_text()).get("error", "failed"))
        except ValueError:
            error = "failed (unreadable failed.json)"
    else:
        status = "incomplete"
    sweep = config.get("sweep") or {}
    seed = config.get("seed")
    return RunRecord(
        path=str(job_dir),
        status=status,
        seed=int(seed) if isinstance(seed, int) else None,
        config=flatten(config),
        label=describe(job_dir),
        metrics=metrics,
        info=info,
        error=error,
        table=str(sweep.get("name") or "runs"),
        expected_seeds=tuple(int(s) for s in (sweep.get("seeds") or [])),
        layout=dict(sweep.get("report") or {}),
    )


def collect(dirs: Sequence[Path]) -> list[RunRecord]:
    """Every job directory below ``dirs`` (a directory with config.yaml or .hydra/config.yaml)."""
    runs: list[RunRecord] = []
    seen: set[Path] = set()
    for root in dirs:
        if not root.is_dir():
            raise ConfigError(f"report: {root} is not a directory")
        candidates = {p.parent for p in root.rglob("config.yaml") if p.parent.name != ".hydra"}
        candidates |= {p.parent.parent for p in root.rglob(".hydra/config.yaml")}
        for job_dir in sorted(candidates):
            if job_dir in seen or "report" in job_dir.relative_to(root).parts[:1]:
                continue
            seen.add(job_dir)
            run = read_run(job_dir)
            if run is not None:
                runs.append(run)
    if not runs:
        raise ConfigError(f"report: no run directories (config.yaml) below {', '.join(map(str, dirs))}")
    return runs


def _layout(groups: Sequence[Group]) -> dict[str, Any]:
    for g in groups:
        for r in g.runs:
            if r.layout:
                return r.layout
    return {}


def _plot(
    groups: Sequence[Group], metric: str, rows_key: str | None, cols_key: str | None, title: str, path: Path
) -> None:
    """Bars with error bars (sample std over seeds); grouped bars for a rows x cols layout."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def name(g: Group, keys: Sequence[str]) -> str:
        return ", ".join(f"{g.label[k]}" for k in keys if k in g.label) or "all"

    cols = label_columns(groups)
    row_keys = [rows_key] if rows_key in cols else [k for k in cols if k != cols_key]
    series_key = cols_key if cols_key in cols else None
    rows = list(dict.fromkeys(name(g, row_keys) for g in groups))
    series = list(dict.fromkeys(g.label.get(series_key, "") for g in groups)) if series_key else [""]
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(rows) * max(1, len(series)) + 1.5), 3.6))
    for i, s in enumerate(series):
        xs, means, stds = [], [], []
        for g in groups:
            if series_key and g.label.get(series_key, "") != s:
                continue
            mean, std, _ = g.stat(metric)
            xs.append(rows.index(name(g, row_keys)) + (i - (len(series) - 1) / 2) * width)
            means.append(0.0 if math.isnan(mean) else mean)
            stds.append(0.0 if math.isnan(std) else std)
        ax.bar(xs, means, width=width, yerr=stds, capsize=3, label=s or None)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(rows, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(metric)
    ax.set_title(title, fontsize=9)
    if series_key:
        ax.legend(fontsize=7, title=series_key, title_fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in text)


def build_report(
    dirs: Sequence[Path], out: Path, metric: str | None = None, ignore: Sequence[str] = (), plots: bool = True
) -> dict[str, Any]:
    """Write report.md, report.csv and PNGs into ``out``; returns a summary (paths, counts)."""
    runs = collect(dirs)
    tables = group_runs(runs, ignore)
    out.mkdir(parents=True, exist_ok=True)
    md = [f"# Report of {', '.join(str(d) for d in dirs)}", ""]
    csv_buf = io.StringIO()
    writer = csv.writer(csv_buf)
    label_keys = sorted({k for groups in tables.values() for k in label_columns(groups)})
    writer.writerow(["table", *label_keys, "metric", "mean", "std", "n", "seeds", "failed_seeds", "missing_seeds"])
    pngs: list[str] = []
    for name, groups in tables.items():
        metrics = metric_names(groups)
        layout = _layout(groups)
        main_metric = metric or layout.get("metric") or (metrics[0] if metrics else None)
        n_runs = sum(len(g.runs) for g in groups)
        n_done = sum(len(g.done) for g in groups)
        md += [
            f"## {name}",
            "",
            f"{len(groups)} experiment(s), {n_done}/{n_runs} job(s) finished; "
            f"mean ± sample std over seeds, n = finished seeds. Expected seeds: "
            f"{', '.join(map(str, groups[0].expected_seeds)) or '—'}.",
            "",
        ]
        rows_key, cols_key = layout.get("rows"), layout.get("cols")
        cols = label_columns(groups)
        if main_metric and rows_key in cols:
            header, body = pivot_table(groups, rows_key, cols_key if cols_key in cols else None, main_metric)
            md += [f"**{main_metric}**", "", markdown_table(header, body), ""]
        header, body = long_table(groups, metrics)
        md += [markdown_table(header, body), ""]
        chosen = selection_lines(groups, layout)
        if chosen:
            md += ["Selection:", "", *chosen, ""]
        notes = [f"- {', '.join(f'{k}={v}' for k, v in g.label.items())}: {n}" for g in groups for n in g.notes()]
        if notes:
            md += ["Notes:", "", *notes, ""]
        for g in groups:
            seeds = ";".join(str(r.seed) for r in g.done)
            failed = ";".join(str(r.seed) for r in g.failed)
            missing = ";".join(map(str, g.missing_seeds))
            for m in metrics:
                mean, std, n = g.stat(m)
                writer.writerow(
                    [
                        name,
                        *(g.label.get(k, "") for k in label_keys),
                        m,
                        "" if math.isnan(mean) else f"{mean:.6g}",
                        "" if math.isnan(std) else f"{std:.6g}",
                        n,
                        seeds,
                        failed,
                        missing,
                    ]
                )
        if plots and main_metric:
            png = out / f"{_slug(name)}.png"
            _plot(groups, main_metric, rows_key, cols_key, f"{name}: {main_metric} (mean ± std)", png)
            md += [f"![{name}]({png.name})", ""]
            pngs.append(str(png))
    atomic_write_bytes(out / "report.md", "\n".join(md).encode())
    atomic_write_bytes(out / "report.csv", csv_buf.getvalue().encode())
    return {
        "out": str(out),
        "tables": {n: len(g) for n, g in tables.items()},
        "runs": len(runs),
        "pngs": pngs,
        "groups": tables,
    }


def refuse_test_metric(metric: str, key: str = "--best") -> None:
    if metric.startswith("test/"):
        raise ConfigError(f"{key}: {metric} selects on the test split; use a val/ metric")


def _direction(groups: Sequence[Group], metric: str, minimize: bool | None) -> bool:
    """True = higher is better: ``--minimize`` if given, else the runs' own selection mode."""
    if minimize is not None:
        return not minimize
    chosen = selection_of(groups)
    if chosen is not None and chosen[0] == metric:
        return chosen[1] == "max"
    return not metric.endswith("loss")


def choose(groups: Sequence[Group], metric: str | None, minimize: bool | None = None) -> tuple[Group, str, bool]:
    """The best experiment of one table on validation: ``(group, metric, maximize)``.

    ``metric=None`` uses the metric that chose the runs' checkpoints (``selection/metric``).
    """
    if metric is None:
        chosen = selection_of(groups)
        if chosen is None:
            raise ConfigError(
                "--best: the runs record no common selection metric (metrics.json "
                "selection/metric); name a val/ metric: --best val/<metric>"
            )
        metric = chosen[0]
    refuse_test_metric(metric)
    maximize = _direction(groups, metric, minimize)
    g = best_group(groups, metric, maximize)
    if g is None:
        raise ConfigError(f"--best: no finished run has metric {metric!r}")
    return g, metric, maximize


def summarise_test_metrics(g: Group, first: str | None = None, limit: int = 8) -> str:
    """``test/acc = 0.93 ± 0.01, ...``: the chosen cell's test metrics (``first`` leads)."""
    names = [m for m in metric_names([g]) if m.startswith("test/")]
    if first in names:
        names.remove(first)
        names.insert(0, first)
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(f"{m} = {fmt(*g.stat(m)[:2])}" for m in names[:limit]) + more


def best_setting(
    dirs: Sequence[Path], metric: str | None = None, minimize: bool | None = None, ignore: Sequence[str] = ()
) -> str:
    """The best experiment by the mean of a validation metric, as the overrides that reproduce
    it, with its test metrics beside it (read, never used to choose)."""
    if metric is not None:
        refuse_test_metric(metric)
    tables = group_runs(collect(dirs), ignore)
    lines = []
    for name, groups in tables.items():
        try:
            g, used, maximize = choose(groups, metric, minimize)
        except ConfigError as err:
            raise ConfigError(f"{err} (table {name})") from None
        mean, std, n = g.stat(used)
        overrides = " ".join(f"{k}={v}" for k, v in describe(Path(g.done[0].path)).items())
        layout_metric = _layout(groups).get("metric")
        lines.append(
            f"{name}: best {used} ({'max' if maximize else 'min'}) = {fmt(mean, std)} (n={n}) with: "
            f"{overrides}\n  test metrics of that setting: {summarise_test_metrics(g, layout_metric)}"
        )
    return "\n".join(lines)


def selection_lines(groups: Sequence[Group], layout: dict[str, Any]) -> list[str]:
    """The report's 'Selection' notes: the choice on validation, and a paper's test-split choice
    (``sweep.report.paper_choice``) labelled as such, for comparison only."""
    if len(groups) < 2:
        return []
    out = []
    try:
        g, metric, maximize = choose(groups, None)
    except ConfigError:
        return []
    label = ", ".join(f"{k}={v}" for k, v in g.label.items())
    out.append(
        f"- Chosen on validation ({metric}, {'max' if maximize else 'min'} of the mean over seeds): "
        f"**{label}**; its test metrics: {summarise_test_metrics(g, layout.get('metric'))}."
    )
    paper = layout.get("paper_choice")
    if paper:
        pg = best_group(groups, str(paper), not str(paper).endswith("loss"))
        if pg is not None:
            plabel = ", ".join(f"{k}={v}" for k, v in pg.label.items())
            out.append(
                f"- The paper's way (best mean {paper}: chooses on the test split, so its test figure is "
                f"optimistic; shown for comparison only): {plabel} ({fmt(*pg.stat(str(paper))[:2])})."
            )
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mtneuro_lab.report", description=__doc__.splitlines()[0])
    parser.add_argument("dirs", nargs="+", type=Path, help="multirun/sweep directories (or run directories)")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default <first dir>/report)")
    parser.add_argument("--metric", default=None, help="metric of the pivot table and plot (default: the sweep's)")
    parser.add_argument(
        "--ignore", action="append", default=[], help="config key (prefix) that does not split experiments; repeatable"
    )
    parser.add_argument(
        "--best",
        metavar="VAL_METRIC",
        nargs="?",
        const="",
        default=None,
        help="print the best experiment by a validation metric's mean (default: the metric "
        "that chose the runs' checkpoints) with its test metrics, and exit; "
        "test/ metrics are refused",
    )
    direction = parser.add_mutually_exclusive_group()
    direction.add_argument(
        "--minimize",
        dest="minimize",
        action="store_const",
        const=True,
        default=None,
        help="with --best: lower is better (default: the runs' selection mode)",
    )
    direction.add_argument("--maximize", dest="minimize", action="store_const", const=False)
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args(argv)
    try:
        if args.best is not None:
            print(best_setting(args.dirs, args.best or None, args.minimize, args.ignore))
            return 0
        out = args.out or args.dirs[0] / "report"
        summary = build_report(args.dirs, out, args.metric, args.ignore, plots=not args.no_plots)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    tables = ", ".join(f"{n} ({k} experiments)" for n, k in summary["tables"].items())
    print(
        f"report: {summary['runs']} runs -> {tables}; wrote {out / 'report.md'}, {out / 'report.csv'}"
        + (f", {len(summary['pngs'])} PNG" if summary["pngs"] else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
