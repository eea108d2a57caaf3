"""One place that builds a run's parts from a config: source, task, datamodule, method, trainer.

Used by ``run.train``/``run.evaluate`` (:func:`build_components`, :func:`build_trainer`), the
Task 3 read-out (:mod:`mtneuro_lab.analysis.readout`) and the BossDB pre-download command
(:mod:`mtneuro_lab.download`). Everything here raises a one-line ConfigError/CheckpointError
before any data is read. What the run injects (never in the YAML, see
``config.schema.INJECTED``): ``num_classes``, ``class_names``, ``input_shape`` into the method;
``modality``, ``cubes``, ``regions``, ``roi_ids``, ``cache_dir`` into the source.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from mtneuro_lab.callbacks import RNGStateCheckpoint
from mtneuro_lab.checkpoints import AtomicCheckpointIO, load_checkpoint
from mtneuro_lab.cluster.preemption import PreemptionCheckpoint
from mtneuro_lab.config.schema import DataConfig, import_target, merge_dataclass, target_options
from mtneuro_lab.data.contract import Task
from mtneuro_lab.data.cubes import CubeCatalog, catalog_from_config
from mtneuro_lab.data.datamodules import VolumeDataModule
from mtneuro_lab.data.em import EMDataModule
from mtneuro_lab.data.sources.base import VolumeSource
from mtneuro_lab.errors import CheckpointError, ConfigError, MtneuroError
from mtneuro_lab.methods.base import BaseMethod
from mtneuro_lab.nets.sync_bn import SyncBatchNormPlugin
from mtneuro_lab.progress import ProgressLog

#: the datamodule built for each task kind; every other kind gets :class:`VolumeDataModule`
DATAMODULES: dict[str, type[VolumeDataModule]] = {"em": EMDataModule}


@dataclass
class Components:
    catalog: CubeCatalog
    source: VolumeSource
    task: Task
    datamodule: VolumeDataModule
    method: BaseMethod


def instantiate_cfg(section: Any, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` that lets our one-line errors through unwrapped.

    A constructor's own failure (anything but our errors and a TypeError of its arguments) is
    re-raised as itself: the CLI names the section and shows the traceback with ``-v``.
    """
    try:
        return instantiate(section, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        if isinstance(cause, MtneuroError):
            raise cause from None
        if cause is not None and not isinstance(cause, TypeError):
            raise cause from None
        raise ConfigError(" ".join(str(err).split())) from None


def instantiate_filtered(section: DictConfig, **available: Any) -> Any:
    """Instantiate ``section`` passing only those ``available`` kwargs its target accepts."""
    options = target_options(import_target(section._target_, "section"))
    kwargs = {k: v for k, v in available.items() if options.open or k in options.params}
    return instantiate_cfg(section, **kwargs, _convert_="all")


def group_choice(cfg: DictConfig, group: str) -> str:
    """The option chosen for a config group (``model=byol`` -> ``byol``), for messages."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return str(HydraConfig.get().runtime.choices.get(group))
    except Exception:  # noqa: BLE001 - outside a Hydra app (tests, notebooks)
        return str(cfg.get(group, {}).get("_target_", group)).rsplit(".", 1)[-1]


def method_class(cfg: DictConfig) -> type[BaseMethod]:
    """The class ``model._target_`` names: one line unless it is a method (a :class:`BaseMethod`)."""
    target = import_target(cfg.model._target_, "model")
    if not (inspect.isclass(target) and issubclass(target, BaseMethod)):
        raise ConfigError(
            f"model._target_: {cfg.model._target_} is not a method (a subclass of mtneuro_lab.methods.base.BaseMethod)"
        )
    return target


def check_compatible(method_cls: type[BaseMethod], task: Task, cfg: DictConfig) -> None:
    """One line unless the task's kind is one the method runs on (``task_kinds``)."""
    kinds = method_cls.task_kinds
    if task.kind not in kinds:
        model = group_choice(cfg, "model")
        raise ConfigError(
            f"model={model}: does not fit task={group_choice(cfg, 'task')} (a {task.kind} task); "
            f"this model runs on {', '.join(kinds)} tasks"
        )


def build_task(cfg: DictConfig, catalog: CubeCatalog) -> Task:
    """``cfg.task`` instantiated and bound to the cube catalog (split checks, contacts)."""
    return instantiate_cfg(cfg.task, _convert_="all").bind(catalog)


def build_source(cfg: DictConfig, task: Task, catalog: CubeCatalog) -> VolumeSource:
    """``cfg.source`` with the arguments the run injects (those its target accepts)."""
    return instantiate_filtered(
        cfg.source,
        modality=task.modality,
        cubes=OmegaConf.to_container(cfg.cubes.sets, resolve=True),
        regions=list(catalog.regions),
        roi_ids=dict(catalog.roi_ids),
        cache_dir=str(cfg.paths.cache_dir),
    )


def datamodule_class(task: Task) -> type[VolumeDataModule]:
    """The datamodule for the task's kind (:data:`DATAMODULES`)."""
    return DATAMODULES.get(task.kind, VolumeDataModule)


def data_config(cfg: DictConfig) -> DataConfig:
    return merge_dataclass(DataConfig, cfg.data, "data")


def build_datamodule(cfg: DictConfig, task: Task, source: VolumeSource, catalog: CubeCatalog) -> VolumeDataModule:
    data = data_config(cfg)
    # chosen by task.kind, not by type: each datamodule takes the task of its kind
    make: Callable[..., VolumeDataModule] = datamodule_class(task)
    return make(
        task,
        source,
        catalog,
        batch_size=data.batch_size,
        eval_batch_size=data.eval_batch_size,
        augment_cfg=data.augment,
        normalize=data.normalize,
        seed=int(cfg.seed),
        drop_last=data.drop_last,
    )


def task_facts(task: Task) -> dict[str, Any]:
    """What the method is told about the task: ``num_classes``, ``class_names``, ``input_shape``."""
    return {"num_classes": task.num_classes, "class_names": task.class_names, "input_shape": task.sample_shape()}


def build_method(cfg: DictConfig, facts: Mapping[str, Any]) -> BaseMethod:
    """``cfg.model`` given the run's facts (:func:`task_facts`); not yet bound to a task."""
    method_class(cfg)
    method: BaseMethod = instantiate_cfg(cfg.model, **facts, _convert_="all")
    return method


def build_components(cfg: DictConfig) -> Components:
    """Instantiate everything a run needs; raises ConfigError before reading any data."""
    catalog = catalog_from_config(cfg.cubes)
    task = build_task(cfg, catalog)
    check_compatible(method_class(cfg), task, cfg)
    source = build_source(cfg, task, catalog)
    task.check_source(source)  # z range, and the x/y box of sources that have one (source=local)
    datamodule = build_datamodule(cfg, task, source, catalog)
    method = build_method(cfg, task_facts(task))
    method.bind_task(task)
    method.check_trainer(cfg.get("trainer"))
    return Components(catalog, source, task, datamodule, method)


def build_callbacks(cfg: DictConfig, method: BaseMethod) -> list[pl.Callback]:
    """``cfg.callbacks`` instantiated (the preflight builds them too: their range checks run first)."""
    callbacks = []
    for name, sub in (cfg.get("callbacks") or {}).items():
        if sub is None:
            continue
        extra = {}
        if name == "model_checkpoint" and sub.get("monitor", None) is None:
            extra = {"monitor": method.monitor[0], "mode": method.monitor[1]}
        callbacks.append(instantiate_cfg(sub, **extra))
    return callbacks


def build_loggers(cfg: DictConfig) -> list[Any]:
    return [instantiate_cfg(sub) for sub in (cfg.get("logger") or {}).values() if sub is not None]


def build_trainer(cfg: DictConfig, run_dir: Path, method: BaseMethod) -> pl.Trainer:
    callbacks = [*build_callbacks(cfg, method), RNGStateCheckpoint(), PreemptionCheckpoint(run_dir)]
    extra = {}
    if any(isinstance(cb, ProgressLog) and cb.hides_progress_bar() for cb in callbacks):
        extra["enable_progress_bar"] = False  # a log file gets the progress lines instead
    plugins: list[Any] = [AtomicCheckpointIO()]
    if cfg.trainer.get("sync_batchnorm"):  # batch norm over all ranks, on CPU (gloo) too
        plugins.append(SyncBatchNormPlugin())
    return instantiate(
        cfg.trainer,
        callbacks=callbacks,
        logger=build_loggers(cfg) or False,
        plugins=plugins,
        default_root_dir=str(run_dir),
        **extra,
    )


def load_method_checkpoint(method: pl.LightningModule, ckpt_path: str | Path, model_target: str) -> dict[str, Any]:
    """Load the checkpoint's ``state_dict`` into ``method`` strictly; returns the whole checkpoint.

    One line if the file has no ``state_dict`` or its parameters do not fit the built model.
    """
    state = load_checkpoint(ckpt_path)
    if "state_dict" not in state:
        raise CheckpointError(f"ckpt_path: {ckpt_path} has no state_dict")
    try:
        method.load_state_dict(state["state_dict"], strict=True)
    except RuntimeError as err:
        raise CheckpointError(
            f"ckpt_path: {ckpt_path} does not fit model {model_target} ({str(err).splitlines()[0]})"
        ) from None
    return state
