"""Weights & Biases conventions (``logger=wandb``): :class:`WandbRun`.

* name ``<task>-<model>-seed<seed>``; group = the sweep (``sweep.name``, or the multirun's
  directory), else the experiment (``<task>-<model>`` plus every override but the seed), so W&B
  averages seeds; ``job_type`` ``train``, ``eval`` (``evaluate.py``) or ``readout`` (Task 3);
  tags = ``tags`` of the config plus the task, model and source;
* the resolved config, flattened (``model.optimizer.lr``), as the run config; the run's
  ``metrics.json`` as its summary; the tested checkpoint as a ``model`` artifact if
  ``checkpoint_artifact: true``;
* the run id is kept in ``<run>/wandb/run-id``: ``ckpt_path=last`` in the same run directory
  continues the same W&B run instead of starting a new one;
* the API key is read by wandb itself (``WANDB_API_KEY`` or ``~/.netrc``) and never written
  here. ``run.py`` calls ``wandb.finish()`` after every job, so sweep jobs never share a run.
"""

from __future__ import annotations

import os
import secrets
import string
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import WandbLogger

from mtneuro_lab.errors import ConfigError
from mtneuro_lab.io import atomic_write_bytes

MODES = ("online", "offline", "disabled")
JOB_TYPES = ("train", "eval", "readout")
ID_FILE = "run-id"


def check_wandb(cfg: DictConfig) -> None:
    """``logger=wandb``: the package is installed and the mode (config or ``WANDB_MODE``) is known."""
    section = (cfg.get("logger") or {}).get("wandb")
    if section is None:
        return
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise ConfigError(
            "logger=wandb: the wandb package is not installed (pip install wandb); or use logger=csv"
        ) from None
    env = os.environ.get("WANDB_MODE")
    if env is not None and env not in (*MODES, "dryrun"):
        raise ConfigError(f"WANDB_MODE: must be one of {', '.join(MODES)}, got {env!r} (logger=wandb)")
    mode = section.get("mode")
    if mode is not None and mode not in (*MODES, "dryrun"):
        raise ConfigError(f"logger.wandb.mode: must be one of {', '.join(MODES)}, got {mode!r}")
    job_type = section.get("job_type")
    if job_type is not None and job_type not in JOB_TYPES:
        raise ConfigError(f"logger.wandb.job_type: must be one of {', '.join(JOB_TYPES)}, got {job_type!r}")


def flat_config(cfg: DictConfig | Mapping[str, Any]) -> dict[str, Any]:
    """``{"model.optimizer.lr": 0.03, ...}``: the resolved config without Hydra's own node."""
    container = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    plain: dict[str, Any] = dict(cast(Mapping[str, Any], container))
    plain.pop("hydra", None)
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, Mapping) and node:
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        else:
            out[prefix[:-1]] = node

    walk(plain, "")
    return out


class WandbRun(WandbLogger):
    """Lightning's W&B logger with this project's naming, resume and summary conventions."""

    def __init__(
        self,
        save_dir: str = ".",
        name: str | None = None,
        group: str | None = None,
        job_type: str = "train",
        tags: Sequence[str] = (),
        auto_tags: Sequence[str] = (),
        mode: str = "online",
        checkpoint_artifact: bool = False,
        **kwargs: Any,
    ) -> None:
        if job_type not in JOB_TYPES:
            raise ConfigError(f"logger.wandb.job_type: must be one of {', '.join(JOB_TYPES)}, got {job_type!r}")
        run_id = self._run_id(Path(save_dir))
        every_tag = list(dict.fromkeys(str(t) for t in (*tags, *auto_tags) if t))
        super().__init__(
            name=name,
            save_dir=save_dir,
            id=run_id,
            resume="allow",
            group=group,
            job_type=job_type,
            tags=every_tag,
            mode=mode,
            **kwargs,
        )
        self.checkpoint_artifact = checkpoint_artifact

    @staticmethod
    def _run_id(save_dir: Path) -> str:
        """The id saved in this run directory (a resumed run), else a new one, saved for later."""
        path = save_dir / "wandb" / ID_FILE
        if path.is_file():
            return path.read_text().strip()
        alphabet = string.ascii_lowercase + string.digits  # what W&B run ids are made of
        run_id = "".join(secrets.choice(alphabet) for _ in range(8))
        atomic_write_bytes(path, run_id.encode())
        return run_id

    def log_config(self, cfg: DictConfig) -> None:
        self.experiment.config.update(flat_config(cfg), allow_val_change=True)

    def finish_job(self, metrics: Mapping[str, Any], checkpoint: str | None = None) -> None:
        """``metrics.json`` as the run summary; the checkpoint as an artifact when asked for."""
        self.experiment.summary.update(dict(metrics))
        if self.checkpoint_artifact and checkpoint:
            import wandb

            artifact = wandb.Artifact(f"model-{self.experiment.id}", type="model", metadata=dict(metrics))
            artifact.add_file(str(checkpoint), name=Path(checkpoint).name)
            self.experiment.log_artifact(artifact, aliases=["best", "latest"])


def finish_loggers(loggers: Sequence[Any], metrics: Mapping[str, Any] | None = None, ckpt: str | None = None) -> None:
    """Close loggers that keep global state (W&B) so the next multirun job starts clean; a W&B
    run gets ``metrics.json`` as its summary (and the checkpoint, if asked for) first."""
    for run in wandb_runs(loggers):
        if metrics is not None:
            run.finish_job(metrics, ckpt)
    for lg in loggers:
        finalize = getattr(lg, "finalize", None)
        if finalize is not None:
            finalize("success")
    wandb = sys.modules.get("wandb")  # never imported: no run to finish (and 1 s of import saved)
    if wandb is not None and wandb.run is not None:
        wandb.finish()


def wandb_runs(loggers: Sequence[Any]) -> list[WandbRun]:
    return [lg for lg in loggers if isinstance(lg, WandbRun)]


def set_job_type(cfg: DictConfig, job_type: str) -> None:
    """The W&B ``job_type`` of this command (``eval`` for evaluate.py, ``readout`` for Task 3)."""
    section = (cfg.get("logger") or {}).get("wandb")
    if section is not None and "job_type" in section:
        section.job_type = job_type
