"""Shared test fixtures: config composition, CLI runs in temporary run directories.

The phantom cache is the project's default (``.cache/`` or ``$MTNEURO_CACHE``): cubes are
generated once and reused by later tests and later sessions (writes are atomic, so parallel
generation is safe).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"

#: under pytest-xdist (`make test` runs 2 workers on 2 cores) every process uses one thread
_THREADS = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"} if os.environ.get("PYTEST_XDIST_WORKER") else {}
if _THREADS:
    import torch

    torch.set_num_threads(1)

#: overrides that make any CLI run small and quiet
FAST = (
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=1",
    "trainer.enable_progress_bar=false",
    "data.batch_size=8",
    "task.downsample=4",
    "logger=none",
)


def compose(overrides: Iterable[str] = (), return_hydra_config: bool = False) -> DictConfig:
    """Compose the project's config like the CLI does (resolvers registered)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from mtneuro_lab.cli import CONF_DIR, register_resolvers

    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=list(overrides), return_hydra_config=return_hydra_config)
    if return_hydra_config:  # let ${hydra:...} interpolations resolve, as in a real run
        from hydra.core.hydra_config import HydraConfig

        HydraConfig.instance().set_config(cfg)
    return cfg


def build(*overrides: str) -> Any:
    """The run's components (task, datamodule, method ...) of a composed, validated config."""
    from omegaconf import open_dict

    from mtneuro_lab.build import build_components
    from mtneuro_lab.config.schema import validate_config

    cfg = compose(list(overrides))
    with open_dict(cfg):
        cfg.paths.output_dir = "unused"
    validate_config(cfg)
    return build_components(cfg)


def run_cli(
    script: str,
    *overrides: str,
    run_dir: Path | None = None,
    fast: bool = True,
    env: dict[str, str] | None = None,
    timeout: float = 600,
    multirun: bool = False,
) -> subprocess.CompletedProcess:
    """Run ``train.py``/``evaluate.py`` in a subprocess; returns the completed process."""
    args = [sys.executable, str(ROOT / script)]
    if multirun:
        args.append("-m")
    if fast:
        args += list(FAST)
    args += list(overrides)
    if run_dir is not None:
        key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
        args.append(f"{key}={run_dir}")
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=cli_env(env))


def cli_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment of every CLI subprocess of the tests (same thread count everywhere)."""
    return {**os.environ, "PYTHONHASHSEED": "0", "WANDB_MODE": "disabled", **_THREADS, **(extra or {})}


def read_metrics(run_dir: Path) -> dict[str, float]:
    return json.loads((Path(run_dir) / "metrics.json").read_text())


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared test data not found at {SHARED_DATA}")
    return SHARED_DATA
