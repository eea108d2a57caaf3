"""The train and evaluate flows behind ``train.py`` and ``evaluate.py``.

train: validate config -> build source, task, datamodule, method (:mod:`mtneuro_lab.build`) ->
fit -> test on the best checkpoint -> ``metrics.json``. Every run directory holds ``config.yaml``
(the composed config, resolved), ``checkpoints/`` and ``metrics.json`` (flat JSON of final
metrics), which is all the reporting code reads (:mod:`mtneuro_lab.rundir`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint

from mtneuro_lab import perf, tracking
from mtneuro_lab.analysis import readout
from mtneuro_lab.build import (  # noqa: F401 - build_components, instantiate_* re-exported for tests and benchmarks
    Components,
    build_components,
    build_trainer,
    instantiate_cfg,
    instantiate_filtered,
    load_method_checkpoint,
)
from mtneuro_lab.checkpoints import checkpoint_position, load_checkpoint, run_dir_of
from mtneuro_lab.cluster import preemption
from mtneuro_lab.cluster.env import check_launch, hydra_launcher
from mtneuro_lab.config.hydra_runtime import hydra_node
from mtneuro_lab.config.schema import validate_config
from mtneuro_lab.data.sources.local import open_volume
from mtneuro_lab.decoding.volume import open_output
from mtneuro_lab.errors import CheckpointError, ConfigError, existing_checkpoint
from mtneuro_lab.memcheck import check_memory
from mtneuro_lab.methods.base import BaseMethod
from mtneuro_lab.methods.em import EMSegmentation
from mtneuro_lab.rundir import (
    cli_overrides,
    evaluation_config,
    next_steps,
    save_config,
    saved_config,
    write_metrics,
)

log = logging.getLogger(__name__)


def resolve_ckpt(ckpt_path: str | None, run_dir: Path) -> str | None:
    """``last`` means this run directory's ``checkpoints/last.ckpt`` (resume after a crash)."""
    if ckpt_path in (None, ""):
        return None
    if ckpt_path == "last":
        last = run_dir / "checkpoints" / "last.ckpt"
        return str(last) if last.is_file() else None
    return str(existing_checkpoint(ckpt_path))


def _finish_loggers(
    trainer: pl.Trainer | None, metrics: Mapping[str, Any] | None = None, ckpt: str | None = None
) -> None:
    tracking.finish_loggers(trainer.loggers if trainer is not None else [], metrics, ckpt)


def _stage_metrics(trainer: pl.Trainer, stage: str) -> dict[str, Any]:
    return {k: v for k, v in trainer.callback_metrics.items() if k.startswith(f"{stage}/")}


def _test_metrics(trainer: pl.Trainer) -> dict[str, Any]:
    return _stage_metrics(trainer, "test")


def selection_callback(trainer: pl.Trainer) -> ModelCheckpoint | None:
    """The checkpoint callback that chooses the tested checkpoint (the first one with a monitor)."""
    return next(
        (cb for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint) and cb.monitor is not None), None
    )


def check_selection_metric(method: BaseMethod, metric: str, key: str) -> None:
    """One line if ``metric`` cannot choose anything: a test metric, or one the method never logs."""
    if metric.startswith("test/"):
        raise ConfigError(f"{key}: {metric} selects on the test split; use a val/ metric")
    logged = method.validation_metrics()
    if metric not in logged:
        raise ConfigError(
            f"{key}: {metric} is not logged by {type(method).__name__}; choose one of {', '.join(sorted(logged))}"
        )


def _selection_record(trainer: pl.Trainer, method: BaseMethod, datamodule: Any) -> tuple[str, dict[str, Any]]:
    """The best checkpoint and what chose it: ``selection/*``, ``best_epoch``/``best_step`` and
    the ``val/*`` metrics of exactly that checkpoint (validated again after loading it).

    Without a monitored checkpoint (``callbacks.model_checkpoint=null``) the last weights are
    tested and the last validation's metrics recorded, named ``selection/metric: last``.
    """
    callback = selection_callback(trainer)
    if callback is None or not callback.best_model_path:
        position = {"best_epoch": trainer.current_epoch, "best_step": trainer.global_step}
        trainer.validate(method, datamodule=datamodule, verbose=False)  # the weights that are tested
        return "", {**_stage_metrics(trainer, "val"), "selection/metric": "last", **position}
    best = callback.best_model_path
    position = checkpoint_position(best)
    trainer.validate(method, datamodule=datamodule, ckpt_path=best, verbose=False)
    score = callback.best_model_score
    record = {
        **_stage_metrics(trainer, "val"),
        "selection/metric": str(callback.monitor),
        "selection/mode": str(callback.mode),
        "selection/value": float(score) if score is not None else float("nan"),
        **position,
    }
    return best, record


