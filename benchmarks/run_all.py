"""``make bench``: run every ``benchmarks/bench_*.py`` and write ``docs/benchmarks.md``.

Usage::

    python -m benchmarks.run_all [--only framework,data] [--quick] [--timeout 7200] [--output docs/benchmarks.md]

Each benchmark module runs in its own subprocess (isolation: its thread settings, memory and
crashes stay its own) with a per-benchmark timeout. ``--quick`` sets ``MTNEURO_BENCH_QUICK=1``
in the environment; benchmarks may honour it with smaller sizes.

Convention for benchmark modules
--------------------------------
* ``main()`` takes no required argument and **returns a dict of figures** (nested dicts and
  lists are fine; they are flattened to ``a.b.c`` rows). Anything it prints is kept too (shown
  in the report when ``main()`` returns no dict, e.g. a benchmark that prints Markdown tables).
* Target ratios go in an optional ``"checks"`` list (at any nesting level) of
  ``{"name": str, "value": float, "target": str, "passed": bool}``, e.g.
  ``{"name": "data throughput vs torchvision", "value": 7.3, "target": ">= 5", "passed": True}``.
  Every check lands in the summary table at the top of the report.
* Ratios must be of two things measured in the same run (the machine is shared and noisy).

The report lists the machine (core count, CPU model, torch version, GPU, date) and, per
benchmark, its status, duration and figures. The exit status is 1 if a benchmark crashed or
timed out (failed checks are reported, not fatal).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = Path(__file__).resolve().parent
MARKER = "@@MTNEURO_BENCH_RESULT@@"
_CHILD = f"""
import json, sys
sys.argv = [{{name!r}}]
from benchmarks import {{name}} as mod
result = mod.main()
print()
print({MARKER!r} + json.dumps(result, default=str))
"""


#: run directly with their own arguments, never by ``make bench``: ``python benchmarks/bench_tests.py --base REV``
ON_REQUEST = {"bench_tests", "bench_fresh_clone"}


def discover() -> list[str]:
    """Module names ``bench_*`` under benchmarks/, sorted (without the ``ON_REQUEST`` ones)."""
    return sorted(p.stem for p in BENCH_DIR.glob("bench_*.py") if p.stem not in ON_REQUEST)


def run_one(name: str, timeout: float, quick: bool) -> dict[str, Any]:
    """Run one benchmark's ``main()`` in a subprocess; status, seconds, result, printed output."""
    env = {**os.environ, "PYTHONHASHSEED": "0", "PYTHONPATH": str(ROOT)}
    if quick:
        env["MTNEURO_BENCH_QUICK"] = "1"
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _CHILD.format(name=name)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as err:
        out = err.stdout.decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
        return {
            "name": name,
            "status": f"timeout after {timeout:.0f} s",
            "seconds": time.perf_counter() - start,
            "result": None,
            "output": out,
        }
    seconds = time.perf_counter() - start
    lines = proc.stdout.splitlines()
    result = None
    for line in reversed(lines):
        if line.startswith(MARKER):
            result = json.loads(line[len(MARKER) :])
            break
    printed = "\n".join(ln for ln in lines if not ln.startswith(MARKER)).strip()
    if proc.returncode != 0:
        last = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()][-1:] or ["(no output)"]
        return {"name": name, "status": f"failed: {last[0]}", "seconds": seconds, "result": None, "output": printed}
    return {"name": name, "status": "ok", "seconds": seconds, "result": result, "output": printed}


