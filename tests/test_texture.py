"""The hand-crafted texture baseline (``model=texture``): feature values, fit on the training split
only, checkpoint round trip, a tiny fit through the real flow, and one-line config errors."""

from __future__ import annotations

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from conftest import compose, read_metrics, run_inproc
from scipy import ndimage
from skimage.filters import gabor

from mtneuro_lab.config.schema import validate_config
from mtneuro_lab.errors import ConfigError, DataError
from mtneuro_lab.methods import texture
from mtneuro_lab.methods.texture import TextureClassifier, canonical_orientation

CLASSES = ["cortex", "striatum", "vp", "zi"]


def _noise(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size), dtype=np.uint8)


def _normalised(tiles: np.ndarray, mean: float, std: float) -> torch.Tensor:
    """What the datamodule hands the model: ``(u / 255 - mean) / std``, float32, ``(B, 1, H, W)``."""
    return (torch.from_numpy(tiles).float().unsqueeze(1) / 255 - mean) / std


# -- feature values ------------------------------------------------------------------------------
def test_glcm_contrast_separates_a_constant_tile_from_stripes() -> None:
    const = np.full((1, 16, 16), 128, np.uint8)
    stripes = np.tile(np.array([0, 255], np.uint8), (16, 8))[None]  # columns alternate 0 / 255
    f_const = texture.glcm_features(const, [1], 4, 32)
    f_stripes = texture.glcm_features(stripes, [1], 4, 32)
    n = len(texture.GLCM_PROPS)
    # levels 0 and 31 differ in every horizontal and diagonal pair, never in a vertical one
    assert f_const[0, 0] == 0 and f_const[0, n] == 0
    assert f_stripes[0, 0] == pytest.approx(0.75 * 31**2)  # contrast: mean over the 4 angles
    assert f_stripes[0, n] == pytest.approx(31**2)  # contrast: range over the angles


def test_intensity_and_lbp_features_on_known_tiles() -> None:
    half = np.zeros((1, 8, 8), np.uint8)
    half[0, :, 4:] = 255  # two values, half each: symmetric, kurtosis 1 - 3
    f = texture.intensity_features(half, [0.25, 0.75])
    np.testing.assert_allclose(f[0], [0.0, 1.0, 0.5, 0.5, 0.0, -2.0], atol=1e-12)
    const = np.full((1, 16, 16), 7, np.uint8)
    hist = texture.lbp_features(const, 8, [1, 2])
    assert hist.shape == (1, 20)
    expected = np.zeros(10)
    expected[8] = 1.0  # every neighbour >= the centre: the uniform code with 8 ones
    np.testing.assert_array_equal(hist[0], np.concatenate([expected, expected]))


def test_gabor_energies_match_skimage_gabor() -> None:
    tile = ndimage.gaussian_filter(_noise(1, 24, seed=3)[0].astype(float), 1.5)
    tile = np.clip((tile - tile.min()) / np.ptp(tile) * 255, 0, 255).astype(np.uint8)
    bank = texture.gabor_bank([0.1, 0.3], 4)
    got = texture.gabor_features(tile[None], bank)[0]
    x = tile / 255.0 - (tile / 255.0).mean()
    for i, freq in enumerate([0.1, 0.3]):
        rms = [np.sqrt(np.mean(np.square(gabor(x, freq, theta=t)).sum(0))) for t in np.arange(4) * np.pi / 4]
        assert got[2 * i] == pytest.approx(np.mean(rms), rel=1e-4)
        assert got[2 * i + 1] == pytest.approx(np.ptp(rms), rel=1e-3, abs=1e-6)


