"""``source=local`` files that are broken or unusual: one line naming the file (or the config
key) for every reader, a TIFF whose single page holds the whole stack, and slice folders of
colour or mismatched images."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
import zarr
from conftest import one_line_error
from PIL import Image

from mtneuro_lab.data.sources.local import LocalVolumeSource, open_volume

STACK = np.arange(4 * 6 * 8, dtype=np.uint8).reshape(4, 6, 8)


def test_unreadable_files_name_the_file_and_the_format(tmp_path: Path) -> None:
    np.save(tmp_path / "four_d.npy", np.zeros((2, 2, 2, 2), np.uint8))
    assert one_line_error(open_volume, tmp_path / "four_d.npy") == (
        f"{tmp_path / 'four_d.npy'}: expected a (z, y, x) volume or a 2D image, got shape (2, 2, 2, 2)"
    )
    for name in ("bad.npy", "bad.npz", "bad.tif", "bad.h5"):
        (tmp_path / name).write_bytes(b"definitely not an array")
    assert one_line_error(open_volume, tmp_path / "bad.npy").startswith(
        f"{tmp_path / 'bad.npy'}: not a readable .npy array ("
    )
    assert one_line_error(open_volume, tmp_path / "bad.npz") == f"{tmp_path / 'bad.npz'}: not a valid .npz archive"
    assert one_line_error(open_volume, tmp_path / "bad.tif").startswith(
        f"{tmp_path / 'bad.tif'}: not a readable TIFF ("
    )
    assert one_line_error(open_volume, tmp_path / "bad.h5").startswith(
        f"{tmp_path / 'bad.h5'}: not a readable HDF5 file ("
    )
    store = tmp_path / "bad.zarr"
    store.mkdir()
    (store / "zarr.json").write_text("{ not json")
    assert one_line_error(open_volume, store).startswith(f"{store}: not a readable zarr store (")


def test_a_single_zarr_array_or_a_slice_folder_takes_no_key(tmp_path: Path) -> None:
    array = zarr.open(str(tmp_path / "one.zarr"), mode="w", shape=STACK.shape, dtype=STACK.dtype)
    array[:] = STACK
    assert one_line_error(open_volume, tmp_path / "one.zarr", "raw") == (
        f"{tmp_path / 'one.zarr'}: is a single zarr array, so key must be null (got 'raw')"
    )
    np.testing.assert_array_equal(open_volume(tmp_path / "one.zarr").read((1, 3), (0, 6), (2, 5)), STACK[1:3, :, 2:5])
    folder = tmp_path / "slices"
    folder.mkdir()
    Image.fromarray(STACK[0]).save(folder / "s0.png")
    assert one_line_error(open_volume, folder, "raw") == (
        f"{folder}: a folder of slices has no keys, so key must be null (got 'raw')"
    )


def test_a_tiff_page_holding_the_whole_stack_is_read_once(tmp_path: Path) -> None:
    path = tmp_path / "planar.tif"
    tifffile.imwrite(path, STACK, photometric="minisblack", planarconfig="separate")
    with tifffile.TiffFile(path) as tif:
        assert len(tif.series[0].pages) == 1  # the layout under test: one page, 4 planes
    reader = open_volume(path)
    assert reader.shape == (4, 6, 8) and reader.dtype == np.uint8
    np.testing.assert_array_equal(reader.read((1, 4), (2, 5), (0, 3)), STACK[1:4, 2:5, 0:3])
    np.testing.assert_array_equal(reader.read((0, 1), (0, 6), (0, 8)), STACK[:1])


def test_slice_folders_must_hold_grayscale_slices_of_one_shape(tmp_path: Path) -> None:
    colour = tmp_path / "colour"
    colour.mkdir()
    Image.fromarray(np.zeros((6, 8, 3), np.uint8)).save(colour / "s0.png")
    assert one_line_error(open_volume, colour) == f"{colour / 's0.png'}: image mode RGB is not single-channel grayscale"
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    Image.fromarray(STACK[0]).save(mixed / "s1.png")
    Image.fromarray(STACK[1]).save(mixed / "s2.png")
    Image.fromarray(np.zeros((5, 8), np.uint8)).save(mixed / "s10.png")
    reader = open_volume(mixed)
    np.testing.assert_array_equal(reader.read((0, 2), (0, 6), (0, 8)), STACK[:2])
    assert one_line_error(reader.read, (1, 3), (0, 5), (0, 8)) == (
        f"{mixed / 's10.png'}: slice shape (5, 8) differs from s1.png's (6, 8)"
    )


@pytest.mark.parametrize(
    ("channels", "origin", "message"),
    [
        ({}, (0, 0, 0), "source.channels: expected a mapping of channel name -> {path, key}, got {}"),
        ([1], (0, 0, 0), "source.channels: expected a mapping of channel name -> {path, key}, got [1]"),
        ({"image": "x.npy"}, ("a", 0, 0), "source.origin: expected [x, y, z] integers, got ('a', 0, 0)"),
        ({"image": "x.npy"}, 5, "source.origin: expected [x, y, z] integers, got 5"),
        ({"image": 5}, (0, 0, 0), "source.channels.image: expected null, a path, or {path: ..., key: ...}, got 5"),
        (
            {"image": {"path": "x.h5", "key": 3}},
            (0, 0, 0),
            "source.channels.image.key: expected a string or null, got 3",
        ),
        ({"image": {"path": 3}}, (0, 0, 0), "source.channels.image.path: expected a file or folder path, got 3"),
    ],
)
def test_bad_config_values_name_their_key(channels: Any, origin: Any, message: str) -> None:
    assert one_line_error(LocalVolumeSource, channels, origin=origin) == message
