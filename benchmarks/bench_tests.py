"""The default test suite of two git revisions, measured in one run on one machine.

Usage::

    python benchmarks/bench_tests.py --base 4ae8a19 [--head HEAD] [--workers 2] [--repeats 1]
        [--pytest-args "-k cli"] [--no-coverage | --coverage-only] [--print-only] [--doc docs/contributing.md]

Each revision is checked out into a temporary ``git worktree`` (beside a link to the shared data
directory, so that tests needing ``../shared/data`` run in both) and its suite runs from that
worktree's root with this interpreter (same venv; the worktree's own ``mtneuro_lab`` is imported
first), as ``make test`` runs it: ``python -m pytest -q -n <workers>``.

Per revision:

* **coverage run** (first, untimed: it also fills the phantom cache both revisions share):
  line coverage of ``mtneuro_lab`` with pytest-cov, subprocesses included (coverage's
  ``patch = subprocess``: the CLI runs of the older suites are subprocesses);
* **timing runs** without coverage (coverage slows tests unevenly): wall time and CPU time
  (user + system of pytest, its workers and every process they start); base and head alternate
  when ``--repeats`` > 1 and the medians are kept;
* test counts (passed, skipped, failed, errors) from pytest's summary line.

``--coverage-only`` runs the coverage runs alone (their figures do not depend on the machine's
load, so they can run on a busy machine) into the ``test_suite_coverage`` block. A revision's
coverage figure is kept in ``--coverage-record`` (JSON, keyed by commit, worker count and pytest
arguments) and reused by later runs, so a fixed base is measured once; the table says which
figures were reused and when they were measured.

The result table goes into the ``<!-- bench:test_suite -->`` block of docs/contributing.md (or
docs/benchmarks.md while contributing.md does not exist) with the head/base ratios: absolute
times depend on the machine and its load; ratios are of two runs made here, one after the other
(the load average before each run is recorded). ``main()`` returns the figures (run_all
convention); ``make bench`` leaves this benchmark out (it needs ``--base``; run it directly).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python benchmarks/bench_tests.py` from the project root
    sys.path.insert(0, str(ROOT))

from benchmarks.doc_blocks import write_block

BLOCK = "test_suite"
#: what pytest's last line counts ("601 passed, 1 skipped, 3 warnings in 507.12s")
COUNTED = ("passed", "skipped", "failed", "errors")
COVERAGE_RC = """\
[run]
source_pkgs = mtneuro_lab
patch = subprocess
"""


@dataclass
class Revision:
    """One revision's worktree and what its runs measured."""

    label: str
    rev: str
    commit: str = ""
    path: Path = Path()
    wall_s: list[float] = field(default_factory=list)
    cpu_s: list[float] = field(default_factory=list)
    load: list[float] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    coverage: float | None = None
    statements: int | None = None
    coverage_counts: dict[str, int] = field(default_factory=dict)
    coverage_when: str = ""  # set when the figure was reused from an earlier run


def parse_counts(text: str) -> dict[str, int]:
    """Test counts from pytest's final summary line (``error`` and ``errors`` both count)."""
    lines = [ln for ln in text.splitlines() if re.search(r"\bin [\d.]+s\b", ln)]
    if not lines:
        return {}
    found = {k: 0 for k in COUNTED}
    for number, word in re.findall(r"(\d+) (\w+)", lines[-1]):
        key = "errors" if word in ("error", "errors") else word
        if key in found:
            found[key] += int(number)
    return found


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, check=True, capture_output=True, text=True).stdout.strip()


@contextmanager
def worktrees(revisions: Sequence[Revision]) -> Iterator[Path]:
    """Check each revision out into ``<tmp>/<label>``; ``<tmp>/shared`` links to the shared data."""
    tmp = Path(tempfile.mkdtemp(prefix="bench_tests-"))
    shared = ROOT.parent / "shared"
    if shared.is_dir():
        (tmp / "shared").symlink_to(shared)
    try:
        for r in revisions:
            r.commit = _git("rev-parse", "--short", r.rev)
            r.path = tmp / r.label
            _git("worktree", "add", "--detach", str(r.path), r.commit)
        yield tmp
    finally:
        for r in revisions:
            if r.path != Path() and r.path.exists():
                subprocess.run(["git", "worktree", "remove", "--force", str(r.path)], cwd=ROOT, check=False)
        subprocess.run(["git", "worktree", "prune"], cwd=ROOT, check=False)
        shutil.rmtree(tmp, ignore_errors=True)


