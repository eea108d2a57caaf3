"""Pre-download from BossDB every cutout a task config reads (all splits) into the local cache::

    python -m mtneuro_lab.download task=roi_c1 [source.host=... other overrides]

The config is composed like ``train.py`` does (``source=bossdb`` first, then the overrides),
validated, and the source and task are built by :mod:`mtneuro_lab.build`; building each split
fetches what is missing (see docs/bossdb.md). Bad input: ``error: <key>: <why>``, exit status 2.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from mtneuro_lab.build import build_source, build_task
from mtneuro_lab.cli import CONF_DIR, register_resolvers
from mtneuro_lab.config.schema import validate_config
from mtneuro_lab.data.cubes import catalog_from_config
from mtneuro_lab.data.sources.bossdb import BossDBSource
from mtneuro_lab.data.tasks import SPLITS
from mtneuro_lab.errors import ConfigError, DataError


def download_for_config(overrides: Sequence[str]) -> list[str]:
    """Fetch every cutout the composed config's task reads (all splits) into the cache."""
    from hydra import compose, initialize_config_dir

    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["source=bossdb", *overrides])
    validate_config(cfg)
    catalog = catalog_from_config(cfg.cubes)
    task = build_task(cfg, catalog)
    source = build_source(cfg, task, catalog)
    if not isinstance(source, BossDBSource):
        raise ConfigError("source: the download command needs source=bossdb")
    done = []
    for split in SPLITS:
        arrays = task.build(split, source)
        done.append(f"{task.name}/{split}: {len(arrays)} samples")
    return done


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m mtneuro_lab.download`` and the ``mtneuro-download`` console script."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        for line in download_for_config(list(argv)):
            print(line)
    except (ConfigError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
