"""Task 3 task split, read-out and the ``evaluate.py task=semantic`` entry point."""
from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import compose, read_metrics, run_cli

from mtneuro_lab.analysis.embeddings import split_tiles
from mtneuro_lab.analysis.features import FEATURES, FeatureTable
from mtneuro_lab.analysis.readout import linear_readout, metrics_of
from mtneuro_lab.data.cubes import catalog_from_config
from mtneuro_lab.errors import ConfigError
from mtneuro_lab.run import instantiate_cfg

SMALL = "task.samples=[{set: A, z: [110, 130]}]"  # 20 slices x 4 regions x 4 quadrants = 320 samples


def _table(values: np.ndarray, z: np.ndarray | None = None) -> FeatureTable:
    n = len(values)
    return FeatureTable(values=values, cube=np.full(n, "A/cortex", dtype=object),
                        z=np.arange(n) if z is None else z, tile=np.zeros(n, dtype=np.int64))


# -- the task ------------------------------------------------------------------------------------
def _task(*overrides: str):
    cfg = compose(["task=semantic", *overrides])
    return instantiate_cfg(cfg.task, _convert_="all").bind(catalog_from_config(cfg.cubes))


def test_semantic_split_is_all_360_annotated_slices_of_set_a():
    task = _task()
    assert task.kind == "semantic"
    slabs = task._slabs("test")
    assert [c.region for c, _ in slabs] == ["cortex", "striatum", "vp", "zi"]
    assert {z for _, z in slabs} == {(110, 470)} and {c.set_name for c, _ in slabs} == {"A"}
    assert task._slabs("val") == slabs            # same slices: an in-sample read-out
    assert {z for _, z in task._slabs("train")} == {(110, 380)}
    assert task.tiles_per_image == 4 and task.downsample_from_encoder


def test_encoder_resolution_is_adopted_only_when_downsample_is_null():
    task = _task()
    task.use_downsample(4)
    assert task.downsample == 4 and task.sample_shape() == (64, 64)
    fixed = _task("task.downsample=1")
    fixed.use_downsample(4)
    assert fixed.downsample == 1


@pytest.mark.parametrize("override, key", [("task.sample_unit=half", "task.sample_unit"),
                                           ("task.folds=1", "task.folds"),
                                           ("task.connectivity=8", "task.connectivity"),
                                           ("task.alpha=-1", "task.alpha")])
def test_bad_task_values_are_rejected(override, key):
    from mtneuro_lab.config.schema import validate_config

    cfg = compose(["task=semantic", override])
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate_config(cfg)
        instantiate_cfg(cfg.task, _convert_="all")


def test_features_align_with_the_built_images():
    task = _task("task.samples=[{set: A, z: [200, 203]}]", "task.downsample=4")
    cfg = compose(["task=semantic"])
    from mtneuro_lab.run import instantiate_filtered

    source = instantiate_filtered(cfg.source, modality="xray",
                                  cubes={k: {r: dict(b) for r, b in v.items()} for k, v in cfg.cubes.sets.items()},
                                  regions=list(task.catalog.regions), roi_ids=dict(task.catalog.roi_ids),
                                  cache_dir=str(cfg.paths.cache_dir))
    arrays = task.build("test", source)
    table = task.features(source)
    assert len(table) == 4 * len(arrays) == 4 * 12
    np.testing.assert_array_equal(table.z, np.repeat(arrays.z, 4))
    np.testing.assert_array_equal(table.region, np.repeat(arrays.regions, 4))
    np.testing.assert_array_equal(table.tile, np.tile(np.arange(4), len(arrays)))
    assert arrays.images.shape[1:] == (64, 64)


def test_quadrant_crops_are_row_major_like_the_features():
    images = np.zeros((2, 4, 4), dtype=np.uint8)
    for q, (y, x) in enumerate([(0, 0), (0, 2), (2, 0), (2, 2)]):
        images[:, y:y + 2, x:x + 2] = 10 * q + np.array([[1], [2]])[:, :1]
    images[1] += 100
    crops = split_tiles(images, 2)
    assert crops.shape == (8, 2, 2)
    np.testing.assert_array_equal(crops[:, 0, 0], [1, 11, 21, 31, 101, 111, 121, 131])