def _env(tmp: Path) -> dict[str, str]:
    """What ``make test`` sets; run outputs in the temporary directory; one phantom cache for both
    revisions (``$MTNEURO_CACHE``, else this checkout's ``.cache``), kept for the next run."""
    env = {**os.environ, "PYTHONHASHSEED": "0", "MTNEURO_OUTPUTS": str(tmp / "outputs")}
    env.setdefault("MTNEURO_CACHE", str(ROOT / ".cache"))
    for key in ("PYTEST_ADDOPTS", "PYTEST_XDIST_WORKER", "COVERAGE_PROCESS_START"):
        env.pop(key, None)
    return env


def run_suite(r: Revision, tmp: Path, workers: int, pytest_args: list[str], cov: bool) -> tuple[str, float, float]:
    """One pytest run in the revision's worktree: (output, wall seconds, CPU seconds of all children)."""
    name = f"{r.label}-{'cov' if cov else 'time'}-{len(r.wall_s)}"
    args = [sys.executable, "-m", "pytest", "-q", "-n", str(workers), "-p", "no:cacheprovider"]
    (tmp / "pytest").mkdir(exist_ok=True)  # pytest creates the basetemp itself, not its parent
    args += [f"--basetemp={tmp / 'pytest' / name}", *pytest_args]
    if cov:
        rc = tmp / "coveragerc"
        rc.write_text(COVERAGE_RC)
        report = tmp / f"{name}.json"
        args += ["--cov=mtneuro_lab", f"--cov-config={rc}", f"--cov-report=json:{report}"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(args, cwd=r.path, env=_env(tmp), capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    output = proc.stdout + proc.stderr
    if cov:
        totals = json.loads(report.read_text())["totals"] if report.is_file() else {}
        r.coverage = totals.get("percent_covered")
        r.statements = totals.get("num_statements")
    if not parse_counts(output):  # the suite did not run: no figure from it
        sys.exit(f"error: {r.label} ({r.commit}): pytest gave no summary line; its output ends:\n{output[-3000:]}")
    return output, wall, cpu


def _record_key(commit: str, workers: int, pytest_args: list[str]) -> str:
    return " ".join([commit, f"-n{workers}", *pytest_args])


def load_record(path: Path | None) -> dict[str, dict]:
    if path is None or not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        sys.exit(f"error: --coverage-record {path} is not JSON ({err}); delete it or name another file")


def save_record(path: Path | None, record: dict[str, dict]) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True))
    tmp.replace(path)  # atomic: a killed run never leaves half a record


