"""Phantom X-ray source: deterministic, paper class fractions, exact cell counts, safe cache."""

from __future__ import annotations

import cc3d
import numpy as np
import pytest

from mtneuro_lab.data import cache
from mtneuro_lab.data.sources.phantom import PROFILES, generate_cube, seed_key
from mtneuro_lab.data.sources.phantom_source import PhantomXraySource
from mtneuro_lab.errors import ConfigError, DataError

SET_A = {
    "cortex": {"x": [4600, 4856], "y": [900, 1156]},
    "striatum": {"x": [3700, 3956], "y": [500, 756]},
    "vp": {"x": [3063, 3319], "y": [850, 1106]},
    "zi": {"x": [1543, 1799], "y": [650, 906]},
}
# D's cortex shares A's x window but not its y window; "E" repeats A's cortex exactly
CUBES = {
    "A": SET_A,
    "D": {"cortex": {"x": [4600, 4856], "y": [400, 656]}},
    "E": {"cortex": SET_A["cortex"]},
}
SMALL_Z = (100, 140)
TARGET = {  # paper's per-region percentages: background, vessel, cell, axon
    "cortex": (93.1, 2.3, 4.6, 0.0),
    "striatum": (72.6, 2.5, 5.7, 19.2),
    "vp": (22.8, 4.7, 5.7, 66.8),
    "zi": (32.2, 5.4, 9.4, 53.0),
}


def make_source(tmp_path, seed: int = 0, cubes=CUBES, **kwargs) -> PhantomXraySource:
    return PhantomXraySource(cubes, seed=seed, cache_dir=str(tmp_path), z_extent=SMALL_Z, **kwargs)


def box(region: str, set_cubes=SET_A) -> tuple[tuple[int, int], tuple[int, int]]:
    entry = set_cubes[region]
    return tuple(entry["x"]), tuple(entry["y"])


@pytest.fixture(scope="module")
def full_cubes() -> dict[str, dict[str, np.ndarray]]:
    """All four regions of set A, 96 slices high (a quarter of the paper's z 100-480: the
    generator meets its class fractions per cube whatever the height, and 96 slices still hold
    hundreds of cells per region; the full height cost the suite 30 s)."""
    return {
        region: generate_cube(region, seed_key(0, region, *[SET_A[region][k][0] for k in "xy"]), (96, 256, 256))
        for region in PROFILES
    }


@pytest.mark.parametrize("region", list(PROFILES))
def test_class_fractions_match_paper(full_cubes, region):
    labels = full_cubes[region]["pixel_labels"]
    assert labels.dtype == np.uint8
    percent = 100 * np.bincount(labels.ravel(), minlength=4) / labels.size
    assert percent.size == 4
    np.testing.assert_allclose(percent, TARGET[region], atol=1.5)


@pytest.mark.parametrize("region", list(PROFILES))
def test_cell_components_equal_placed_count(full_cubes, region):
    cube = full_cubes[region]
    _, n = cc3d.connected_components(cube["pixel_labels"] == 2, connectivity=26, return_N=True)
    assert n == int(cube["cell_count"]) > 100


def test_image_uses_full_dynamic_range_without_saturating(full_cubes):
    image = full_cubes["vp"]["image"]
    assert image.dtype == np.uint8
    assert image.std() > 10
    assert np.mean((image == 0) | (image == 255)) < 0.01


def test_same_seed_identical_different_seed_differs(tmp_path):
    x, y = box("striatum")
    first = make_source(tmp_path / "a")
    again = make_source(tmp_path / "b")
    other = make_source(tmp_path / "c", seed=1)
    for channel in ("image", "pixel_labels", "roi_labels"):
        np.testing.assert_array_equal(first.cutout(channel, x, y, SMALL_Z), again.cutout(channel, x, y, SMALL_Z))
    assert not np.array_equal(first.cutout("image", x, y, SMALL_Z), other.cutout("image", x, y, SMALL_Z))
    assert first.cell_count("A", "striatum") == again.cell_count("A", "striatum")


def test_cutout_subrange_is_slice_of_full_cube(tmp_path):
    source = make_source(tmp_path)
    x, y = box("zi")
    full = np.asarray(source.cutout("pixel_labels", x, y, SMALL_Z))
    assert full.shape == (40, 256, 256) and full.dtype == np.uint8
    sub = source.cutout("pixel_labels", (x[0] + 10, x[0] + 74), (y[0] + 3, y[0] + 35), (105, 121))
    np.testing.assert_array_equal(sub, full[5:21, 3:35, 10:74])
    roi = source.cutout("roi_labels", (x[0], x[0] + 8), (y[0], y[0] + 8), (100, 102))
    assert roi.dtype == np.uint8 and np.all(roi == 4)


