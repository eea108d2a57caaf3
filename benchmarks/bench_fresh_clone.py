"""The README's set-up on a fresh clone, as CI runs it: ``git clone``, then ``make test``.

Clones the committed ``HEAD`` of this checkout into a temporary directory (no ``../shared/data``
beside it unless ``--with-shared-data``, as on a clean CI machine) and runs there, timed:

* ``make env``: the virtual environment (``pip install -e .[dev]``; torch from the registry,
  pip's cache as this machine has it);
* ``make test``: ``make lint`` (ruff, mypy) and the default suite on 2 xdist workers (the
  phantom cache starts empty: the clone's own ``.cache``, ``MTNEURO_CACHE`` is unset).

Reports wall times, pytest's counts and its own time, and the disk the clone's ``.venv`` and
phantom cache take; writes the ``bench:fresh_clone`` block of the README. The clone is deleted
afterwards (``--keep`` keeps it). ``make bench`` leaves this benchmark out (it builds a whole
environment); run it directly::

    python benchmarks/bench_fresh_clone.py [--doc README.md] [--with-shared-data] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.doc_blocks import write_block  # noqa: E402

#: environment variables of this shell that would make the clone use this checkout's state
_UNSET = ("MTNEURO_CACHE", "MTNEURO_OUTPUTS", "VIRTUAL_ENV", "PYTHONPATH")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _UNSET}
    venv_bin = str(ROOT / ".venv" / "bin")  # this checkout's venv must not come first on PATH
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p != venv_bin)
    return env


def _timed(args: list[str], cwd: Path, log: Path) -> tuple[int, float]:
    """Run ``args`` with output appended to ``log``; (exit status, wall seconds)."""
    start = time.perf_counter()
    with log.open("a") as out:
        out.write(f"\n$ {' '.join(args)}\n")
        out.flush()
        code = subprocess.run(args, cwd=cwd, env=_env(), stdout=out, stderr=subprocess.STDOUT, check=False).returncode
    return code, time.perf_counter() - start


def pytest_summary(text: str) -> dict[str, Any]:
    """Counts and seconds of pytest's last summary line (``1 failed, 9 passed, 2 skipped ... in 5.1s``)."""
    lines = [ln for ln in text.splitlines() if re.search(r"\b(passed|failed|error)\b.* in [\d.]+s", ln)]
    if not lines:
        return {}
    last = lines[-1]
    counts = {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", last)}
    if "error" in counts:
        counts["errors"] = counts.pop("error")
    return {**counts, "pytest_s": float(re.search(r" in ([\d.]+)s", last)[1])}


def disk_bytes(path: Path) -> int:
    if not path.exists():
        return 0
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def measure(work: Path, with_shared_data: bool) -> dict[str, Any]:
    clone, log = work / "mtneuro-lab", work / "fresh_clone.log"
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    subprocess.run(["git", "clone", "--quiet", "--no-hardlinks", str(ROOT), str(clone)], check=True)
    if with_shared_data:
        (work / "shared").symlink_to(ROOT.parent / "shared")
    env_code, env_s = _timed(["make", "env"], clone, log)
    if env_code != 0:
        raise SystemExit(f"make env failed in {clone}; see {log}")
    test_code, test_s = _timed(["make", "test"], clone, log)
    summary = pytest_summary(log.read_text())
    return {
        "revision": head.strip(),
        "shared data": with_shared_data,
        "make env s": env_s,
        "make test s": test_s,
        "make test exit": test_code,
        **summary,
        "venv bytes": disk_bytes(clone / ".venv"),
        "phantom cache bytes": disk_bytes(clone / ".cache"),
        "log": str(log),
    }


def markdown(r: dict[str, Any]) -> str:
    counts = ", ".join(f"{r[k]} {k}" for k in ("passed", "failed", "skipped", "errors") if r.get(k))
    data = "with `../shared/data` beside it" if r["shared data"] else "no `../shared/data` beside it (as on CI)"
    gib = 2**30
    return "\n".join(
        [
            "| step on a fresh clone of `" + r["revision"] + "` | measured |",
            "|---|---|",
            f"| `make env`: `.venv` with `pip install -e .[dev]` (pip's cache warm) | {r['make env s'] / 60:.1f} min |",
            f"| `make test`: `make lint`, then the default suite on 2 xdist workers, {data} "
            f"| {r['make test s'] / 60:.1f} min in all (exit {r['make test exit']}); the tests alone "
            f"{r.get('pytest_s', float('nan')) / 60:.1f} min: {counts} |",
            f"| disk after the suite | `.venv/` {r['venv bytes'] / gib:.1f} GiB, phantom cache "
            f"`.cache/` {r['phantom cache bytes'] / gib:.2f} GiB |",
        ]
    )


def main(doc: Path | None = None, with_shared_data: bool = False, keep: bool = False) -> dict[str, Any]:
    start, load = time.perf_counter(), os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="bench-fresh-clone-"))
    try:
        results = measure(work, with_shared_data)
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    if doc is not None:
        extra = {"load average (1/5/15 min) at start": " / ".join(f"{x:.1f}" for x in load)}
        write_block(doc, "fresh_clone", markdown(results), time.perf_counter() - start, extra)
    passed = results["make test exit"] == 0
    return {**results, "checks": [{"name": "make test on a fresh clone", "value": passed, "passed": passed}]}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--doc", type=Path, default=None, help="write the bench:fresh_clone block of this doc")
    parser.add_argument("--with-shared-data", action="store_true", help="link ../shared beside the clone")
    parser.add_argument("--keep", action="store_true", help="keep the clone (its path is printed)")
    args = parser.parse_args()
    doc = None if args.doc is None else (args.doc if args.doc.is_absolute() else ROOT / args.doc)
    print(json.dumps(main(doc, args.with_shared_data, args.keep), indent=2))