def measure(
    revisions: list[Revision],
    workers: int,
    repeats: int,
    pytest_args: list[str],
    cov: bool,
    record_path: Path | None = None,
) -> None:
    """Coverage runs (when ``cov``; a recorded figure of the same commit is reused), then
    ``repeats`` alternating timing runs (none when 0)."""
    record = load_record(record_path)
    with worktrees(revisions) as tmp:
        if cov:
            for r in revisions:
                key = _record_key(r.commit, workers, pytest_args)
                if key in record:
                    kept = record[key]
                    r.coverage, r.statements = kept["coverage"], kept["statements"]
                    r.coverage_counts, r.coverage_when = kept["counts"], kept["when"]
                    print(f"{r.label} coverage reused from {r.coverage_when}: {r.coverage}", flush=True)
                    continue
                out, _, _ = run_suite(r, tmp, workers, pytest_args, cov=True)
                r.coverage_counts = parse_counts(out)
                record[key] = {
                    "coverage": r.coverage,
                    "statements": r.statements,
                    "counts": r.coverage_counts,
                    "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                }
                save_record(record_path, record)
                print(f"{r.label} coverage run: {r.coverage_counts}, {r.coverage}", flush=True)
            for r in revisions:
                r.counts = r.counts or r.coverage_counts
        for _ in range(repeats):
            for r in revisions:
                r.load.append(os.getloadavg()[0])
                out, wall, cpu = run_suite(r, tmp, workers, pytest_args, cov=False)
                r.wall_s.append(wall)
                r.cpu_s.append(cpu)
                r.counts = parse_counts(out)
                print(f"{r.label} ({r.commit}): {wall:.0f} s wall, {cpu:.0f} s CPU, {r.counts}", flush=True)


def table(base: Revision, head: Revision) -> str:
    def row(r: Revision) -> str:
        counts = ", ".join(f"{r.counts.get(k, 0)} {k}" for k in COUNTED)
        cov = _coverage_cell(r)
        wall, cpu = statistics.median(r.wall_s), statistics.median(r.cpu_s)
        load = ", ".join(f"{x:.1f}" for x in r.load)
        return f"| {r.label} `{r.commit}` | {wall:.0f} s | {cpu:.0f} s | {counts} | {cov} | {load} |"

    wall_ratio = statistics.median(head.wall_s) / statistics.median(base.wall_s)
    cpu_ratio = statistics.median(head.cpu_s) / statistics.median(base.cpu_s)
    return "\n".join(
        [
            "| revision | wall time | CPU time | tests | line coverage of `mtneuro_lab` | load before |",
            "|---|---|---|---|---|---|",
            row(base),
            row(head),
            "",
            f"head / base: wall time **{wall_ratio:.2f}**, CPU time **{cpu_ratio:.2f}** "
            f"(median of {len(head.wall_s)} alternating run(s) each).",
        ]
    )


def _coverage_cell(r: Revision) -> str:
    if r.coverage is None:
        return "not measured"
    reused = f" (run of {r.coverage_when})" if r.coverage_when else ""
    return f"{r.coverage:.1f} % of {r.statements} lines{reused}"


def coverage_table(base: Revision, head: Revision) -> str:
    """Coverage runs only (``--coverage-only``): line coverage and test counts, no timings."""

    def row(r: Revision) -> str:
        counts = ", ".join(f"{r.coverage_counts.get(k, 0)} {k}" for k in COUNTED)
        return f"| {r.label} `{r.commit}` | {counts} | {_coverage_cell(r)} |"

    return "\n".join(
        [
            "| revision | tests (coverage run) | line coverage of `mtneuro_lab` |",
            "|---|---|---|",
            row(base),
            row(head),
        ]
    )


def default_doc() -> Path:
    contributing = ROOT / "docs" / "contributing.md"
    return contributing if contributing.is_file() else ROOT / "docs" / "benchmarks.md"


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="the revision before (e.g. a commit of main)")
    parser.add_argument("--head", default="HEAD", help="the revision after (default: HEAD, committed work only)")
    parser.add_argument("--workers", type=int, default=2, help="pytest-xdist workers, as `make test` (-n 2)")
    parser.add_argument("--repeats", type=int, default=1, help="timing runs per revision, alternating")
    parser.add_argument("--pytest-args", default="", help='extra pytest arguments, e.g. "-k cli" (a trial run)')
    parser.add_argument("--no-coverage", action="store_true", help="timing runs only")
    parser.add_argument("--coverage-only", action="store_true", help="coverage runs only (any machine load)")
    parser.add_argument("--print-only", action="store_true", help="print the table, write no doc")
    parser.add_argument("--doc", type=Path, default=None, help="default: docs/contributing.md, else docs/benchmarks.md")
    parser.add_argument(
        "--coverage-record",
        type=Path,
        default=ROOT / ".cache" / "bench_tests_coverage.json",
        help="coverage figures kept per commit and reused (default: .cache/bench_tests_coverage.json)",
    )
    args = parser.parse_args(argv)

    start = time.perf_counter()
    base, head = Revision("base", args.base), Revision("head", args.head)
    pytest_args = shlex.split(args.pytest_args)
    repeats = 0 if args.coverage_only else args.repeats
    measure([base, head], args.workers, repeats, pytest_args, not args.no_coverage, args.coverage_record)
    markdown = coverage_table(base, head) if args.coverage_only else table(base, head)
    print(markdown)
    suite = " ".join(["python -m pytest -q -n", str(args.workers), *pytest_args])
    extra = {"suite": f"`{suite}`", "coverage": "separate runs (pytest-cov, subprocesses included)"}
    if not args.print_only:
        block = f"{BLOCK}_coverage" if args.coverage_only else BLOCK
        write_block(args.doc or default_doc(), block, markdown, time.perf_counter() - start, extra)
    return {
        r.label: {
            "commit": r.commit,
            "wall_s": r.wall_s,
            "cpu_s": r.cpu_s,
            "counts": r.counts,
            "coverage_percent": r.coverage,
            "statements": r.statements,
        }
        for r in (base, head)
    }


if __name__ == "__main__":
    main()