def test_features_ignore_the_datamodule_normalisation_and_are_deterministic() -> None:
    tiles = _noise(6, 32)
    a = TextureClassifier(4, CLASSES, (32, 32))
    b = TextureClassifier(4, CLASSES, (32, 32), feature_cache=0)
    a.input_norm.copy_(torch.tensor([0.3, 0.2]))
    b.input_norm.copy_(torch.tensor([0.6, 0.05]))
    ea, eb = a.embed(_normalised(tiles, 0.3, 0.2)), b.embed(_normalised(tiles, 0.6, 0.05))
    torch.testing.assert_close(ea, eb, rtol=0, atol=0)
    torch.testing.assert_close(a.embed(_normalised(tiles, 0.3, 0.2)), ea, rtol=0, atol=0)  # from the memo
    expected = a.tile_features(np.stack([canonical_orientation(t)[1] for t in tiles]))
    torch.testing.assert_close(ea, torch.from_numpy(expected).float(), rtol=0, atol=0)
    assert ea.shape == (6, a.embed_dim) and not torch.allclose(ea[0], ea[1])


def test_features_are_the_same_for_every_flip_and_rotation() -> None:
    tile = _noise(1, 32, seed=5)[0]
    variants = np.stack([np.rot90(t, k) for t in (tile, tile.T) for k in range(4)])
    model = TextureClassifier(4, CLASSES, (32, 32), feature_cache=0)
    emb = model.embed(_normalised(variants, 0.0, 1.0))
    assert torch.equal(emb, emb[:1].expand_as(emb))
    shuffled = tile.ravel().copy()
    np.random.default_rng(0).shuffle(shuffled)  # same intensities, other texture: other features
    assert not torch.equal(model.embed(_normalised(shuffled.reshape(1, 32, 32), 0.0, 1.0))[0], emb[0])


# -- fitting, checkpoint, an easy problem --------------------------------------------------------
def _two_textures(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Class 0: oriented stripes; class 1: isotropic blobs; every tile has mean 128 and std 40."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:32, :32]
    tiles, labels = [], rng.integers(0, 2, n)
    for label in labels:
        if label == 0:
            theta, period = rng.uniform(0, np.pi), rng.uniform(5, 8)
            img = np.sin(2 * np.pi * (xx * np.cos(theta) + yy * np.sin(theta)) / period + rng.uniform(0, 6.3))
            img = img + 0.3 * rng.standard_normal((32, 32))
        else:
            img = ndimage.gaussian_filter(rng.standard_normal((32, 32)), 1.5, mode="wrap")
        img = (img - img.mean()) / img.std() * 40 + 128
        tiles.append(np.clip(img, 0, 255).round().astype(np.uint8))
    return np.stack(tiles), labels


def test_fit_standardises_with_training_tiles_and_separates_two_textures() -> None:
    train, y_train = _two_textures(64, seed=0)
    test, y_test = _two_textures(64, seed=1)
    model = TextureClassifier(2, ["stripes", "blobs"], (32, 32))
    model.fit_embedding(train, mean=0.5, std=0.16)
    feats = model.tile_features(np.stack([canonical_orientation(t)[1] for t in train]))
    np.testing.assert_allclose(model.feat_mean.numpy(), feats.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model.feat_std.numpy(), np.maximum(feats.std(0, ddof=1), 1e-6), rtol=1e-4, atol=1e-6)
    assert bool(model.fitted)
    torch.manual_seed(0)
    optimizer = torch.optim.SGD(model.optimizer_parameters(), lr=0.1)
    x_train, target = _normalised(train, 0.5, 0.16), torch.from_numpy(y_train)
    for _ in range(100):
        optimizer.zero_grad()
        model.loss(model(x_train), target).backward()
        optimizer.step()
    with torch.no_grad():
        acc = (model(_normalised(test, 0.5, 0.16)).argmax(1).numpy() == y_test).mean()
    assert acc >= 0.9  # chance is about 0.5; mean and std carry no signal here


def test_checkpoint_round_trip_needs_no_refit() -> None:
    train, _ = _two_textures(16, seed=2)
    model = TextureClassifier(2, ["a", "b"], (32, 32), glcm_distances=[1, 3], lbp_radii=[1])
    model.fit_embedding(train, mean=0.4, std=0.2)
    torch.nn.init.normal_(model.readout.weight)
    fresh = TextureClassifier(2, ["a", "b"], (32, 32), glcm_distances=[1, 3], lbp_radii=[1])
    with pytest.raises(DataError, match="model=texture: the embedding is not fitted"):
        fresh.validation_step({"image": _normalised(train, 0.4, 0.2), "target": torch.zeros(16).long()}, 0)
    fresh.load_state_dict(model.state_dict())
    assert not any("memo" in k for k in model.state_dict())
    fresh.on_fit_start()  # fitted: returns before looking for a datamodule
    x = _normalised(_two_textures(8, seed=3)[0], 0.4, 0.2)
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)