def test_cubes_shared_between_sets_are_generated_once(tmp_path):
    source = make_source(tmp_path)
    x_d, y_d = box("cortex", CUBES["D"])
    a = source.cutout("image", *box("cortex"), SMALL_Z)
    d = source.cutout("image", x_d, y_d, SMALL_Z)
    assert not np.array_equal(a, d)
    dirs = sorted(p.name for p in source.root.iterdir())
    assert dirs == ["cortex_x4600_y400_z100-140", "cortex_x4600_y900_z100-140"]
    assert source.cell_count("E", "cortex") == source.cell_count("A", "cortex")


@pytest.mark.parametrize(
    "x, y, z",
    [
        ((0, 16), (0, 16), (100, 110)),  # nowhere near a cube
        ((4850, 4870), (900, 910), (100, 110)),  # straddles the cortex cube's x edge
        ((4600, 4610), (900, 910), (130, 150)),  # beyond the z extent
    ],
)
def test_cutout_outside_known_cubes_names_the_range(tmp_path, x, y, z):
    source = make_source(tmp_path)
    with pytest.raises(DataError, match=rf"image cutout x=\[{x[0]}, {x[1]}\] y=\[{y[0]}, {y[1]}\]"):
        source.cutout("image", x, y, z)


def test_unknown_channel_raises(tmp_path):
    with pytest.raises(DataError, match="'membranes'"):
        make_source(tmp_path).cutout("membranes", *box("vp"), SMALL_Z)


def test_second_instance_reads_cache_without_regenerating(tmp_path, monkeypatch):
    x, y = box("vp")
    expected = np.array(make_source(tmp_path).cutout("image", x, y, SMALL_Z))
    count = make_source(tmp_path).cell_count("A", "vp")

    def fail(*args, **kwargs):
        raise AssertionError("cube regenerated although cached")

    monkeypatch.setattr(PhantomXraySource, "_generate", fail)
    source = make_source(tmp_path)
    np.testing.assert_array_equal(source.cutout("image", x, y, SMALL_Z), expected)
    assert source.cell_count("A", "vp") == count
    assert not list(tmp_path.rglob(".tmp-*"))


def test_corrupt_cache_entry_is_detected(tmp_path, monkeypatch):
    x, y = box("cortex")
    make_source(tmp_path).cutout("image", x, y, SMALL_Z)
    path = next(tmp_path.rglob("cortex_x4600_y900_*/image.npy"))
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    monkeypatch.setattr(cache, "_VERIFIED", set())  # a fresh process would verify again
    with pytest.raises(DataError, match="corrupt"):
        make_source(tmp_path).cutout("image", x, y, SMALL_Z)


def test_changed_roi_ids_rewrite_roi_labels(tmp_path):
    x, y = box("striatum")
    make_source(tmp_path).cutout("roi_labels", x, y, SMALL_Z)
    ids = {"cortex": 11, "striatum": 12, "vp": 13, "zi": 14}
    roi = make_source(tmp_path, roi_ids=ids).cutout("roi_labels", x, y, SMALL_Z)
    assert np.all(roi == 12)


def test_accepts_omegaconf_cubes(tmp_path):
    omegaconf = pytest.importorskip("omegaconf")
    cfg = omegaconf.OmegaConf.create({"cubes": {"A": SET_A}, "z": list(SMALL_Z)})
    source = PhantomXraySource(cfg.cubes, cache_dir=str(tmp_path), z_extent=cfg.z)
    assert source.cutout("pixel_labels", *box("cortex"), (100, 101)).shape == (1, 256, 256)


@pytest.mark.parametrize(
    "cubes, kwargs, message",
    [
        ({"A": {"thalamus": {"x": [0, 256], "y": [0, 256]}}}, {}, "thalamus"),
        ({"A": {"zi": {"x": [300, 256], "y": [0, 256]}}}, {}, r"A\.zi\.x"),
        ({"A": {"zi": {"x": [0, 256]}}}, {}, r"A\.zi"),
        (CUBES, {"downsample_cache": True}, "downsample_cache"),
    ],
)
def test_bad_config_raises_config_error(tmp_path, cubes, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        make_source(tmp_path, cubes=cubes, **kwargs)
