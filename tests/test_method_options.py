"""Method options are declared once in the class hierarchy and checked against all of it.

Constructors take the run's facts positionally and their own options keyword-only, passing the
rest up with ``**kwargs`` (:mod:`mtneuro_lab.methods.base`); the schema follows those
``**kwargs`` (:func:`mtneuro_lab.config.schema.target_options`). These tests prove that the
convention holds for every method class, and that for every shipped model config a typo or a
wrong type in any option, inherited ones included, is still refused in one line.
"""

from __future__ import annotations

import copy
import functools
import importlib
import inspect
import pkgutil
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import pytest
from conftest import ROOT, compose
from omegaconf import open_dict

import mtneuro_lab.methods
from mtneuro_lab.build import build_method, method_class
from mtneuro_lab.config.schema import INJECTED, import_target, target_options, validate_config
from mtneuro_lab.errors import ConfigError
from mtneuro_lab.methods.base import BaseMethod

FACTS = ("num_classes", "class_names", "input_shape")
MODELS = sorted(p.stem for p in (ROOT / "mtneuro_lab" / "conf" / "model").glob("*.yaml"))


def _method_classes() -> list[type[BaseMethod]]:
    found = []
    for info in pkgutil.iter_modules(mtneuro_lab.methods.__path__):
        module = importlib.import_module(f"mtneuro_lab.methods.{info.name}")
        found += [
            cls
            for cls in vars(module).values()
            if inspect.isclass(cls) and issubclass(cls, BaseMethod) and cls.__module__ == module.__name__
        ]
    return found


def _own_init(cls: type) -> inspect.Signature | None:
    init = vars(cls).get("__init__")
    return None if init is None else inspect.signature(init)


def _declared_options(cls: type) -> dict[str, list[str]]:
    """Option name -> the classes of ``cls``'s hierarchy whose constructor declares it."""
    where: dict[str, list[str]] = {}
    for klass in cls.__mro__:
        if not (isinstance(klass, type) and issubclass(klass, BaseMethod)):
            continue
        sig = _own_init(klass)
        for name, p in sig.parameters.items() if sig else ():
            if p.kind is inspect.Parameter.KEYWORD_ONLY:
                where.setdefault(name, []).append(klass.__name__)
    return where


@pytest.mark.parametrize("cls", _method_classes(), ids=lambda c: c.__name__)
def test_every_option_is_declared_once_and_facts_come_first(cls: type[BaseMethod]) -> None:
    twice = {name: owners for name, owners in _declared_options(cls).items() if len(owners) > 1}
    assert not twice, f"{cls.__name__}: options declared in more than one class: {twice}"
    sig = _own_init(cls)
    if sig is None:
        return
    params = [p for n, p in sig.parameters.items() if n != "self"]
    assert tuple(p.name for p in params[:3]) == FACTS
    assert all(p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for p in params[:3])
    # below BaseMethod every constructor forwards what it does not declare to its parent
    if cls is not BaseMethod:
        assert params[-1].kind is inspect.Parameter.VAR_KEYWORD, f"{cls.__name__} does not forward **kwargs"


@functools.cache
def _composed(model: str) -> Any:
    """The default config with ``model=<model>`` (composed once per model; callers copy it)."""
    return compose([f"model={model}"])


def _model_targets() -> dict[str, type]:
    return {m: import_target(_composed(m).model._target_, "model") for m in MODELS}


def test_config_targets_take_only_the_facts_positionally() -> None:
    """A config's ``_target_``: no positional plumbing (``net``, ``embed_dim``) reachable from YAML."""
    for model, cls in _model_targets().items():
        options = target_options(cls)
        assert not options.open, model
        positional = [n for n, p in options.params.items() if p.kind is not inspect.Parameter.KEYWORD_ONLY]
        assert tuple(positional) == FACTS, (model, positional)
        assert {"optimizer", "scheduler"} <= set(options.params), model  # inherited from BaseMethod


def _wrong_value(hint: Any) -> tuple[Any, str] | None:
    """A value of the wrong type for ``hint`` and a word the one-line error must contain."""
    origin = typing.get_origin(hint)
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if origin is Literal or (args and all(typing.get_origin(a) is Literal for a in args)):
        return "not_a_choice", "must be one of"
    if args and any(hasattr(a, "__dataclass_fields__") for a in args):
        return {"no_such_key": 1}, "no_such_key: unknown key"
    if origin in (typing.Union, types.UnionType):  # e.g. int | None
        hint = args[0] if len(args) == 1 else None
    elif origin is not None:  # containers (patch_size, class_weights ...): the constructor checks them
        return None
    return {
        bool: ("maybe", "true or false"),
        int: ("many", "integer"),
        float: ("fast", "number"),
        str: (7, "string"),
    }.get(hint)


def _refused(cfg: Any, name: str, value: Any) -> str:
    bad = copy.deepcopy(cfg)
    with open_dict(bad.model):
        bad.model[name] = value
    with pytest.raises(ConfigError) as err:
        validate_config(bad)
    return str(err.value)


@pytest.mark.parametrize("model", MODELS)
def test_typos_and_wrong_types_in_any_option_are_one_line(model: str) -> None:
    cfg = _composed(model)
    validate_config(cfg)
    cls = import_target(cfg.model._target_, "model")
    options = target_options(cls)
    allowed = sorted(n for n in options.params if n not in INJECTED["model"])
    checked = 0
    for name in allowed:
        typo = name[:-1] if name[:-1] not in options.params else f"{name}_"
        msg = _refused(cfg, typo, 1)
        assert msg == f"model.{typo}: unknown key for {cls.__name__}; allowed: {', '.join(allowed)}"
        wrong = _wrong_value(options.hints.get(name))
        if wrong is None:
            continue
        msg = _refused(cfg, name, wrong[0])
        assert msg.startswith(f"model.{name}") and wrong[1] in msg and "\n" not in msg, msg
        checked += 1
    # every model has at least the two inherited optimiser sections checked for type
    assert checked >= 2, model


def test_method_class_is_the_one_check_that_target_is_a_method() -> None:
    cfg = compose(["model=supervised"])
    assert method_class(cfg).__name__ == "SupervisedClassifier"
    with open_dict(cfg.model):
        cfg.model._target_ = "torch.nn.Identity"
    with pytest.raises(ConfigError, match=r"^model._target_: torch.nn.Identity is not a method"):
        build_method(cfg, {"num_classes": 4, "class_names": list("abcd"), "input_shape": (16, 16)})


def test_methods_declare_the_run_contract() -> None:
    """What build/run read off a method is declared on BaseMethod, not probed with getattr."""
    for name in ("monitor", "task_kinds", "validation_metrics", "bind_task", "after_evaluate"):
        assert name in vars(BaseMethod), name
    for cls in _model_targets().values():
        metric, mode = cls.monitor
        assert metric.startswith("val/") and mode in ("min", "max")
        assert set(cls.task_kinds) <= {"classification", "segmentation", "semantic", "em"}
    here = Path(mtneuro_lab.__file__).parent
    source = (here / "run.py").read_text() + (here / "build.py").read_text()
    assert not re.search(r'getattr\([^)]*"(task_kinds|after_evaluate|monitor|bind_task)"', source)