def test_tiny_fit_on_the_phantom_uses_only_training_tiles() -> None:
    from mtneuro_lab.run import build_components

    cfg = compose(
        [
            "model=texture",
            "task.downsample=4",
            "data.batch_size=16",
            "logger=none",
            "model.gabor_frequencies=[0.2]",
            "model.lbp_radii=[1]",
        ]
    )
    validate_config(cfg)
    comps = build_components(cfg)
    trainer = pl.Trainer(
        max_epochs=2,
        limit_train_batches=8,
        limit_val_batches=1,
        limit_test_batches=4,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        accelerator="cpu",
    )
    trainer.fit(comps.method, datamodule=comps.datamodule)
    assert "test" not in comps.datamodule.arrays, "the test split was built during fit"
    method, dm = comps.method, comps.datamodule
    train = dm.arrays["train"].images
    feats = method.tile_features(np.stack([canonical_orientation(t)[1] for t in train]))
    np.testing.assert_allclose(method.feat_mean.numpy(), feats.mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(method.input_norm, torch.tensor([dm.mean, dm.std]))
    (result,) = trainer.test(method, datamodule=dm)
    assert result["test/acc"] > 0.5  # four regions: chance is 0.25


# -- bad input -----------------------------------------------------------------------------------
@pytest.mark.parametrize("task", ["seg2d_3class", "snemi3d"])
def test_texture_on_a_non_classification_task_fails_in_one_line(task: str) -> None:
    from mtneuro_lab.run import build_components

    cfg = compose(["model=texture", f"task={task}"])
    with pytest.raises(ConfigError, match=r"model=.*does not fit task=") as info:
        build_components(cfg)
    assert "\n" not in str(info.value) and "classification" in str(info.value)


@pytest.mark.parametrize(
    "override, key",
    [
        ("model.glcm_levels=1", "model.glcm_levels"),
        ("model.glcm_distances=[0,1]", "model.glcm_distances"),
        ("model.glcm_angles=0", "model.glcm_angles"),
        ("model.lbp_points=2", "model.lbp_points"),
        ("model.lbp_radii=[200]", "model.lbp_radii"),
        ("model.gabor_frequencies=[0.7]", "model.gabor_frequencies"),
        ("model.gabor_orientations=0", "model.gabor_orientations"),
        ("model.quantiles=[1.5]", "model.quantiles"),
        ("model.feature_cache=-1", "model.feature_cache"),
    ],
)
def test_bad_texture_values_raise_one_line_config_errors(override: str, key: str) -> None:
    from mtneuro_lab.run import build_components

    cfg = compose(["model=texture", override])
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as info:
        validate_config(cfg)
        build_components(cfg)
    assert "\n" not in str(info.value)


def test_texture_config_composes_with_the_documented_defaults() -> None:
    cfg = compose(["model=texture"])
    validate_config(cfg)
    assert cfg.model._target_.endswith("TextureClassifier")
    assert list(cfg.model.glcm_distances) == [1, 2, 4] and cfg.model.glcm_angles == 4


@pytest.mark.slow
def test_texture_trains_through_the_cli_and_evaluate_reproduces_it(tmp_path) -> None:
    run_dir = tmp_path / "run"
    proc = run_inproc("train.py", "model=texture", "task=roi_c1", run_dir=run_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = read_metrics(run_dir)
    ckpts = sorted((run_dir / "checkpoints").glob("epoch*.ckpt"))
    assert ckpts
    proc = run_inproc("evaluate.py", f"ckpt_path={ckpts[-1]}", run_dir=tmp_path / "eval", fast=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert read_metrics(tmp_path / "eval")["test/acc"] == pytest.approx(metrics["test/acc"], abs=1e-6)
