"""Task 3 task split, read-out and the ``evaluate.py task=semantic`` entry point."""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import compose, read_metrics, run_inproc
from omegaconf import OmegaConf

from mtneuro_lab.analysis.embeddings import split_tiles
from mtneuro_lab.analysis.readout import fold_predictions, linear_readout, metrics_of, table_text
from mtneuro_lab.data.cubes import catalog_from_config
from mtneuro_lab.data.features import FEATURES, FeatureTable
from mtneuro_lab.data.semantic_task import blocked_folds
from mtneuro_lab.errors import ConfigError
from mtneuro_lab.run import instantiate_cfg

SMALL = "task.samples=[{set: A, z: [110, 130]}]"  # 20 slices x 4 regions x 4 quadrants = 320 samples
SMALL_GAP = "task.cv_gap=1"  # the default 12-slice gap needs more than 20 slices


def _table(values: np.ndarray, z: np.ndarray | None = None, region: np.ndarray | None = None) -> FeatureTable:
    n = len(values)
    return FeatureTable(
        values=values,
        cube=np.full(n, "A/cortex", dtype=object),
        z=np.arange(n) if z is None else z,
        tile=np.zeros(n, dtype=np.int64),
        region=np.arange(n) % 4 if region is None else region,
    )


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
    assert task._slabs("val") == slabs  # same slices: an in-sample read-out
    assert {z for _, z in task._slabs("train")} == {(110, 380)}
    assert task.tiles_per_image == 4 and task.downsample_from_encoder


def test_encoder_resolution_is_adopted_only_when_downsample_is_null():
    task = _task()
    task.use_downsample(4)
    assert task.downsample == 4 and task.sample_shape() == (64, 64)
    fixed = _task("task.downsample=1")
    fixed.use_downsample(4)
    assert fixed.downsample == 1


@pytest.mark.parametrize(
    "override, key",
    [
        ("task.sample_unit=half", "task.sample_unit"),
        ("task.folds=1", "task.folds"),
        ("task.cv=random", "task.cv"),
        ("task.cv_gap=-1", "task.cv_gap"),
        ("task.connectivity=8", "task.connectivity"),
        ("task.alpha=-1", "task.alpha"),
    ],
)
def test_bad_task_values_are_rejected(override, key):
    from mtneuro_lab.config.schema import validate_config

    cfg = compose(["task=semantic", override])
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate_config(cfg)
        instantiate_cfg(cfg.task, _convert_="all")


def test_blocked_folds_with_a_gap_are_the_default_and_checked_before_any_data_read():
    task = _task()
    assert (task.cv, task.cv_gap, task.folds) == ("blocked", 12, 5)
    with pytest.raises(ConfigError, match=r"^task\.cv_gap: 12 slices on each side of held-out block 2 of 5"):
        _task(SMALL)  # 20 slices: a middle block keeps no training slice
    with pytest.raises(ConfigError, match=r"^task\.folds: 5 z-block folds need at least 5 slices, samples have 3"):
        _task("task.samples=[{set: A, z: [110, 113]}]", "task.cv_gap=0")
    assert _task(SMALL, "task.cv=shuffled").cv == "shuffled"  # shuffled folds stay available
    assert _task(SMALL, SMALL_GAP).cv_gap == 1


def test_features_align_with_the_built_images():
    task = _task("task.samples=[{set: A, z: [200, 203]}]", "task.downsample=4", "task.cv=shuffled")
    cfg = compose(["task=semantic"])
    from mtneuro_lab.run import instantiate_filtered

    source = instantiate_filtered(
        cfg.source,
        modality="xray",
        cubes={k: {r: dict(b) for r, b in v.items()} for k, v in cfg.cubes.sets.items()},
        regions=list(task.catalog.regions),
        roi_ids=dict(task.catalog.roi_ids),
        cache_dir=str(cfg.paths.cache_dir),
    )
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
        images[:, y : y + 2, x : x + 2] = 10 * q + np.array([[1], [2]])[:, :1]
    images[1] += 100
    crops = split_tiles(images, 2)
    assert crops.shape == (8, 2, 2)
    np.testing.assert_array_equal(crops[:, 0, 0], [1, 11, 21, 31, 101, 111, 121, 131])


