"""One-line errors of :mod:`mtneuro_lab.config.schema` that the config groups never produce:
top-level keys of the wrong type, a missing group, an unimportable ``_target_``, and signature
types (dataclass sections, fixed-length tuples, plain classes) of a target defined here."""

from __future__ import annotations

import copy
from datetime import timedelta
from typing import Any

import pytest
from conftest import compose, config_error
from omegaconf import DictConfig, OmegaConf

from mtneuro_lab.config.schema import check_target_section, merge_dataclass, validate_config
from mtneuro_lab.config.sections import PerfConfig

TARGET = f"{__name__}.build_thing"


def build_thing(
    size: tuple[int, int] = (1, 1),
    shape: tuple[int, ...] = (),
    perf: PerfConfig | None = None,
    window: timedelta = timedelta(0),
    anything: Any = None,
) -> None:
    """A ``_target_`` whose parameters carry the hints the schema checks."""


@pytest.fixture(scope="module")
def composed() -> DictConfig:
    return compose()


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("tags", 5, "tags: expected a list of names, e.g. tags=[paper,seed-study], got 5"),
        ("tags", ["a", {"b": 1}], "tags: expected a list of names, e.g. tags=[paper,seed-study], got ['a', {'b': 1}]"),
        ("ckpt_path", 5, "ckpt_path: expected a checkpoint file, `last` or null, got 5"),
        ("model", None, "model: missing config group"),
        ("task._target_", "mtneuro_lab.nowhere.Task", "task._target_: cannot import 'mtneuro_lab.nowhere.Task' ("),
        ("task._target_", "NoDots", "task._target_: cannot import 'NoDots' ("),
    ],
)
def test_top_level_and_group_errors_name_their_key(composed: DictConfig, key: str, value: Any, message: str) -> None:
    cfg = copy.deepcopy(composed)
    validate_config(cfg)  # the composed default is valid
    OmegaConf.set_struct(cfg, False)
    OmegaConf.update(cfg, key, value, merge=False)
    assert config_error(validate_config, cfg).startswith(message)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("size", [1, 2, 3], "thing.size: expected 2 items, got [1, 2, 3]"),
        ("size", [1, "two"], "thing.size.1: expected an integer, got 'two'"),
        ("shape", [4, 4, 2.5], "thing.shape.2: expected an integer, got 2.5"),
        ("perf", 3, "thing.perf: expected a mapping of PerfConfig keys, got 3"),
        ("window", [1, 2], "thing.window: expected a timedelta, got [1, 2]"),
    ],
)
def test_signature_types_of_a_target(key: str, value: Any, message: str) -> None:
    section = OmegaConf.create({"_target_": TARGET, key: value})
    assert config_error(check_target_section, section, "thing") == message


def test_values_of_the_right_shape_pass() -> None:
    ok = {"size": [2, 3], "shape": [1, 2, 3, 4], "perf": {}, "window": "1h", "anything": [{"x": 1}]}
    check_target_section(OmegaConf.create({"_target_": TARGET, **ok}), "thing")
    check_target_section({"no_target": 1}, "thing")  # not a _target_ section: nothing to check


def test_a_dataclass_section_that_is_not_a_mapping_fails_in_the_merge() -> None:
    message = config_error(merge_dataclass, PerfConfig, [1, 2], "perf")
    assert message.startswith("perf")
