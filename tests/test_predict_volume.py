"""``mtneuro_lab.run.predict_volume`` (docs/em.md: probabilities of a volume file larger than
memory) on a checkpoint written here from a built tiny EM model, compared with the method's own
whole-volume inference; and the one-line errors for checkpoints it cannot use."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import zarr
from conftest import compose
from omegaconf import DictConfig, OmegaConf, open_dict

from mtneuro_lab.build import build_components
from mtneuro_lab.config.schema import validate_config
from mtneuro_lab.data.augment import to_float
from mtneuro_lab.errors import CheckpointError, ConfigError
from mtneuro_lab.run import check_checkpoint_fits, predict_volume, resolve_ckpt

EM = [
    "task=snemi3d",
    "source.em_shape=[24,64,64]",
    "task.crop=[4,32,32]",
    "task.downsample=1",
    "task.splits.train.z=[0,14]",
    "task.splits.val.z=[14,18]",
    "task.splits.test.z=[18,24]",
    "model=rsunet",
    "model.net.widths=[4,8]",
    "trainer=cpu",
]
MEAN, STD = 0.47, 0.16  # of x / 255


def _config(overrides: list[str]) -> DictConfig:
    cfg = compose(overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = "unused"
    validate_config(cfg)
    return cfg


@pytest.fixture(scope="module")
def em_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """A run directory with config.yaml and a checkpoint of a tiny RSUNet (random weights)."""
    run = tmp_path_factory.mktemp("em_run")
    cfg = _config(EM)
    torch.manual_seed(0)
    method = build_components(cfg).method
    OmegaConf.save(cfg, run / "config.yaml")
    (run / "checkpoints").mkdir()
    torch.save(
        {"state_dict": method.state_dict(), "EMDataModule": {"mean": MEAN, "std": STD}},
        run / "checkpoints" / "best.ckpt",
    )
    torch.save({"state_dict": method.state_dict()}, run / "checkpoints" / "no_stats.ckpt")
    torch.save({"epoch": 3}, run / "checkpoints" / "no_state.ckpt")
    return run, method


@pytest.mark.filterwarnings("error::UserWarning")  # e.g. torch's on the read-only .npy memory map
def test_chunked_file_prediction_equals_the_methods_whole_volume_inference(
    em_run: tuple[Path, Any], tmp_path: Path
) -> None:
    run, method = em_run
    volume = np.random.default_rng(1).integers(0, 256, (8, 40, 48), dtype=np.uint8)
    np.save(tmp_path / "big.npy", volume)
    stats = predict_volume(run / "checkpoints" / "best.ckpt", tmp_path / "big.npy", tmp_path / "probs.zarr")
    probs = zarr.open(str(tmp_path / "probs.zarr"), mode="r")
    assert probs.shape == (3, 8, 40, 48) and probs.dtype == np.float16
    assert stats.voxels == volume.size and stats.windows > 0
    method.eval()
    with torch.no_grad():
        image = to_float(torch.from_numpy(volume)[None], MEAN, STD)  # (1, 1, Z, Y, X)
        whole = method.predict_volume(image)[0].numpy()
    np.testing.assert_allclose(np.asarray(probs[:]).astype(np.float32), whole, atol=2e-3)
    assert float(np.min(probs[:])) >= 0.0 and float(np.max(probs[:])) <= 1.0


def test_checkpoints_it_cannot_use_are_one_line(em_run: tuple[Path, Any], tmp_path: Path) -> None:
    run, method = em_run
    np.save(tmp_path / "big.npy", np.zeros((4, 32, 32), np.uint8))
    no_stats = run / "checkpoints" / "no_stats.ckpt"
    with pytest.raises(CheckpointError) as err:
        predict_volume(no_stats, tmp_path / "big.npy", tmp_path / "out.zarr")
    assert str(err.value) == f"ckpt_path: {no_stats} holds no normalisation (datamodule mean/std)"
    no_state = run / "checkpoints" / "no_state.ckpt"
    with pytest.raises(CheckpointError) as err:
        check_checkpoint_fits(method, no_state, "mtneuro_lab.methods.em.EMSegmentation")
    assert str(err.value) == f"ckpt_path: {no_state} has no state_dict (not a checkpoint of this project)"


def test_a_checkpoint_of_another_method_is_refused(tmp_path: Path) -> None:
    cfg = _config([])
    OmegaConf.save(cfg, tmp_path / "config.yaml")
    (tmp_path / "checkpoints").mkdir()
    ckpt = tmp_path / "checkpoints" / "x.ckpt"
    torch.save({"state_dict": {}}, ckpt)
    with pytest.raises(ConfigError) as err:
        predict_volume(ckpt, tmp_path / "in.npy", tmp_path / "out.zarr")
    assert str(err.value) == f"ckpt_path: {ckpt} is not a checkpoint of an EM method ({cfg.model._target_})"


def test_resolve_ckpt(tmp_path: Path) -> None:
    assert resolve_ckpt(None, tmp_path) is None and resolve_ckpt("last", tmp_path) is None
    with pytest.raises(CheckpointError) as err:
        resolve_ckpt(str(tmp_path / "gone.ckpt"), tmp_path)
    assert str(err.value) == f"ckpt_path: no checkpoint file at {tmp_path / 'gone.ckpt'}"
    (tmp_path / "a.ckpt").write_bytes(b"")
    assert resolve_ckpt(str(tmp_path / "a.ckpt"), tmp_path) == str(tmp_path / "a.ckpt")