def train(cfg: DictConfig) -> dict[str, float]:
    validate_config(cfg)
    check_launch(cfg)  # this process's view: GPUs, the torchrun world, batch vs processes
    run_dir = Path(cfg.paths.output_dir)
    # seed before building: weight initialisation depends on the seed alone (the same on every
    # rank); each training batch then reseeds per rank (mtneuro_lab.data.distributed)
    pl.seed_everything(int(cfg.seed), workers=True)
    comps = build_components(cfg)
    check_selection(cfg, comps.method)
    perf.apply(cfg.get("perf"), comps.method, comps.datamodule)
    resume = resolve_ckpt(cfg.get("ckpt_path"), run_dir)
    if resume is None and (resume := preemption.requeued_checkpoint(run_dir)) is not None:
        log.info("requeued after preemption: resuming from %s", resume)
    contacts = comps.task.contacts  # cube tasks: val/test windows touching training ones (EM: None)
    if contacts is not None:
        comps.task.log_contacts()
    trainer = None
    written: dict[str, Any] | None = None
    best = ""
    try:
        trainer = build_trainer(cfg, run_dir, comps.method)
        if trainer.is_global_zero:
            save_config(cfg, run_dir)
        for run in tracking.wandb_runs(trainer.loggers):
            run.log_config(cfg)
        try:
            with preemption.watching(trainer):
                trainer.fit(comps.method, datamodule=comps.datamodule, ckpt_path=resume)
        except preemption.Preempted as err:  # last.ckpt and requeue.json are written
            preemption.requeue(err)
            return {}
        # choose on validation, then touch the test split once, with the chosen checkpoint
        best, metrics = _selection_record(trainer, comps.method, comps.datamodule)
        if contacts is not None:
            metrics["split/touching"] = len(contacts)
        if cfg.get("test_after_fit", True):
            trainer.test(comps.method, datamodule=comps.datamodule, ckpt_path=best or None)
            metrics.update(_test_metrics(trainer))
        if trainer.is_global_zero:
            metrics = written = write_metrics(run_dir, metrics)
            preemption.finished(run_dir)
            log.info("metrics: %s", json.dumps(metrics))
            print(next_steps(run_dir, best or str(run_dir / "checkpoints" / "last.ckpt"), cli_overrides()), flush=True)
        return metrics
    finally:
        _finish_loggers(trainer, written, best or None)


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Rebuild the model from a checkpoint and its saved config; recompute test metrics."""
    if readout.is_semantic(cfg):  # Task 3: linear read-out of any Task 1 method, not trainer.test
        return readout.run_semantic(cfg)
    ecfg = evaluation_config(cfg)
    validate_config(ecfg)
    run_dir = Path(ecfg.paths.output_dir)
    comps = build_components(ecfg)
    load_method_checkpoint(comps.method, ecfg.ckpt_path, ecfg.model._target_)
    perf.apply(ecfg.get("perf"), comps.method, comps.datamodule)
    # no checkpointing or progress lines here; the test figures still go to media/ and the loggers
    ecfg.callbacks = {k: v for k, v in (ecfg.get("callbacks") or {}).items() if k == "media"}
    tracking.set_job_type(ecfg, "eval")
    trainer = build_trainer(ecfg, run_dir, comps.method)
    written = None
    try:
        if trainer.is_global_zero:
            save_config(ecfg, run_dir)
        for run in tracking.wandb_runs(trainer.loggers):
            run.log_config(ecfg)
        trainer.test(comps.method, datamodule=comps.datamodule)
        metrics = _test_metrics(trainer)
        metrics.update(comps.method.after_evaluate(comps.datamodule, run_dir))
        if not trainer.is_global_zero:
            return {}
        written = write_metrics(run_dir, metrics)
        return written
    finally:
        _finish_loggers(trainer, written)


def check_checkpoint_fits(method: pl.LightningModule, path: str | Path, model_target: str) -> None:
    """One line if the checkpoint at ``path`` cannot be the weights of ``method``.

    Parameters the built method has but the checkpoint lacks, or that have another shape, mean
    another model (or the same model for another task). Extra checkpoint entries are allowed
    here: methods may add sub-networks during training (linear heads, EMA targets).
    """
    state = load_checkpoint(path)
    saved = state.get("state_dict") if isinstance(state, dict) else None
    if not isinstance(saved, dict):
        raise CheckpointError(f"ckpt_path: {path} has no state_dict (not a checkpoint of this project)")
    own = method.state_dict()
    missing = sorted(k for k in own if k not in saved)
    reshaped = sorted(k for k in own if k in saved and tuple(saved[k].shape) != tuple(own[k].shape))
    if not missing and not reshaped:
        return
    saved_cfg = run_dir_of(path) / "config.yaml"
    origin = ""
    if saved_cfg.is_file():
        other = OmegaConf.select(OmegaConf.load(saved_cfg), "model._target_", default=None)
        origin = f" (saved by {other})" if other else ""
    what = (
        f"{len(missing)} of its parameters are missing, e.g. {missing[0]}"
        if missing
        else f"{len(reshaped)} parameters have other shapes, e.g. {reshaped[0]}"
    )
    raise CheckpointError(f"ckpt_path: {path} is not a checkpoint of model {model_target}{origin}: {what}")


def check_own_callbacks(cfg: DictConfig) -> None:
    """Instantiate this project's callbacks (progress lines, media): their range checks run now.
    Lightning's own (checkpointing) are left to the run: their paths exist only then."""
    for sub in (cfg.get("callbacks") or {}).values():
        if sub is not None and str(sub.get("_target_", "")).startswith("mtneuro_lab."):
            instantiate_cfg(sub)