def flatten(value: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``{"a": {"b": 1}, "c": [2, 3]}`` -> ``("a.b", 1), ("c.0", 2), ("c.1", 3)``; skips checks."""
    if isinstance(value, dict):
        for key, sub in value.items():
            if key == "checks":
                continue
            yield from flatten(sub, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value):
        for i, sub in enumerate(value):
            yield from flatten(sub, f"{prefix}.{i}" if prefix else str(i))
    else:
        yield prefix or "value", value


def find_checks(value: Any) -> list[dict[str, Any]]:
    """Every entry of every ``checks`` list inside a result."""
    found: list[dict[str, Any]] = []
    if isinstance(value, dict):
        for key, sub in value.items():
            if key == "checks" and isinstance(sub, list):
                found += [c for c in sub if isinstance(c, dict) and "name" in c]
            else:
                found += find_checks(sub)
    elif isinstance(value, list):
        for sub in value:
            found += find_checks(sub)
    return found


def fmt(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return "[" + ", ".join(fmt(v) for v in value) + "]"
    return str(value).replace("|", "\\|").replace("\n", " ")


def machine() -> dict[str, str]:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    facts = {
        "cores (nproc)": str(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()),
        "CPU": cpu,
        "python": platform.python_version(),
        "date": dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
    }
    try:
        import torch

        facts["torch"] = torch.__version__
        facts["GPU"] = (
            ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
            if torch.cuda.is_available()
            else "none"
        )
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    return facts


def guides_with_blocks(docs: Path = ROOT / "docs") -> list[str]:
    """The docs pages holding ``bench:`` blocks (found, not listed by hand), this report excepted."""
    return sorted(p.name for p in docs.glob("*.md") if p.name != "benchmarks.md" and "<!-- bench:" in p.read_text())


def report(runs: list[dict[str, Any]], facts: dict[str, str], command: str) -> str:
    out = [
        "# Benchmarks",
        "",
        (
            f"Written by `{command}` (benchmarks/run_all.py). Ratios compare two things measured in "
            "the same run on this machine; absolute times depend on the machine and its load."
        ),
        "",
        (
            "Benchmarks that also write `bench:` blocks into the guides (each with its own command and "
            "provenance line) keep their current figures there: "
            + ", ".join(f"[{name}]({name})" for name in guides_with_blocks())
            + "."
        ),
        "",
        "| machine | |",
        "|---|---|",
    ]
    out += [f"| {k} | {fmt(v)} |" for k, v in facts.items()]
    out += ["", "## Targets", "", "| benchmark | check | measured | target | result |", "|---|---|---|---|---|"]
    for r in runs:
        checks = find_checks(r["result"])
        if r["status"] != "ok":
            out.append(f"| {r['name']} | (did not finish) | | | {fmt(r['status'])} |")
        for c in checks:
            verdict = "PASS" if c.get("passed") else "FAIL"
            out.append(
                f"| {r['name']} | {fmt(c['name'])} | {fmt(c.get('value'))} | {fmt(c.get('target', ''))} | {verdict} |"
            )
    out.append("")
    for r in runs:
        out += [f"## {r['name']}", "", f"status: {fmt(r['status'])}; {r['seconds']:.0f} s", ""]
        rows = list(flatten(r["result"])) if isinstance(r["result"], (dict, list)) else []
        if rows:
            out += ["| figure | value |", "|---|---|"] + [f"| {k} | {fmt(v)} |" for k, v in rows] + [""]
        elif r["output"]:
            out += [r["output"], ""]
    return "\n".join(out).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--only", default="", help="comma-separated names (framework or bench_framework)")
    parser.add_argument("--quick", action="store_true", help="set MTNEURO_BENCH_QUICK=1 for the benchmarks")
    parser.add_argument(
        "--timeout",
        type=float,
        default=7200.0,
        help="seconds per benchmark (bench_mae, the longest, takes ~75 min on 2 cores)",
    )
    parser.add_argument("--output", default=str(ROOT / "docs" / "benchmarks.md"))
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    args = parser.parse_args(argv)
    names = discover()
    if args.list:
        print("\n".join(names))
        return 0
    if args.only:
        wanted = {n if n.startswith("bench_") else f"bench_{n}" for n in args.only.split(",") if n}
        unknown = wanted - set(names)
        if unknown:
            print(
                f"error: --only: unknown benchmark(s) {sorted(unknown)}; available: {', '.join(names)}", file=sys.stderr
            )
            return 2
        names = [n for n in names if n in wanted]
    runs = []
    for name in names:
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        r = run_one(name, args.timeout, args.quick)
        print(f"[bench] {name}: {r['status']} ({r['seconds']:.0f} s)", file=sys.stderr, flush=True)
        runs.append(r)
    command = "make bench" + (
        f" ARGS='{' '.join(argv if argv is not None else sys.argv[1:])}'"
        if (argv if argv is not None else sys.argv[1:])
        else ""
    )
    text = report(runs, machine(), command)
    path = Path(args.output)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    print(f"[bench] wrote {path}", file=sys.stderr)
    for r in runs:
        for c in find_checks(r["result"]):
            print(
                f"[bench] {'PASS' if c.get('passed') else 'FAIL'} {r['name']}: {c['name']} = "
                f"{fmt(c.get('value'))} (target {c.get('target')})",
                file=sys.stderr,
            )
    return 1 if any(r["status"] != "ok" for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
