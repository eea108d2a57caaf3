"""Touching cubes of the shipped Task 1 splits: which val/test cube shares a face or a corner with a
training cube over shared slices (geometry only, no data read; a second or two).

Prints a Markdown table and writes it into docs/data.md (block ``contacts``), so the list in the
docs always comes from ``mtneuro_lab/conf/cubes/paper.yaml`` and ``mtneuro_lab/conf/task/roi_c*.yaml`` as shipped.

    .venv/bin/python benchmarks/bench_contacts.py            # print and write docs/data.md
    .venv/bin/python benchmarks/bench_contacts.py --no-doc   # print only
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.doc_blocks import write_block  # noqa: E402
from mtneuro_lab.data.contacts import Contact  # noqa: E402

TASKS = ("roi_c1", "roi_c2", "roi_c3")
DOC = ROOT / "docs" / "data.md"


def task_contacts(name: str) -> tuple[Contact, ...]:
    """The contacts of one shipped task config, as a run computes them in ``bind``."""
    from hydra import compose, initialize_config_dir

    from mtneuro_lab.cli import CONF_DIR, register_resolvers
    from mtneuro_lab.data.cubes import catalog_from_config
    from mtneuro_lab.run import instantiate_cfg

    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"task={name}"])
    return instantiate_cfg(cfg.task, _convert_="all").bind(catalog_from_config(cfg.cubes)).contacts


def table(contacts: dict[str, Sequence[Contact]]) -> str:
    """One row per contact; a task without contacts gets a 'none' row."""
    rows = [
        "| task | split | cube | touches training cube | kind | side of the cube | shared boundary | shared z |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, found in contacts.items():
        if not found:
            rows.append(f"| `{name}` | - | none | - | - | - | - | - |")
        for c in found:
            length = f"{c.length_px} px" if c.kind == "face" else "a corner (0 px)"
            rows.append(
                f"| `{name}` | {c.split} | {c.eval_cube.key} | {c.train_cube.key} | {c.kind} | "
                f"{c.side} | {length} | [{c.z[0]}, {c.z[1]}) |"
            )
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-doc", action="store_true", help="print only, do not write docs/data.md")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    markdown = table({name: task_contacts(name) for name in TASKS})
    print(markdown)
    if not args.no_doc:
        write_block(
            DOC,
            "contacts",
            markdown,
            time.perf_counter() - start,
            {"source": "mtneuro_lab/conf/cubes/paper.yaml + mtneuro_lab/conf/task/roi_c*.yaml"},
        )


if __name__ == "__main__":
    main()