def _preflight_train(cfg: DictConfig) -> None:
    validate_config(cfg)
    check_launch(cfg, hydra_launcher())
    tracking.check_wandb(cfg)
    comps = build_components(cfg)
    check_selection(cfg, comps.method)
    check_own_callbacks(cfg)
    ckpt = cfg.get("ckpt_path")
    if ckpt not in (None, "", "last"):
        existing_checkpoint(str(ckpt))
        check_checkpoint_fits(comps.method, str(ckpt), str(cfg.model._target_))
    if perf.as_perf_config(cfg.get("perf")).memory_check:  # last: it moves the method to the meta device
        check_memory(cfg, comps.method, tuple(comps.task.sample_shape()))


def _sweeper_direction() -> str | None:
    try:
        direction = OmegaConf.select(hydra_node(), "sweeper.direction", default=None)
    except Exception:  # noqa: BLE001 - outside a Hydra app (tests, notebooks)
        return None
    return None if direction is None else str(direction).lower()


def check_selection(cfg: DictConfig, method: BaseMethod | None) -> None:
    """What chooses checkpoints and sweep trials is a validation metric the method logs.

    ``sweep.objective: selection`` means the method's own selection metric (what chose its
    checkpoint); its direction must match the sweeper's. ``method=None`` checks names only.
    """
    monitor = OmegaConf.select(cfg, "callbacks.model_checkpoint.monitor", default=None)
    default_metric, default_mode = method.monitor if method is not None else (None, None)
    if monitor is not None:
        if method is not None:
            check_selection_metric(method, str(monitor), "callbacks.model_checkpoint.monitor")
        default_metric = str(monitor)
        default_mode = OmegaConf.select(cfg, "callbacks.model_checkpoint.mode", default=default_mode)
    objective = OmegaConf.select(cfg, "sweep.objective", default=None)
    if objective is None:
        return
    objective = str(objective)
    if objective.startswith("test/"):
        raise ConfigError(f"sweep.objective: {objective} selects on the test split; use a val/ metric")
    if objective != "selection" and not objective.startswith("val/"):
        raise ConfigError(
            f"sweep.objective: must be `selection` (the method's own validation metric) or a "
            f"val/ metric, got {objective}"
        )
    if method is None:
        return
    mode: str | None
    if objective == "selection":
        objective, mode = str(default_metric), str(default_mode)
    else:
        check_selection_metric(method, objective, "sweep.objective")
        mode = str(default_mode) if objective == default_metric else None
    direction = _sweeper_direction()
    if mode and direction and not direction.startswith(mode):
        raise ConfigError(
            f"hydra.sweeper.direction: {direction}, but the objective {objective} is "
            f"{'maximised' if mode == 'max' else 'minimised'}; set hydra.sweeper.direction="
            f"{'maximize' if mode == 'max' else 'minimize'}"
        )


