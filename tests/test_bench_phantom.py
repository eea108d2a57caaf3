"""benchmarks/bench_phantom.py: how well composition alone names the region, on tiny label cubes
whose regions differ only in cell size (separable) or not at all (a constant guess)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import bench_phantom  # noqa: E402


def _cells(shape: tuple[int, int, int], side: int, value: int) -> np.ndarray:
    """Square cells of ``side`` px on a 16-px grid, the same in every slice."""
    labels = np.zeros(shape, dtype=np.uint8)
    for y in range(2, shape[1], 16):
        for x in range(2, shape[2], 16):
            labels[:, y : y + side, x : x + side] = value
    return labels


def _cubes_and_masks(tmp_path: Path, sides: list[int]) -> tuple[dict, Path]:
    """Phantom sets A, C, D (BossDB labels: 2 = cell) and masks files (their encoding: 3 = cell)."""
    cubes = {
        s: {
            r: {"pixel_labels": _cells((64, 64, 64), side, 2)}
            for r, side in zip(bench_phantom.REGIONS, sides, strict=True)
        }
        for s in "ACD"
    }
    for region, side in zip(bench_phantom.REGIONS, sides, strict=True):
        np.savez(tmp_path / f"masks_{bench_phantom.REAL_FILE[region]}.npz", _cells((8, 32, 32), side, 3))
    return cubes, tmp_path


@pytest.fixture(autouse=True)
def _small_tiles(monkeypatch: pytest.MonkeyPatch) -> None:
    # 64x64 slices: phantom tiles of 16/32/64 px, masks tiles of 16/32 px; one gap slice
    monkeypatch.setattr(bench_phantom, "COMPOSITION_GAP", 1)


def test_regions_that_differ_in_cell_size_are_named_everywhere(tmp_path: Path) -> None:
    cubes, masks = _cubes_and_masks(tmp_path, [3, 5, 7, 9])
    markdown, figures = bench_phantom.composition_separability(cubes, masks)
    composition = figures["64/vessel density, cell count, cell size"]
    assert composition == {"masks": 1.0, "v2_A": 1.0, "v2_A_to_CD": 1.0}
    assert figures["256/vessel density, cell count, cell size"]["masks"] is None  # larger than the masks' slices
    assert figures["64/the same + axon density"]["masks"] is None  # zi axons not annotated
    assert "| 256x256 | vessel density, cell count, cell size | larger than the masks' slices |" in markdown


def test_identical_regions_are_named_at_chance(tmp_path: Path) -> None:
    cubes, masks = _cubes_and_masks(tmp_path, [5, 5, 5, 5])
    _, figures = bench_phantom.composition_separability(cubes, masks)
    for scale in ("64", "128"):
        row = figures[f"{scale}/vessel density, cell count, cell size"]
        assert row == {"masks": 0.25, "v2_A": 0.25, "v2_A_to_CD": 0.25}
