"""Every YAML under mtneuro_lab/conf/ and sweeps/ composes and passes schema validation."""

from __future__ import annotations

import pytest
from conftest import ROOT, compose
from omegaconf import OmegaConf

from mtneuro_lab.cluster.env import STAMP_FORMAT
from mtneuro_lab.config.schema import validate_config
from mtneuro_lab.errors import ConfigError

CONF = ROOT / "mtneuro_lab" / "conf"
#: groups whose options are selected on the command line as `<group>=<option>`
TOP_GROUPS = ("task", "model", "source", "trainer", "logger", "callbacks", "paths", "experiment", "cubes")


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def _all_choices() -> list[tuple[str, str]]:
    return [(g, o) for g in TOP_GROUPS for o in _options(g)]


def test_every_top_level_yaml_is_covered() -> None:
    """No YAML sits in mtneuro_lab/conf/ outside the groups composed below (none shipped untested)."""
    covered = {CONF / g / f"{o}.yaml" for g, o in _all_choices()} | {CONF / "config.yaml"}
    nested = {p for p in CONF.rglob("*.yaml") if p.parent.parent != CONF and p.parent != CONF}
    loose = set(CONF.glob("*/*.yaml")) - covered - {p for p in CONF.glob("hydra/*.yaml")}
    loose -= set(CONF.glob("paper_hparams/*.yaml"))  # selected by task x model: tests/test_paper_hparams.py
    loose -= {CONF / "debug" / f"{o}.yaml" for o in DEBUG_CONTEXT}  # test_debug_option_composes_and_validates
    # set by the task config itself / selected by model x task kind: tests/test_em_methods.py
    loose -= set(CONF.glob("task_kind/*.yaml")) | set(CONF.glob("model_kind/*.yaml"))
    assert not loose, f"untested YAML: {sorted(map(str, loose))}"
    # nested groups (e.g. hydra/launcher/*) are composed by test_nested_groups_compose
    assert all(p.suffix == ".yaml" for p in nested)


@pytest.mark.parametrize("group,option", _all_choices())
def test_group_option_composes_and_validates(group: str, option: str) -> None:
    cfg = compose([f"{group}={option}"])
    if group != "experiment":  # experiments are `# @package _global_` overlays
        assert cfg[group] is not None
    try:
        validate_config(cfg)
    except ConfigError as err:  # a config we ship must never fail the schema
        pytest.fail(f"{group}={option}: {err}")


#: every `+debug=<option>` with the task and model it is made for
DEBUG_CONTEXT = {
    "fast": (),
    "fast_resnet": ("model=supervised",),
    "fast_ssl": ("model=byol",),
    "fast_em": ("task=snemi3d", "model=mae_pretrain"),
    "fast_mae": ("task=snemi3d", "model=mae_pretrain"),
    "fast_mae_finetune": ("task=snemi3d", "model=mae_finetune"),
}


def test_debug_group_lists_every_option() -> None:
    assert set(_options("debug")) == set(DEBUG_CONTEXT)


@pytest.mark.parametrize("option", sorted(DEBUG_CONTEXT))
def test_debug_option_composes_and_validates(option: str) -> None:
    """The tiny sizes are applied on top of the chosen task and model; command-line keys still win."""
    cfg = compose([*DEBUG_CONTEXT[option], f"+debug={option}"])
    validate_config(cfg)
    assert cfg.trainer.max_epochs == 1 and cfg.trainer.limit_train_batches == 2
    assert cfg.trainer.enable_progress_bar is False and not cfg.logger
    if option.startswith("fast_") and option not in ("fast_ssl", "fast_resnet"):
        assert cfg.model.preset == "tiny" and list(cfg.task.crop) == [8, 32, 64] and cfg.data.batch_size == 2
    else:
        assert cfg.task.downsample == 4 and cfg.data.batch_size == 4
    if option in ("fast_resnet", "fast_ssl"):
        assert cfg.model.width == 16
    wins = compose([*DEBUG_CONTEXT[option], f"+debug={option}", "trainer.max_epochs=3", "data.batch_size=6"])
    assert wins.trainer.max_epochs == 3 and wins.data.batch_size == 6


def _nested() -> list[tuple[str, str]]:
    out = []
    for path in sorted(CONF.rglob("*.yaml")):
        rel = path.relative_to(CONF)
        if len(rel.parts) >= 3:  # e.g. hydra/launcher/joblib.yaml
            out.append(("/".join(rel.parts[:-1]), path.stem))
    return out


@pytest.mark.parametrize("group,option", _nested())
def test_nested_groups_compose(group: str, option: str) -> None:
    cfg = compose([f"{group}={option}"], return_hydra_config=True)
    assert cfg is not None


def test_hydra_configs_compose() -> None:
    for option in _options("hydra"):
        cfg = compose([f"hydra={option}"], return_hydra_config=True)
        for mode in ("run", "sweep"):
            raw = OmegaConf.to_container(cfg.hydra[mode], resolve=False)["dir"]
            stamped = "${run_stamp:}" in raw and "%f" in STAMP_FORMAT  # local runs: time with microseconds
            assert "%f" in raw or "job" in raw or stamped, f"hydra.{mode}.dir needs microseconds: {raw}"


def test_defaults_are_the_documented_ones() -> None:
    cfg = compose([], return_hydra_config=True)
    choices = cfg.hydra.runtime.choices
    assert (choices.task, choices.model, choices.source, choices.trainer, choices.logger) == (
        "roi_c1",
        "supervised",
        "phantom",
        "auto",
        "csv",
    )
    assert cfg.seed == 1
    assert cfg.task.downsample == 2


def test_roi_c1_cubes_and_ranges_match_the_paper() -> None:
    cfg = compose([])
    a = cfg.cubes.sets.A
    assert list(a.cortex.x) == [4600, 4856] and list(a.cortex.y) == [900, 1156]
    assert list(a.striatum.x) == [3700, 3956] and list(a.striatum.y) == [500, 756]
    assert list(a.vp.x) == [3063, 3319] and list(a.vp.y) == [850, 1106]
    assert list(a.zi.x) == [1543, 1799] and list(a.zi.y) == [650, 906]
    splits = cfg.task.splits
    assert [list(s.z) for s in (splits.train[0], splits.val[0], splits.test[0])] == [[110, 380], [380, 410], [420, 470]]


def test_sweeps_compose() -> None:
    sweep_dir = ROOT / "mtneuro_lab" / "sweeps"
    files = sorted(sweep_dir.rglob("*.yaml")) if sweep_dir.is_dir() else []
    for path in files:
        name = path.stem
        cfg = compose([f"+sweep={name}"], return_hydra_config=True)
        assert cfg is not None, name