def _preflight_sweep(cfg: DictConfig) -> None:
    """Before a multirun's first job: the launch and selection checks on the config without
    swept values."""
    validate_config(cfg)
    check_launch(cfg, hydra_launcher())
    check_selection(cfg, build_components(cfg).method)


def _preflight_sweep_names(cfg: DictConfig) -> None:
    """Multirun whose model or task is swept: only what needs no method (launch, test/ objectives)."""
    check_launch(cfg, hydra_launcher())
    check_selection(cfg, None)


def _preflight_evaluate(cfg: DictConfig) -> None:
    tracking.check_wandb(cfg)
    if readout.is_semantic(cfg):
        return readout.preflight(cfg)
    if not cfg.get("ckpt_path"):
        raise ConfigError("ckpt_path: evaluate.py needs ckpt_path=<checkpoint file>")
    existing_checkpoint(str(cfg.ckpt_path))
    ecfg = evaluation_config(cfg)  # the run's saved config + this command's overrides
    validate_config(ecfg)
    tracking.check_wandb(ecfg)
    comps = build_components(ecfg)
    check_checkpoint_fits(comps.method, str(ecfg.ckpt_path), str(ecfg.model._target_))


#: checks run by the CLI before Hydra creates a run directory (see mtneuro_lab.cli.preflight)
preflight_checks = {
    "train": _preflight_train,
    "evaluate": _preflight_evaluate,
    "sweep": _preflight_sweep,
    "sweep_names": _preflight_sweep_names,
}


# -- prediction of volumes larger than memory ------------------------------------------------------
class _Sections:
    """A lazily read volume file sliced by sections: ``volume[z0:z1]`` -> ``(z, y, x)`` uint8."""

    def __init__(self, path: str | Path, key: str | None) -> None:
        self.reader = open_volume(path, key)
        self.shape = self.reader.shape

    def __getitem__(self, zs: slice) -> Any:
        _, ny, nx = self.shape
        return self.reader.read((zs.start, zs.stop), (0, ny), (0, nx))


def predict_volume(
    ckpt_path: str | Path,
    input_path: str | Path,
    output_path: str | Path,
    key: str | None = None,
    dtype: str = "float16",
) -> Any:
    """Probabilities of a whole volume file (HDF5/zarr/TIFF/npy/slices, uint8) with an EM checkpoint.

    The model and task come from the checkpoint's run directory (``config.yaml``), the
    normalisation from the checkpoint; the output is a chunked ``.zarr`` or ``.h5``
    (``probabilities``, ``(C, Z, Y, X)``), filled section slab by slab so the volume may be
    larger than memory. Returns :class:`~mtneuro_lab.decoding.volume.ChunkedStats`.
    """
    cfg = saved_config(ckpt_path)
    validate_config(cfg)
    comps = build_components(cfg)
    if not isinstance(comps.method, EMSegmentation):
        raise ConfigError(f"ckpt_path: {ckpt_path} is not a checkpoint of an EM method ({cfg.model._target_})")
    state = load_method_checkpoint(comps.method, ckpt_path, str(cfg.model._target_))
    stats = next((v for k, v in state.items() if isinstance(v, dict) and "mean" in v and "std" in v), None)
    if stats is None:
        raise CheckpointError(f"ckpt_path: {ckpt_path} holds no normalisation (datamodule mean/std)")
    source = _Sections(input_path, key)
    out = open_output(output_path, (comps.method.num_classes, *source.shape), dtype=dtype)
    return comps.method.predict_large(source, out, float(stats["mean"]), float(stats["std"]))