# -- the regression -----------------------------------------------------------------------------
def test_readout_recovers_a_linear_feature_and_excludes_nan_rows():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 6))
    values = np.column_stack([x @ rng.normal(size=6) for _ in FEATURES])
    values[:, 1] = rng.normal(size=400)           # unrelated to the embeddings
    values[:37, 4] = np.nan                       # e.g. samples with < 2 cells
    res = linear_readout(x, _table(values), folds=5, seed=3)
    assert res["vessel_density"]["r2"] == pytest.approx(1.0) and res["vessel_density"]["r2_cv"] == pytest.approx(1.0)
    assert res["axon_density"]["r2"] < 0.1 and res["axon_density"]["r2_cv"] < 0.05
    assert res["nn_distance"]["n_nan"] == 37 and res["nn_distance"]["n"] == 363
    assert res["nn_distance"]["r2_cv"] == pytest.approx(1.0)
    flat = metrics_of(res)
    assert {f"r2/{f}" for f in FEATURES} | {f"r2_cv/{f}" for f in FEATURES} <= set(flat)
    assert flat["n_nan/nn_distance"] == 37


def test_in_sample_r2_flatters_and_cv_does_not():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(200, 60))
    values = np.tile(rng.normal(size=(200, 1)), (1, len(FEATURES)))  # noise: nothing to predict
    res = linear_readout(x, _table(values), folds=5)["cell_count"]
    assert res["r2"] > 0.2 and res["r2_cv"] < 0.0
    ridge = linear_readout(x, _table(values), folds=5, alpha=1e4)["cell_count"]
    assert ridge["r2"] < res["r2"]


def test_blocked_cv_keeps_slices_together_and_constant_features_have_no_r2():
    rng = np.random.default_rng(2)
    z = np.repeat(np.arange(50), 4)
    x = rng.normal(size=(200, 3))
    values = np.column_stack([x[:, 0]] * len(FEATURES))
    values[:, 2] = 5.0
    res = linear_readout(x, _table(values, z=z), folds=5, cv="blocked")
    assert res["vessel_density"]["r2_cv"] == pytest.approx(1.0)
    assert math.isnan(res["cell_count"]["r2"]) and "r2/cell_count" not in metrics_of(res)


# -- the CLI ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def task1_ckpt(tmp_path_factory):
    run = tmp_path_factory.mktemp("task1") / "run"
    proc = run_cli("train.py", run_dir=run)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return run / "checkpoints" / "last.ckpt"


def test_evaluate_semantic_writes_r2_table_and_umaps(task1_ckpt, tmp_path):
    run = tmp_path / "eval"
    proc = run_cli("evaluate.py", "task=semantic", f"ckpt_path={task1_ckpt}", SMALL, "task.alpha=1.0",
                   run_dir=run, fast=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    metrics = read_metrics(run)
    for f in FEATURES:
        assert -1e6 < metrics[f"r2_cv/{f}"] <= 1.0 and 0.0 <= metrics[f"r2/{f}"] <= 1.0
        assert metrics[f"n/{f}"] + metrics[f"n_nan/{f}"] == 320
        assert (run / f"umap_{f}.png").stat().st_size > 1000
    assert np.load(run / "embeddings.npy").shape == (320, 512)
    assert "| vessel_density |" in (run / "semantic_r2.md").read_text()
    # downsample: null took the checkpoint's Task 1 resolution (4): 64 px tiles, 32 px quadrants
    assert "downsample: 4" in (run / "config.yaml").read_text()


def test_evaluate_semantic_without_a_usable_checkpoint_fails_in_one_line(tmp_path):
    missing = run_cli("evaluate.py", "task=semantic", f"ckpt_path={tmp_path}/nope.ckpt", fast=False,
                      run_dir=tmp_path / "a")
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines() == [f"error: ckpt_path: no checkpoint file at {tmp_path}/nope.ckpt"]
    none = run_cli("evaluate.py", "task=semantic", fast=False, run_dir=tmp_path / "b")
    assert none.returncode == 2
    line = none.stderr.strip().splitlines()
    assert len(line) == 1 and line[0].startswith("error: ckpt_path: task=semantic with model=supervised")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.slow
def test_evaluate_semantic_fits_pca_on_quadrants_without_a_checkpoint(tmp_path):
    run = tmp_path / "pca"
    proc = run_cli("evaluate.py", "task=semantic", "model=pca", "task.downsample=4", SMALL,
                   "task.fit_samples=[{set: A, z: [130, 150]}]", "task.umap=false", "task.alpha=1.0",
                   run_dir=run, fast=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    metrics = read_metrics(run)
    assert {f"r2_cv/{f}" for f in FEATURES} <= set(metrics)
    assert np.load(run / "embeddings.npy").shape == (320, 256)  # 256 components of 32x32 quadrants
