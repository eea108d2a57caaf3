"""Run directories: the saved ``config.yaml``, ``metrics.json``, and the config a checkpoint was trained with.

Every run directory holds ``config.yaml`` (the composed config, resolved), ``checkpoints/`` and
``metrics.json`` (flat JSON of final metrics), which is all the reporting code reads. Used by
the flows (:mod:`mtneuro_lab.run`) and the Task 3 read-out (:mod:`mtneuro_lab.analysis.readout`).
"""

from __future__ import annotations

import json
import shlex
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import torch
from omegaconf import DictConfig, OmegaConf

from mtneuro_lab.checkpoints import run_dir_of
from mtneuro_lab.errors import CheckpointError, ConfigError, existing_checkpoint
from mtneuro_lab.io import atomic_write_bytes


def save_config(cfg: DictConfig, run_dir: Path) -> None:
    """The composed config, resolved, as ``config.yaml`` in the run directory."""
    # a DictConfig converts to a dict; the stubs return the union of every container type
    plain = cast(dict[str, Any], OmegaConf.to_container(cfg, resolve=True))
    plain.pop("hydra", None)
    atomic_write_bytes(run_dir / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(plain)).encode())


def _flat_value(value: Any) -> float | int | str:
    """Numbers as floats (steps and epochs as ints), names (``selection/metric``) as strings."""
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return float(value)


def write_metrics(run_dir: Path, metrics: Mapping[str, Any]) -> dict[str, Any]:
    """``metrics.json``: flat, sorted, written atomically; what reports and sweeps read."""
    flat = {k: _flat_value(v) for k, v in sorted(metrics.items())}
    atomic_write_bytes(run_dir / "metrics.json", (json.dumps(flat, indent=2) + "\n").encode())
    return flat


def saved_config(ckpt: str | Path) -> DictConfig:
    """The ``config.yaml`` of the run a checkpoint belongs to (one line if there is none)."""
    path = run_dir_of(ckpt) / "config.yaml"
    if not path.is_file():
        raise CheckpointError(f"ckpt_path: no config.yaml beside the checkpoint (looked for {path})")
    saved = OmegaConf.load(path)
    if not isinstance(saved, DictConfig):
        raise CheckpointError(f"ckpt_path: {path} holds a list, not a run's config")
    return saved


def evaluation_config(cfg: DictConfig) -> DictConfig:
    """The saved training config with this command's overrides applied on top.

    Group choices given on the command line (``task=semantic``) replace that whole section;
    ``key=value`` overrides change just that key; everything else comes from the run that
    produced the checkpoint.
    """
    if not cfg.get("ckpt_path"):
        raise ConfigError("ckpt_path: evaluate.py needs ckpt_path=<checkpoint file>")
    ckpt = existing_checkpoint(str(cfg.ckpt_path))
    saved = saved_config(ckpt)
    overrides = cli_overrides()
    groups = {"task", "model", "source", "trainer", "logger", "callbacks", "paths", "cubes"}
    for text in overrides:
        key, _, _ = text.lstrip("+~").partition("=")
        if key in groups:
            saved[key] = cfg[key]
        elif key not in ("ckpt_path",) and not key.startswith("hydra."):
            OmegaConf.update(saved, key, OmegaConf.select(cfg, key), force_add=True)
    saved.paths = cfg.paths
    saved.ckpt_path = str(ckpt)
    saved.logger = cfg.logger if any(o.lstrip("+~").startswith("logger") for o in overrides) else saved.get("logger")
    for sub in (saved.logger or {}).values():  # this command's own directory, not the training run's
        if isinstance(sub, DictConfig) and "save_dir" in sub:
            sub.save_dir = cfg.paths.output_dir
    return saved


def entry_commands() -> dict[str, str]:
    """How this process was started decides how the next commands are spelled: ``python train.py``
    in a clone, ``mtneuro-train`` (console scripts) or ``python -m mtneuro_lab.train``."""
    started = Path(sys.argv[0]) if sys.argv and sys.argv[0] else Path("train.py")
    if started.name.startswith("mtneuro-"):
        return {"train": "mtneuro-train", "evaluate": "mtneuro-eval", "report": "mtneuro-report"}
    if started.name in ("train.py", "evaluate.py") and started.resolve().parent.name != "mtneuro_lab":
        return {"train": "python train.py", "evaluate": "python evaluate.py", "report": "python -m mtneuro_lab.report"}
    return {k: f"python -m mtneuro_lab.{k}" for k in ("train", "evaluate", "report")}


#: overrides of a run that a seed sweep of the same experiment leaves out
_NOT_REPEATED = ("seed", "hydra.", "ckpt_path", "paths.")


def next_steps(run_dir: Path, checkpoint: str | Path, overrides: Sequence[str]) -> str:
    """What a run prints at its end: where its directory is and three commands to try next."""
    cmd = entry_commands()
    same = [o for o in overrides if not o.lstrip("+~").startswith(_NOT_REPEATED)]
    sweep = " ".join(shlex.quote(o) for o in [*same, "+sweep=seeds"])
    return "\n".join(
        [
            f"run directory: {run_dir}",
            "next:",
            f"  {cmd['evaluate']} ckpt_path={shlex.quote(str(checkpoint))}   # test it again (other settings)",
            f"  {cmd['report']} {shlex.quote(str(run_dir))}   # a table of this run (report.md, report.csv)",
            f"  {cmd['train']} -m {sweep}   # the same experiment, five seeds",
        ]
    )


def cli_overrides() -> list[str]:
    """This command's overrides (empty outside a Hydra app)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return list(HydraConfig.get().overrides.task)
    except Exception:  # noqa: BLE001 - outside Hydra
        return []
