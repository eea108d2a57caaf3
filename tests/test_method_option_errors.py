"""One-line errors of method options that no shipped config sets wrong: each model config of
the project, composed once, with one option changed, built with fixed run facts (no task, no
data). The dataclass sections (``model.views``, ``model.linear_eval``) and the ViT patch checks
are called directly."""

from __future__ import annotations

import copy
import functools
from typing import Any

import pytest
from conftest import compose
from omegaconf import DictConfig, OmegaConf, open_dict

from mtneuro_lab.build import build_method
from mtneuro_lab.errors import ConfigError
from mtneuro_lab.methods.ssl import LinearEvalConfig, ViewConfig
from mtneuro_lab.nets.vit3d import token_grid

FACTS_2D = {"num_classes": 2, "class_names": ["a", "b"], "input_shape": (64, 64)}
#: the quick-CPU encoder of conf/model/unet2d.yaml (the paper's efficientnet-b7 takes a second to build)
SMALL_ENCODER = {"encoder_name": "resnet18"}
FACTS_3D = {"num_classes": 2, "class_names": ["a", "b"], "input_shape": (8, 32, 64)}


@functools.cache
def _model(name: str) -> DictConfig:
    return compose([f"model={name}"])


def _build_error(model: str, facts: dict, **options: Any) -> str:
    cfg = copy.deepcopy(_model(model))
    with open_dict(cfg):
        for key, value in options.items():
            OmegaConf.update(cfg.model, key, value, merge=False)
    with pytest.raises(ConfigError) as err:
        build_method(cfg, facts)
    message = str(err.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(
    ("model", "options", "message"),
    [
        ("myow", {"pool": "memory"}, "model.pool: must be one of batch, queue, got 'memory'"),
        ("myow", {"queue_size": 0}, "model.queue_size: must be >= 1, got 0"),
        ("myow", {"mined_weight": -0.5}, "model.mined_weight: must be >= 0, got -0.5"),
        ("myow", {"ramp_epochs": -1}, "model.ramp_epochs: must be >= 0, got -1"),
        ("unet2d", {**SMALL_ENCODER, "loss": "focal"}, "model.loss: must be one of ce, dice, ce_dice, got 'focal'"),
        (
            "unet2d",
            {**SMALL_ENCODER, "loss": "dice", "class_weights": [1.0, 2.0]},
            "model.class_weights: only used by loss=ce or ce_dice, not dice",
        ),
        ("unet2d", {**SMALL_ENCODER, "overlay_samples": -1}, "model.overlay_samples: must be >= 0, got -1"),
        ("unet2d", {"encoder_depth": 2}, "model.encoder_depth: must be 3, 4, 5 or null, got 2"),
    ],
)
def test_2d_method_options_name_their_key(model: str, options: dict, message: str) -> None:
    assert _build_error(model, FACTS_2D, **options) == message


@pytest.mark.parametrize(
    ("model", "options", "message"),
    [
        ("unet3d", {"base_channels": 0}, "model.base_channels: must be >= 1, got 0"),
        (
            "mae_pretrain",
            {"mask_strategy": "tube"},
            "model.mask_strategy: must be one of random, space, section, got 'tube'",
        ),
        (
            "mae_pretrain",
            {"decoder_heads": 0},
            "model.decoder_*: need decoder_dim >= 1, decoder_depth >= 0, decoder_heads >= 1, got ",
        ),
        ("mae_pretrain", {"eval_chunk": 0}, "model.eval_chunk: must be >= 1, got 0"),
        (
            "mae_pretrain",
            {"encoder_file": "../encoder.pt"},
            "model.encoder_file: must be a plain file name, got '../encoder.pt'",
        ),
    ],
)
def test_3d_method_options_name_their_key(model: str, options: dict, message: str) -> None:
    assert _build_error(model, FACTS_3D, **options).startswith(message)


@pytest.mark.parametrize(
    ("section", "kwargs", "message"),
    [
        (ViewConfig, {"intensity_jitter": -0.1}, "model.views.intensity_jitter: must be >= 0, got -0.1"),
        (LinearEvalConfig, {"momentum": 1.0}, "model.linear_eval.momentum: must be in [0, 1), got 1.0"),
        (LinearEvalConfig, {"weight_decay": -1e-4}, "model.linear_eval.weight_decay: must be >= 0, got -0.0001"),
    ],
)
def test_ssl_sections_name_their_key(section: type, kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        section(**kwargs)
    assert str(err.value) == message


def test_patch_sizes_need_three_positive_integers_and_3d_crops() -> None:
    assert token_grid((8, 32, 64), (2, 16, 16)) == (4, 2, 4)
    with pytest.raises(ConfigError) as err:
        token_grid((8, 32, 64), (2, 0, 16))
    assert str(err.value) == "model.patch_size: expected three positive integers [pd, ph, pw], got [2, 0, 16]"
    with pytest.raises(ConfigError) as err:
        token_grid((32, 64), (2, 16, 16))
    assert str(err.value) == "model.patch_size: the task's samples must be 3D (D, H, W) crops, got shape (32, 64)"