# -- the regression -----------------------------------------------------------------------------
def test_readout_recovers_a_linear_feature_and_excludes_nan_rows():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 6))
    values = np.column_stack([x @ rng.normal(size=6) for _ in FEATURES])
    values[:, 1] = rng.normal(size=400)  # unrelated to the embeddings
    values[:37, 4] = np.nan  # e.g. samples with < 2 cells
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


def _regions_and_slices(n_slices: int = 100, per_slice: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Four region cubes sharing the z range, ``per_slice`` quadrants each: (region, z) per row."""
    region = np.repeat(np.arange(4), n_slices * per_slice)
    z = np.tile(np.repeat(np.arange(n_slices), per_slice), 4)
    return region, z


def test_region_only_and_within_region_r2_separate_the_region_from_what_the_embedding_adds():
    rng = np.random.default_rng(4)
    region, z = _regions_and_slices()
    n = len(region)
    signal = rng.normal(size=(n, 5))
    x = np.column_stack([np.eye(4)[region], signal])  # the embedding knows region and signal
    offset = np.array([0.0, 2.0, 4.0, 6.0])[region]  # between-region variance 5
    mixed = offset + signal @ np.array([1.0, 0, 0, 0, 0]) + rng.normal(scale=0.1**0.5, size=n)
    region_only = offset + rng.normal(scale=0.3, size=n)
    values = np.column_stack([mixed, region_only, mixed, mixed, mixed])
    res = linear_readout(x, _table(values, z=z, region=region), folds=5, cv="blocked", gap=2)
    m, r = res["vessel_density"], res["axon_density"]
    # total variance 5 + 1 + 0.1: the region explains 5/6.1, the signal 1/1.1 of what is left
    for key in ("r2", "r2_cv"):
        assert m[key] == pytest.approx(6.0 / 6.1, abs=0.02)
    for key in ("r2_region_only", "r2_region_only_cv"):
        assert m[key] == pytest.approx(5.0 / 6.1, abs=0.03)
    for key in ("r2_within", "r2_within_cv"):
        assert m[key] == pytest.approx(1.0 / 1.1, abs=0.03)
    # a feature that is the region plus noise: pooled R^2 high, all of it the region's, nothing within
    assert r["r2_cv"] > 0.95 and r["r2_region_only_cv"] == pytest.approx(r["r2_cv"], abs=0.01)
    assert r["r2_within_cv"] < 0.01 and r["r2_within"] < 0.03
    flat = metrics_of(res)
    assert flat["test/r2_region_only/vessel_density"] == m["r2_region_only_cv"]
    assert flat["test/r2_within/axon_density"] == r["r2_within_cv"]
    assert flat["r2_within/vessel_density"] == m["r2_within"]
    md, csv = table_text(res, 5, "blocked, gap 2", "t")
    assert "| region-only R² 5-fold CV (blocked, gap 2) |" in md
    row = next(line for line in md.splitlines() if line.startswith("| axon_density |"))
    assert f"| {r['r2_within']:.3f} | {r['r2_within_cv']:.3f} ± {r['r2_within_cv_std']:.3f} |" in row
    assert csv.splitlines()[0].startswith("feature,r2,r2_cv,r2_cv_std,r2_region_only,")


def test_cv_region_means_never_use_the_held_out_rows():
    from sklearn.linear_model import LinearRegression

    rng = np.random.default_rng(5)
    region, z = _regions_and_slices(n_slices=30, per_slice=1)
    x = rng.normal(size=(len(region), 3)) + region[:, None]
    y = x @ np.array([1.0, -1.0, 0.5]) + 3.0 * region + rng.normal(scale=0.1, size=len(region))
    fit, held = blocked_folds(z, 3)[1]
    base = fold_predictions(x, y, region, fit, held, LinearRegression())
    shifted_y = y.copy()
    shifted_y[held[region[held] == 0]] += 100.0  # the held-out level of region 0 moves
    moved = fold_predictions(x, shifted_y, region, fit, held, LinearRegression())
    for kind in ("r2", "r2_region_only", "r2_within"):  # predictions know nothing of held-out answers
        np.testing.assert_allclose(moved[kind][1], base[kind][1])
    zero = region[held] == 0
    np.testing.assert_allclose(moved["r2_within"][0][zero], base["r2_within"][0][zero] + 100.0)
    shifted_x = x.copy()
    shifted_x[held[zero]] += 2.0  # held-out embeddings of region 0 move
    moved = fold_predictions(shifted_x, y, region, fit, held, LinearRegression())
    # centred with the FITTING rows' region mean, the shift reaches the prediction (own-mean centring would erase it)
    assert np.abs(moved["r2_within"][1][zero] - base["r2_within"][1][zero]).min() > 0.5
    np.testing.assert_allclose(moved["r2_within"][1][~zero], base["r2_within"][1][~zero])


def test_blocked_folds_hold_whole_contiguous_slices_balanced_with_a_gap():
    region, z = _regions_and_slices(n_slices=23, per_slice=4)
    z = z + 110
    splits = blocked_folds(z, 5, gap=3)
    held_all = np.concatenate([h for _, h in splits])
    assert sorted(held_all) == list(range(len(z)))  # every row held out exactly once
    sizes = []
    for train, held in splits:
        slices = np.unique(z[held])
        assert slices[-1] - slices[0] + 1 == len(slices)  # one contiguous z run
        assert len(held) == len(slices) * 4 * 4  # whole slices: every region, every quadrant
        assert np.abs(z[train][:, None] - slices[None, :]).min() == 4  # gap 3: nearest training slice 4 away
        assert set(np.unique(region[held])) == {0, 1, 2, 3}
        sizes.append(len(slices))
    assert sorted(sizes) == [4, 4, 5, 5, 5]
    no_gap = blocked_folds(z, 5)
    assert all(len(t) + len(h) == len(z) for t, h in no_gap)


def test_shuffled_folds_overstate_r2_on_near_duplicate_quadrants():
    rng = np.random.default_rng(6)
    region, z = _regions_and_slices(n_slices=60, per_slice=4)
    slice_id = region * 60 + z
    x = rng.normal(size=(240, 40))[slice_id] + rng.normal(scale=0.1, size=(len(z), 40))
    y = rng.normal(size=240)[slice_id]  # a per-slice value the embedding cannot generalise
    values = np.column_stack([y] * len(FEATURES))
    table = _table(values, z=z, region=region)
    blocked = linear_readout(x, table, folds=5, cv="blocked", gap=1)["cell_count"]
    shuffled = linear_readout(x, table, folds=5, cv="shuffled", seed=0)["cell_count"]
    assert blocked["r2_cv"] < 0.0 and shuffled["r2_cv"] > blocked["r2_cv"] + 0.2


# -- the CLI ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def task1_ckpt(tmp_path_factory):
    run = tmp_path_factory.mktemp("task1") / "run"
    proc = run_inproc("train.py", run_dir=run)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return run / "checkpoints" / "last.ckpt"


class RecordingUMAP:
    """Stands in for ``umap.UMAP`` in the default suite: numba compiles UMAP's kernels on the first
    call of every process (~20 s of one core); the real UMAP runs in the slow test below. Records
    how it was built and returns the first two standardised components."""

    calls: list[dict] = []

    def __init__(self, **kwargs):
        self.kwargs = kwargs

    def fit_transform(self, x):
        RecordingUMAP.calls.append({**self.kwargs, "shape": x.shape, "mean": float(x.mean())})
        return np.asarray(x[:, :2], dtype=np.float32)


def test_evaluate_semantic_writes_r2_table_and_umaps(task1_ckpt, tmp_path, monkeypatch):
    import umap

    RecordingUMAP.calls.clear()
    monkeypatch.setattr(umap, "UMAP", RecordingUMAP)
    run = tmp_path / "eval"
    proc = run_inproc(
        "evaluate.py",
        "task=semantic",
        f"ckpt_path={task1_ckpt}",
        SMALL,
        SMALL_GAP,
        "task.alpha=1.0",
        run_dir=run,
        fast=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    metrics = read_metrics(run)
    for f in FEATURES:
        assert -1e6 < metrics[f"r2_cv/{f}"] <= 1.0 and 0.0 <= metrics[f"r2/{f}"] <= 1.0
        assert metrics[f"n/{f}"] + metrics[f"n_nan/{f}"] == 320
        assert {f"test/r2_region_only/{f}", f"test/r2_within/{f}", f"r2_region_only/{f}", f"r2_within/{f}"} <= set(
            metrics
        )
        assert (run / f"umap_{f}.png").stat().st_size > 1000
    # the representation of the checkpoint's encoder: 8 x its width (+debug=fast_resnet: 16)
    dim = 8 * OmegaConf.load(task1_ckpt.parents[1] / "config.yaml").model.width
    assert dim == 128 and np.load(run / "embeddings.npy").shape == (320, dim)
    # one UMAP of the standardised embeddings, seeded by the run's seed, with task.umap_neighbors
    [call] = RecordingUMAP.calls
    assert call["shape"] == (320, dim) and abs(call["mean"]) < 1e-6
    assert (call["n_neighbors"], call["random_state"], call["n_jobs"]) == (15, 1, 1)
    table = (run / "semantic_r2.md").read_text()
    assert "| vessel_density |" in table and "within-region R² 5-fold CV (blocked, gap 1)" in table
    # downsample: null took the checkpoint's Task 1 resolution (4): 64 px tiles, 32 px quadrants
    assert "downsample: 4" in (run / "config.yaml").read_text()


def test_evaluate_semantic_without_a_usable_checkpoint_fails_in_one_line(tmp_path):
    missing = run_inproc(
        "evaluate.py", "task=semantic", f"ckpt_path={tmp_path}/nope.ckpt", fast=False, run_dir=tmp_path / "a"
    )
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines() == [f"error: ckpt_path: no checkpoint file at {tmp_path}/nope.ckpt"]
    none = run_inproc("evaluate.py", "task=semantic", fast=False, run_dir=tmp_path / "b")
    assert none.returncode == 2
    line = none.stderr.strip().splitlines()
    assert len(line) == 1 and line[0].startswith("error: ckpt_path: task=semantic with model=supervised")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.slow
def test_evaluate_semantic_fits_pca_on_quadrants_without_a_checkpoint(tmp_path):
    run = tmp_path / "pca"
    proc = run_inproc(
        "evaluate.py",
        "task=semantic",
        "model=pca",
        "task.downsample=4",
        SMALL,
        SMALL_GAP,
        "task.fit_samples=[{set: A, z: [130, 150]}]",
        "task.umap=false",
        "task.alpha=1.0",
        run_dir=run,
        fast=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    metrics = read_metrics(run)
    assert {f"r2_cv/{f}" for f in FEATURES} <= set(metrics)
    assert np.load(run / "embeddings.npy").shape == (320, 256)  # 256 components of 32x32 quadrants


@pytest.mark.slow  # numba compiles UMAP's kernels on the first call of a process (~20 s)
def test_umap_coordinates_are_seeded_and_keep_two_clusters_apart():
    from mtneuro_lab.analysis.embeddings import umap_coordinates

    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(size=(60, 16)), rng.normal(loc=6.0, size=(60, 16))])
    a, b = umap_coordinates(x, seed=3, n_neighbors=10), umap_coordinates(x, seed=3, n_neighbors=10)
    assert a.shape == (120, 2) and np.array_equal(a, b)
    centre_gap = np.linalg.norm(a[:60].mean(0) - a[60:].mean(0))
    spread = max(a[:60].std(0).max(), a[60:].std(0).max())
    assert centre_gap > 3 * spread
