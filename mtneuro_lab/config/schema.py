"""Validation of a composed config, before any data is read or anything is written.

Two mechanisms, both producing one-line :class:`~mtneuro_lab.errors.ConfigError` messages that
name the key and the allowed values:

* plain sections (``data``, ``cubes`` ...) are merged onto dataclass schemas;
* sections with a ``_target_`` (task, model, source, trainer, logger, callbacks) are checked
  against the constructor of the class they instantiate, and of its parents where it forwards
  ``**kwargs`` (:func:`target_options`): unknown keys, wrong scalar types, ``Literal`` choices,
  and parameters annotated with a dataclass (recursively). The classes' own constructors then
  check value ranges when the run instantiates them, still before any data is touched.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import types
import typing
from collections.abc import Mapping, Sequence, Set
from dataclasses import dataclass, field
from typing import Any, Literal, Union

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError, OmegaConfBaseException

from mtneuro_lab.config.sections import AugmentConfig, PerfConfig
from mtneuro_lab.errors import ConfigError

HYDRA_KEYS = {"_target_", "_partial_", "_recursive_", "_convert_", "_args_"}


@dataclass
class DataConfig:
    """``data.*``: how batches are formed. ``batch_size`` is GLOBAL (split over DDP ranks)."""

    batch_size: int = 64
    eval_batch_size: int | None = None
    normalize: str = "train_stats"
    drop_last: bool = True
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"data.batch_size: must be >= 1, got {self.batch_size}")
        if self.eval_batch_size is not None and self.eval_batch_size < 1:
            raise ConfigError(f"data.eval_batch_size: must be >= 1 or null, got {self.eval_batch_size}")
        if self.normalize not in ("train_stats", "fixed"):
            raise ConfigError(f"data.normalize: must be train_stats or fixed, got {self.normalize!r}")
        if self.augment.intensity_jitter < 0:
            raise ConfigError(f"data.augment.intensity_jitter: must be >= 0, got {self.augment.intensity_jitter}")


def one_line_omegaconf_error(err: OmegaConfBaseException, prefix: str, schema: Any = None) -> str:
    """Condense an OmegaConf validation error into ``<full key>: <what> (allowed ...)``."""
    key = getattr(err, "full_key", None) or ""
    full = f"{prefix}.{key}" if key else prefix
    msg = str(err).splitlines()[0] if str(err) else type(err).__name__
    if "not in" in msg and schema is not None and dataclasses.is_dataclass(schema):
        allowed = ", ".join(f.name for f in dataclasses.fields(schema))
        return f"{full}: unknown key; allowed keys: {allowed}"
    return f"{full}: {msg}"


def merge_dataclass(schema: type, value: Any, key: str) -> Any:
    """``value`` (mapping) merged onto the dataclass ``schema``: the instance, or a one-line ConfigError."""
    _strict_bools(schema, value, key)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), value)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise ConfigError(one_line_omegaconf_error(err, key, schema)) from None


def _strict_bools(schema: type, value: Any, key: str) -> None:
    """Boolean fields take true/false only (OmegaConf alone would turn ``3`` or ``"yes"`` into True)."""
    if not isinstance(value, (Mapping, DictConfig)) or not dataclasses.is_dataclass(schema):
        return
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        if f.name not in value or OmegaConf.is_config(value) and OmegaConf.is_interpolation(value, f.name):
            continue
        item, hint = value[f.name], hints.get(f.name)
        if hint is bool and not isinstance(item, bool):
            raise ConfigError(f"{key}.{f.name}: expected true or false (a bool), got {item!r}")
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            _strict_bools(hint, item, f"{key}.{f.name}")


# -- signature-based validation of _target_ sections ------------------------------------------
def import_target(path: str, key: str) -> Any:
    module_name, _, attr = str(path).rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as err:
        raise ConfigError(f"{key}._target_: cannot import {path!r} ({err})") from None


@dataclass(frozen=True)
class TargetOptions:
    """The keys a ``_target_`` section may hold: parameters and their type hints; ``open`` means
    the target takes ``**kwargs`` we cannot follow, so other keys pass unchecked."""

    params: dict[str, inspect.Parameter]
    hints: dict[str, Any]
    open: bool


def _own_parameters(func: Any) -> tuple[dict[str, inspect.Parameter], dict[str, Any], bool]:
    """Named parameters of ``func`` (not self, not ``*args``/``**kwargs``), its hints, and whether
    it takes ``**kwargs``."""
    sig = inspect.signature(func)
    try:
        hints = typing.get_type_hints(func)
    except Exception:  # noqa: BLE001 - third-party annotations may not resolve; skip type checks
        hints = {}
    variadic = (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)
    params = {n: p for n, p in sig.parameters.items() if n not in ("self", "cls") and p.kind not in variadic}
    has_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())
    return params, hints, has_kwargs


def _is_project(function: Any) -> bool:
    return str(getattr(function, "__module__", "")).startswith("mtneuro_lab.")


def target_options(target: Any) -> TargetOptions:
    """What ``target``'s constructor accepts, following ``**kwargs`` up the class hierarchy.

    A project class (module ``mtneuro_lab.*``) whose constructor takes ``**kwargs`` forwards them
    to ``super().__init__`` (see :mod:`mtneuro_lab.methods.base`), so the keyword-only options of
    its ancestors are its options too; an ancestor's positional parameters are filled by the
    subclass itself (the run's facts, a network it built) and are not config keys. The walk stops
    at the first constructor without ``**kwargs``. A user's class outside the package that
    forwards ``**kwargs`` to a project class (docs/user_configs.md) is followed the same way; any
    other third-party constructor with ``**kwargs`` leaves the section open.
    """
    if not inspect.isclass(target):
        return TargetOptions(*_own_parameters(target))
    params: dict[str, inspect.Parameter] = {}
    hints: dict[str, Any] = {}
    inits = [vars(cls)["__init__"] for cls in target.__mro__ if "__init__" in vars(cls)]
    for depth, init in enumerate(inits):
        own, own_hints, has_kwargs = _own_parameters(init)
        for name, param in own.items():
            if (depth == 0 or param.kind is inspect.Parameter.KEYWORD_ONLY) and name not in params:
                params[name] = param
                if name in own_hints:
                    hints[name] = own_hints[name]
        if not has_kwargs:
            return TargetOptions(params, hints, False)
        forwards_to_project = depth + 1 < len(inits) and _is_project(inits[depth + 1])
        if not (_is_project(init) or forwards_to_project):
            break
    return TargetOptions(params, hints, True)


def _type_ok(value: Any, hint: Any, key: str) -> None:
    """Check scalar types and Literal choices; containers and unknown hints pass."""
    if hint is Any or hint is inspect.Parameter.empty:
        return
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return
        options = [a for a in args if a is not type(None)]
        schemas = [a for a in options if dataclasses.is_dataclass(a)]
        if schemas and isinstance(value, (Mapping, DictConfig)):  # e.g. model.optimizer: its keys too
            _type_ok(value, schemas[0], key)
            return
        if options and all(typing.get_origin(a) is Literal for a in options):  # e.g. trainer.precision
            choices = [c for a in options for c in typing.get_args(a)]
            if value not in choices:
                shown = ", ".join(dict.fromkeys(map(str, choices)))  # 16 and "16" read the same
                raise ConfigError(f"{key}: must be one of {shown}, got {value!r}")
            return
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                _type_ok(value, arg, key)
                return
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: value {value!r} has the wrong type")
    if origin is Literal:
        allowed = typing.get_args(hint)
        if value not in allowed:
            raise ConfigError(f"{key}: must be one of {', '.join(map(str, allowed))}, got {value!r}")
        return
    if origin in (list, tuple, Sequence) and isinstance(value, (list, tuple)):
        _items_ok(value, typing.get_args(hint), origin is tuple, key)
        return
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        if isinstance(value, (Mapping, DictConfig)):
            merge_dataclass(hint, value, key)
            return
        raise ConfigError(f"{key}: expected a mapping of {hint.__name__} keys, got {value!r}")
    if hint is bool and not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if hint is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if hint is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if hint is str and not isinstance(value, str):
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    # any other class that is not a container (Path, Accelerator, timedelta ...): never a list or mapping
    container = (Mapping, Sequence, Set)
    plain_class = inspect.isclass(origin or hint) and not issubclass(origin or hint, container)
    if plain_class and isinstance(value, (list, tuple, Mapping)):
        raise ConfigError(f"{key}: expected a {getattr(hint, '__name__', hint)}, got {value!r}")


def _items_ok(value: list | tuple, args: tuple[Any, ...], fixed: bool, key: str) -> None:
    """Item types of ``list[X]``/``Sequence[X]``/``tuple[X, ...]``/``tuple[X, Y]`` values (``key.<i>``)."""
    if not args:
        return
    if fixed and not (len(args) == 2 and args[1] is Ellipsis):
        if len(value) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} items, got {list(value)!r}")
        hints = list(args)
    else:
        hints = [args[0]] * len(value)
    for i, (item, item_hint) in enumerate(zip(value, hints)):
        _type_ok(item, item_hint, f"{key}.{i}")


def check_target_section(section: Any, key: str, injected: frozenset[str] = frozenset()) -> None:
    """Validate a ``_target_`` section (and nested ones) against the target's signature."""
    if not isinstance(section, (DictConfig, Mapping)) or "_target_" not in section:
        return
    target = import_target(section["_target_"], key)
    options = target_options(target)
    params, hints = options.params, options.hints
    for name in section:
        if name in HYDRA_KEYS:
            continue
        sub = f"{key}.{name}"
        try:
            value = section[name]
        except InterpolationResolutionError:
            continue  # e.g. ${hydra:runtime.output_dir} before Hydra made the run directory
        if value is None and isinstance(section, DictConfig) and OmegaConf.is_interpolation(section, name):
            continue  # the same, where the preflight's Hydra config leaves it empty
        if name not in params:
            if options.open:
                continue
            allowed = ", ".join(sorted(p for p in params if p not in injected))
            raise ConfigError(f"{sub}: unknown key for {getattr(target, '__name__', target)}; allowed: {allowed}")
        if isinstance(value, (DictConfig, Mapping)) and "_target_" in value:
            check_target_section(value, sub)
            continue
        try:
            plain = (
                OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value
            )
        except InterpolationResolutionError:
            continue
        _type_ok(plain, hints.get(name, inspect.Parameter.empty), sub)


# -- the whole config ------------------------------------------------------------------------
#: constructor arguments the run injects (not taken from the config section)
INJECTED = {
    "model": frozenset({"num_classes", "class_names", "input_shape"}),
    "task": frozenset(),
    "source": frozenset({"cubes", "regions", "roi_ids", "cache_dir", "modality"}),
}

TOP_LEVEL = {
    "task",
    "model",
    "source",
    "trainer",
    "logger",
    "callbacks",
    "paths",
    "data",
    "cubes",
    "seed",
    "ckpt_path",
    "test_after_fit",
    "tags",
    "extras",
    "sweep",
    "hydra",
    "perf",
    "hparams_from",
}


def validate_config(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` (one line) for the first problem found in ``cfg``."""
    unknown = set(map(str, cfg.keys())) - TOP_LEVEL
    if unknown:
        raise ConfigError(f"{sorted(unknown)[0]}: unknown top-level key; allowed: {', '.join(sorted(TOP_LEVEL))}")
    if not isinstance(cfg.get("seed"), int) or isinstance(cfg.get("seed"), bool) or cfg.seed < 0:
        raise ConfigError(f"seed: must be a non-negative integer, got {cfg.get('seed')!r}")
    merge_dataclass(DataConfig, cfg.data, "data")
    _check_top_level_types(cfg)
    if cfg.get("perf") is not None:
        merge_dataclass(PerfConfig, cfg.perf, "perf")
    for section in ("task", "model", "source", "trainer"):
        if section not in cfg or cfg[section] is None:
            raise ConfigError(f"{section}: missing config group")
        check_target_section(cfg[section], section, INJECTED.get(section, frozenset()))
    for group in ("logger", "callbacks"):
        for name, sub in (cfg.get(group) or {}).items():
            check_target_section(sub, f"{group}.{name}")
    check_trainer_values(cfg.trainer)


def _check_top_level_types(cfg: DictConfig) -> None:
    """Plain top-level keys that no schema section covers."""
    if not isinstance(cfg.get("test_after_fit", True), bool):
        raise ConfigError(f"test_after_fit: expected true or false, got {cfg.get('test_after_fit')!r}")
    source = cfg.get("hparams_from")  # provenance of defaults (mtneuro_lab/conf/paper_hparams/): shown by --cfg job
    if source is not None and not isinstance(source, str):
        raise ConfigError(f"hparams_from: expected a string saying where the defaults come from, got {source!r}")
    tags = cfg.get("tags")  # W&B tags and report labels
    if tags is not None and not (isinstance(tags, ListConfig) and all(isinstance(t, str | int) for t in tags)):
        raise ConfigError(f"tags: expected a list of names, e.g. tags=[paper,seed-study], got {tags!r}")
    ckpt = cfg.get("ckpt_path")
    if ckpt is not None and not isinstance(ckpt, str):
        raise ConfigError(f"ckpt_path: expected a checkpoint file, `last` or null, got {ckpt!r}")


#: Lightning Trainer integer arguments and their smallest allowed value (-1 = unlimited)
TRAINER_MINIMUM = {
    "max_epochs": -1,
    "min_epochs": 0,
    "max_steps": -1,
    "min_steps": 0,
    "num_nodes": 1,
    "accumulate_grad_batches": 1,
    "check_val_every_n_epoch": 1,
    "log_every_n_steps": 0,
    "num_sanity_val_steps": -1,
    "reload_dataloaders_every_n_epochs": 0,
}
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu", "hpu")


def check_trainer_values(section: Any) -> None:
    """Ranges of Lightning Trainer arguments, which its signature types alone do not catch.

    Lightning itself would reject these only inside ``Trainer(...)``, after the run directory
    exists, and with a multi-line message.
    """
    if not isinstance(section, (DictConfig, Mapping)) or "Trainer" not in str(section.get("_target_", "")):
        return
    for name, minimum in TRAINER_MINIMUM.items():
        value = section.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value < minimum:
            raise ConfigError(
                f"trainer.{name}: must be >= {minimum}{' (-1 = no limit)' if minimum < 0 else ''}, got {value}"
            )
    accel = section.get("accelerator")
    if isinstance(accel, str) and accel not in ACCELERATORS:
        raise ConfigError(f"trainer.accelerator: must be one of {', '.join(ACCELERATORS)}, got {accel!r}")
    devices = section.get("devices")
    ok = (
        devices == "auto"
        or (isinstance(devices, int) and not isinstance(devices, bool) and devices >= -1 and devices != 0)
        or (isinstance(devices, str) and devices.replace(",", "").replace("-", "").strip().isdigit())
        or (
            isinstance(devices, (list, ListConfig))
            and len(devices) > 0
            and all(isinstance(d, int) and d >= 0 for d in devices)
        )
    )
    if devices is not None and not ok:
        raise ConfigError(
            f"trainer.devices: must be auto, -1 (all), a count >= 1 or a list of device ids, got {devices!r}"
        )
