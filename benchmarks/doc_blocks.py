"""Write a benchmark's Markdown table into a doc between markers, with where it came from.

A doc holds ``<!-- bench:NAME -->`` ... ``<!-- /bench:NAME -->``; :func:`write_block` replaces
what is between them with the table and a provenance line (script and command, machine, date,
wall time), so no figure in docs/ is typed by hand. A doc without the markers gets the block
appended (then move the markers where the table belongs).
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path

from benchmarks.run_all import machine

ROOT = Path(__file__).resolve().parent.parent


def command_line() -> str:
    """The command that ran this benchmark, relative to the project root."""
    script = Path(sys.argv[0])
    with contextlib.suppress(ValueError):  # a script outside the project keeps its own path
        script = script.resolve().relative_to(ROOT)
    return " ".join(shlex.quote(a) for a in ["python", str(script), *sys.argv[1:]])


def provenance(wall_seconds: float, extra: Mapping[str, str] | None = None) -> str:
    """One line: command, machine, date, wall time (and any extra facts, e.g. budget, seeds)."""
    facts = machine()
    parts = [
        f"written by `{command_line()}`",
        f"{facts.get('cores (nproc)', '?')} cores, {facts.get('CPU', '?')}, GPU {facts.get('GPU', 'none')}",
        f"torch {facts.get('torch', '?')}",
        facts.get("date", ""),
        f"wall time {wall_seconds / 60:.1f} min",
    ]
    parts += [f"{k}: {v}" for k, v in (extra or {}).items()]
    return "_" + "; ".join(p for p in parts if p) + "._"


def write_block(
    doc: Path, name: str, markdown: str, wall_seconds: float, extra: Mapping[str, str] | None = None
) -> None:
    """Replace the ``bench:name`` block of ``doc`` (atomically) with ``markdown`` + provenance."""
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    body = f"{start}\n{markdown.rstrip()}\n\n{provenance(wall_seconds, extra)}\n{end}"
    text = doc.read_text() if doc.is_file() else ""
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    found = pattern.search(text)
    text = pattern.sub(lambda _: body, text, count=1) if found else text.rstrip() + "\n\n" + body + "\n"
    fd, tmp = tempfile.mkstemp(dir=doc.parent, prefix=".tmp-", suffix=".md")
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, doc)
