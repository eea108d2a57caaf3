"""Task 3 semantic features: hand-made volumes with known answers, real masks, phantom counts."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.distance import cdist

from mtneuro_lab.data.features import (
    BOSSDB,
    FEATURES,
    PRASAD2020_MASKS,
    cube_features,
    cubes_features,
    label_cells,
    label_cells_per_slice,
)
from mtneuro_lab.errors import DataError

V, C, A = BOSSDB.vessel, BOSSDB.cell, BOSSDB.axon
COL = {name: j for j, name in enumerate(FEATURES)}
ROOT = Path(__file__).resolve().parent.parent


def blank(z: int = 1, size: int = 16) -> np.ndarray:
    return np.zeros((z, size, size), dtype=np.uint8)


def test_two_cells_at_a_known_distance_give_that_distance():
    vol = blank()
    vol[0, 2:4, 2:4] = C  # centroid (2.5, 2.5)
    vol[0, 2:4, 8:10] = C  # centroid (2.5, 8.5): 6 px away
    f = cube_features(vol, grid=1)[0]
    assert f[COL["cell_count"]] == 2
    assert f[COL["cell_size"]] == 4
    assert f[COL["nn_distance"]] == pytest.approx(6.0)  # a self-distance of 0 would give 3


def test_nearest_neighbour_is_never_the_cell_itself():
    vol = blank(size=20)
    for x in (0, 3, 8):  # single pixels on a line: neighbour distances 3, 3, 5
        vol[0, 5, x] = C
    f = cube_features(vol, grid=1)[0]
    assert f[COL["nn_distance"]] == pytest.approx((3 + 3 + 5) / 3)


def test_one_cell_has_no_distance_and_no_cell_has_no_size():
    one = blank()
    one[0, 5:8, 5:7] = C
    f = cube_features(one, grid=1)[0]
    assert f[COL["cell_count"]] == 1 and f[COL["cell_size"]] == 6
    assert np.isnan(f[COL["nn_distance"]])
    empty = cube_features(blank(), grid=1)[0]
    assert empty[COL["cell_count"]] == 0
    assert np.isnan(empty[COL["cell_size"]]) and np.isnan(empty[COL["nn_distance"]])


def test_densities_per_quadrant():
    vol = blank(size=8)  # quadrants of 4x4 = 16 px
    vol[0, 0:2, 0:4] = V  # TL: 8 vessel px
    vol[0, 0:1, 4:8] = A  # TR: 4 axon px
    vol[0, 4:8, 4:8] = A  # BR: all axon
    f = cube_features(vol, grid=2)
    np.testing.assert_allclose(f[:, COL["vessel_density"]], [0.5, 0, 0, 0])
    np.testing.assert_allclose(f[:, COL["axon_density"]], [0, 0.25, 0, 1.0])


def test_cell_split_across_two_quadrants_counts_in_both_with_its_part():
    vol = blank(size=16)  # quadrants of 8x8
    vol[0, 2:4, 5:11] = C  # 3 columns left of x=8, 3 right
    vol[0, 12, 12] = C  # a second cell in BR
    f = cube_features(vol, grid=2)
    np.testing.assert_array_equal(f[:, COL["cell_count"]], [1, 1, 0, 1])
    np.testing.assert_allclose(f[:, COL["cell_size"]], [6, 6, np.nan, 1])
    assert np.isnan(f[:, COL["nn_distance"]]).all()  # no quadrant has two cells
    whole = cube_features(vol, grid=1)[0]
    assert whole[COL["cell_count"]] == 2 and whole[COL["cell_size"]] == pytest.approx(6.5)


def test_cell_in_two_pieces_within_a_slice_is_one_3d_cell():
    vol = blank(z=2)
    vol[0, 2:4, 2:4] = C
    vol[0, 2:4, 8:10] = C
    vol[1, 2:4, 2:10] = C  # joins the two pieces one slice up
    f = cube_features(vol, grid=1)
    assert f[0, COL["cell_count"]] == 1 and f[0, COL["cell_size"]] == 8
    assert np.isnan(f[0, COL["nn_distance"]])
    assert label_cells(vol).max() == 1
    assert label_cells_per_slice(vol).max() == 3


def test_cells_of_two_regions_are_never_merged():
    a, b = blank(z=3), blank(z=3)
    a[:, 4:8, 4:8] = C
    a[0, 12, 12] = C
    b[:, 4:8, 4:8] = C  # would continue a's first cell if the cubes were stacked
    b[2, 12, 2] = C
    for centroid in ("2d", "3d"):
        table = cubes_features(
            {"A/cortex": a, "A/zi": b},
            grid=1,
            centroid=centroid,
            z0={"A/cortex": 110, "A/zi": 110},
            regions={"A/cortex": 0, "A/zi": 3},
        )
        np.testing.assert_array_equal(
            table.values, np.vstack([cube_features(a, 1, centroid=centroid), cube_features(b, 1, centroid=centroid)])
        )
        assert list(table.cube) == ["A/cortex"] * 3 + ["A/zi"] * 3
        assert list(table.z) == [110, 111, 112] * 2 and list(table.region) == [0] * 3 + [3] * 3
    # the test can fail: labelled as one stack, the 3D centroids of the joined cell move
    stacked = cube_features(np.concatenate([a, b]), 1, centroid="3d")
    separate = np.vstack([cube_features(a, 1, centroid="3d"), cube_features(b, 1, centroid="3d")])
    assert not np.allclose(stacked[:, COL["nn_distance"]], separate[:, COL["nn_distance"]], equal_nan=True)


def test_3d_centroids_use_the_whole_cell():
    vol = blank(z=5, size=20)
    vol[0:5, 2, 2] = C  # a column: 3D centroid z = 2
    vol[4, 2, 10] = C  # a single voxel at z = 4
    f = cube_features(vol, grid=1, centroid="3d")
    assert f[4, COL["nn_distance"]] == pytest.approx(np.hypot(2, 8))
    assert cube_features(vol, grid=1)[4, COL["nn_distance"]] == pytest.approx(8.0)


def test_bad_inputs_raise_one_line_errors():
    with pytest.raises(DataError, match="grid"):
        cube_features(blank(size=15), grid=2)
    with pytest.raises(DataError, match="centroid"):
        cube_features(blank(), centroid="4d")  # type: ignore[arg-type]
    with pytest.raises(DataError, match="connectivity"):
        label_cells(blank(), connectivity=8)  # type: ignore[arg-type]


# -- real manual masks (older encoding: 1 axon, 2 vessel, 3 cell; 32 non-adjacent slices) ------
def _independent(cells: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The same features for one sample with scipy.ndimage + numpy only.

    ``cells`` are the cell ids of the sample's crop, labelled on the whole slice (a cell that
    leaves the quadrant and comes back is still one cell); ``mask`` is the crop's labels.
    """
    ids = np.unique(cells[cells > 0])
    row = [np.mean(mask == 2), np.mean(mask == 1), len(ids), np.nan, np.nan]
    if len(ids):
        row[3] = np.mean([np.sum(cells == i) for i in ids])
    if len(ids) >= 2:
        centres = np.array(ndimage.center_of_mass(np.ones_like(cells), cells, ids))
        d = cdist(centres, centres)
        np.fill_diagonal(d, np.inf)
        row[4] = d.min(axis=1).mean()
    return np.array(row, dtype=float)


