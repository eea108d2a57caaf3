"""Refuse files bigger than a limit (default 500 KB): the pre-commit hook ``large-files``.

A submission over its size limit loses everything, and run products (checkpoints, caches,
volumes) are the usual culprits. Usage: ``python .ci/check_large_files.py [--max-kb N] FILE...``
(pre-commit passes the staged files); ``make check-size`` checks every tracked and staged file.
Exit status 1 with one line per offending file.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def too_large(paths: list[str], max_kb: int) -> list[tuple[str, int]]:
    """``(path, size in KB)`` of every existing file over ``max_kb``."""
    sizes = [(p, Path(p).stat().st_size) for p in paths if Path(p).is_file()]
    return [(p, -(-size // 1024)) for p, size in sizes if size > max_kb * 1024]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-kb", type=int, default=500)
    parser.add_argument("files", nargs="*")
    args = parser.parse_args(argv)
    found = too_large(args.files, args.max_kb)
    for path, kb in found:
        print(f"error: {path}: {kb} KB is over the {args.max_kb} KB limit (run products and data stay out of git)")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