@pytest.mark.parametrize("region", ["ctx", "str", "trn", "zi"])
def test_real_masks_agree_with_an_independent_computation(shared_data, region):
    mask = np.load(shared_data / "prasad2020_sparse_masks" / f"masks_{region}.npz")["arr_0"]
    cells = label_cells_per_slice(mask, PRASAD2020_MASKS)
    ours = cube_features(mask, grid=2, encoding=PRASAD2020_MASKS, cells=cells)
    h = mask.shape[1] // 2
    expected = []
    for z in range(mask.shape[0]):
        slice_cells, _ = ndimage.label(mask[z] == 3)  # 4-connectivity, this slice only
        for qy in range(2):
            for qx in range(2):
                crop = np.s_[qy * h : (qy + 1) * h, qx * h : (qx + 1) * h]
                expected.append(_independent(slice_cells[crop], mask[z][crop]))
    np.testing.assert_allclose(ours, np.array(expected), rtol=1e-9, atol=1e-12, equal_nan=True)
    # totals match the README's class counts under the older encoding
    total_vessel = (ours[:, COL["vessel_density"]] * h * h).sum()
    assert total_vessel == pytest.approx(np.sum(mask == 2))
    assert np.nansum(ours[:, COL["cell_count"]] * ours[:, COL["cell_size"]]) == pytest.approx(np.sum(mask == 3))


# -- phantom: 3D components of a full cube = cells the generator placed -------------------------
def test_phantom_cell_counts_match_the_generator():
    from conftest import compose

    from mtneuro_lab.data.sources.phantom_source import PhantomXraySource

    cfg = compose()
    sets = {"A": {k: dict(v) for k, v in cfg.cubes.sets.A.items()}}
    cache_dir = os.environ.get("MTNEURO_CACHE", str(ROOT / ".cache"))
    source = PhantomXraySource(cubes=sets, cache_dir=cache_dir)
    for region, box in sets["A"].items():
        labels = np.asarray(source.cutout("pixel_labels", tuple(box["x"]), tuple(box["y"]), source.z))
        expected = source.cell_count("A", region)
        assert expected > 100
        assert label_cells(labels, connectivity=6).max() == expected, region
        assert label_cells(labels, connectivity=26).max() == expected, region
