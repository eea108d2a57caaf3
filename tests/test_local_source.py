"""source=local: every file format, the real ISBI TIFF and gala HDF5 stacks, one-line errors for
bad paths/keys/dtypes/shapes/ranges, and a CLI run on files written to tmp_path."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile
import zarr
from conftest import compose, read_metrics, run_inproc
from PIL import Image

from mtneuro_lab.data.sources import local
from mtneuro_lab.data.sources.local import LocalVolumeSource, natural_key, open_volume
from mtneuro_lab.errors import ConfigError, DataError
from mtneuro_lab.run import build_components

SHAPE = (12, 20, 30)  # (z, y, x)


@pytest.fixture(scope="module")
def volumes() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "image": rng.integers(0, 256, SHAPE, dtype=np.uint8),
        "labels": rng.integers(0, 70000, SHAPE, dtype=np.uint32),
        "labels16": rng.integers(0, 5000, SHAPE, dtype=np.uint16),
    }


def write(fmt: str, directory: Path, image: np.ndarray, labels: np.ndarray) -> dict[str, dict]:
    """Write ``image`` and ``labels`` in ``fmt``; return the ``channels`` config for them."""
    directory.mkdir(parents=True, exist_ok=True)
    if fmt == "npy":
        np.save(directory / "image.npy", image)
        np.save(directory / "labels.npy", labels)
        return {"image": {"path": str(directory / "image.npy")}, "pixel_labels": str(directory / "labels.npy")}
    if fmt == "npz":
        np.savez_compressed(directory / "vol.npz", raw=image, seg=labels)
        return {
            "image": {"path": str(directory / "vol.npz"), "key": "raw"},
            "pixel_labels": {"path": str(directory / "vol.npz"), "key": "seg"},
        }
    if fmt == "tiff":
        tifffile.imwrite(directory / "image.tif", image, compression="zlib")
        tifffile.imwrite(directory / "labels.tiff", labels)
        return {
            "image": {"path": str(directory / "image.tif"), "key": None},
            "pixel_labels": {"path": str(directory / "labels.tiff")},
        }
    if fmt == "hdf5":
        with h5py.File(directory / "vol.h5", "w") as fh:
            fh.create_dataset("volumes/raw", data=image, chunks=(4, 10, 10))
            fh.create_dataset("volumes/labels/neuron_ids", data=labels)
        return {
            "image": {"path": str(directory / "vol.h5"), "key": "volumes/raw"},
            "pixel_labels": {"path": str(directory / "vol.h5"), "key": "volumes/labels/neuron_ids"},
        }
    if fmt == "zarr":
        zarr.save_array(str(directory / "image.zarr"), image)
        group = zarr.open_group(str(directory / "labels.zarr"), mode="w")
        group.create_array("seg", shape=labels.shape, dtype=labels.dtype, chunks=(4, 8, 8))[:] = labels
        return {
            "image": {"path": str(directory / "image.zarr")},
            "pixel_labels": {"path": str(directory / "labels.zarr")},
        }
    if fmt == "png":
        for name, vol in (("image", image), ("labels", labels)):
            (directory / name).mkdir()
            for z, plane in enumerate(vol):  # s1 ... s12: natural order differs from lexical
                Image.fromarray(plane).save(directory / name / f"s{z + 1}.png")
        return {"image": {"path": str(directory / "image")}, "pixel_labels": {"path": str(directory / "labels")}}
    raise ValueError(fmt)


@pytest.mark.parametrize("fmt", ["npy", "npz", "tiff", "hdf5", "zarr", "png"])
def test_every_format_reads_boxes_in_dataset_coordinates(fmt: str, tmp_path: Path, volumes) -> None:
    labels = volumes["labels16"] if fmt == "png" else volumes["labels"]  # PNG holds <= 16 bits
    channels = write(fmt, tmp_path, volumes["image"], labels)
    source = LocalVolumeSource({**channels, "roi_labels": None}, origin=[100, 200, 50])
    assert source.channels == ("image", "pixel_labels")
    assert source.extent == ((100, 130), (200, 220), (50, 62)) and source.z_extent == (50, 62)
    image = source.cutout("image", (105, 125), (203, 211), (52, 61))
    assert image.dtype == np.uint8 and np.array_equal(image, volumes["image"][2:11, 3:11, 5:25])
    got = source.cutout("pixel_labels", (100, 130), (200, 220), (59, 62))
    assert got.dtype == labels.dtype and np.array_equal(got, labels[9:12])


def test_two_dimensional_file_is_one_slice(tmp_path: Path, volumes) -> None:
    np.save(tmp_path / "plane.npy", volumes["image"][0])
    source = LocalVolumeSource({"image": str(tmp_path / "plane.npy")})
    assert source.extent == ((0, 30), (0, 20), (0, 1))
    assert np.array_equal(source.cutout("image", (0, 4), (0, 3), (0, 1))[0], volumes["image"][0, :3, :4])


def test_natural_sort() -> None:
    names = ["s10.png", "s2.png", "S1.png", "s100.png"]
    assert sorted(names, key=natural_key) == ["S1.png", "s2.png", "s10.png", "s100.png"]


def test_construction_reads_headers_only(tmp_path: Path, volumes, monkeypatch) -> None:
    channels = write("hdf5", tmp_path, volumes["image"], volumes["labels"])
    calls = []
    for cls in (local.Hdf5Reader, local.NpyReader, local.TiffReader):
        monkeypatch.setattr(cls, "_read", lambda self, *a: calls.append(self) or np.zeros((1, 1, 1)))
    LocalVolumeSource(channels)
    assert calls == []


# -- the real stacks in ../shared/data -------------------------------------------------------
def test_isbi2012_tiff(shared_data: Path) -> None:
    folder = shared_data / "isbi2012"
    source = LocalVolumeSource(
        {
            "image": str(folder / "train-volume.tif"),
            "pixel_labels": {"path": str(folder / "train-labels.tif"), "key": None},
        }
    )
    assert source.extent == ((0, 512), (0, 512), (0, 30))
    image = source.cutout("image", (100, 228), (0, 64), (28, 30))
    labels = source.cutout("pixel_labels", (0, 512), (0, 512), (0, 30))
    assert image.shape == (2, 64, 128) and labels.shape == (30, 512, 512)
    assert np.array_equal(image, tifffile.imread(folder / "train-volume.tif", key=[28, 29])[:, :64, 100:228])
    assert set(np.unique(labels)) == {0, 255}


def test_gala_fibsem_hdf5(shared_data: Path) -> None:
    folder = shared_data / "gala_fibsem"
    source = LocalVolumeSource(
        {"image": str(folder / "train-image.h5"), "neuron_ids": {"path": str(folder / "train-gt.h5"), "key": "stack"}},
        origin=[0, 0, 1000],
    )
    assert source.extent == ((0, 200), (0, 100), (1000, 1050))
    ids = source.cutout("neuron_ids", (0, 200), (0, 100), (1000, 1050))
    assert ids.dtype == np.int32 and len(np.setdiff1d(np.unique(ids), [0])) == 87
    with h5py.File(folder / "train-image.h5", "r") as fh:
        assert np.array_equal(
            source.cutout("image", (50, 150), (10, 90), (1010, 1020)), fh["stack"][10:20, 10:90, 50:150]
        )


# -- one line per bad input ------------------------------------------------------------------
def _bad_inputs(tmp: Path, volumes) -> list[tuple[dict, dict, str]]:
    image, labels = volumes["image"], volumes["labels"]
    np.save(tmp / "image.npy", image)
    np.save(tmp / "short.npy", image[:5])
    np.save(tmp / "float.npy", labels.astype(np.float32))
    np.save(tmp / "image16.npy", image.astype(np.uint16))
    np.savez(tmp / "vol.npz", raw=image, seg=labels)
    with h5py.File(tmp / "vol.h5", "w") as fh:
        fh["raw"], fh["seg"] = image, labels
    write("zarr", tmp / "z", image, labels)
    (tmp / "notes.txt").write_text("x")
    (tmp / "empty").mkdir()
    ok = {"path": str(tmp / "image.npy")}
    return [
        ({"image": str(tmp / "missing.npy")}, {}, f"source.channels.image: {tmp / 'missing.npy'}: no such file"),
        ({"image": {"path": str(tmp / "vol.h5"), "key": "volume"}}, {}, "no array 'volume'; available keys: raw, seg"),
        ({"image": {"path": str(tmp / "vol.h5")}}, {}, "holds 2 arrays, set key to one of: raw, seg"),
        ({"image": {"path": str(tmp / "vol.npz"), "key": "arr_0"}}, {}, "no array 'arr_0'; available keys: raw, seg"),
        (
            {"image": ok, "pixel_labels": {"path": str(tmp / "z" / "labels.zarr"), "key": "labels"}},
            {},
            "no array 'labels'; available keys: seg",
        ),
        (
            {"image": {"path": str(tmp / "image.npy"), "key": "raw"}},
            {},
            ".npy files hold one array, so key must be null",
        ),
        ({"image": str(tmp / "notes.txt")}, {}, "unsupported file type .txt; supported: .npy, .npz"),
        ({"image": str(tmp / "empty")}, {}, "folder holds no .png/.tif/.tiff slices"),
        (
            {"image": ok, "pixel_labels": str(tmp / "float.npy")},
            {},
            "source.channels.pixel_labels: "
            + str(tmp / "float.npy")
            + " has dtype float32; label channels must hold integers",
        ),
        ({"image": str(tmp / "image16.npy")}, {}, "has dtype uint16, expected uint8"),
        (
            {"image": ok, "pixel_labels": str(tmp / "short.npy")},
            {},
            "pixel_labels (" + str(tmp / "short.npy") + ") has shape (5, 20, 30) but image",
        ),
        (
            {"image": {"path": str(tmp / "image.npy"), "file": "x"}},
            {},
            "source.channels.image: unknown key(s) ['file']; allowed: path, key",
        ),
        ({"image": {"path": None}}, {}, "source.channels: no channel has a path"),
        ({"image": ok}, {"origin": [0, 0]}, "source.origin: expected [x, y, z]"),
        ({"image": ok}, {"origin": [0, -1, 0]}, "source.origin: expected [x, y, z] with non-negative values"),
    ]


def test_bad_inputs_are_one_line_naming_the_file_or_key(tmp_path: Path, volumes) -> None:
    for channels, kwargs, fragment in _bad_inputs(tmp_path, volumes):
        with pytest.raises((ConfigError, DataError)) as err:
            LocalVolumeSource(channels, **kwargs)
        message = str(err.value)
        assert fragment in message and "\n" not in message, (fragment, message)


def test_bad_cutouts_are_one_line(tmp_path: Path, volumes) -> None:
    np.save(tmp_path / "image.npy", volumes["image"])
    source = LocalVolumeSource({"image": str(tmp_path / "image.npy"), "roi_labels": None}, origin=[10, 0, 100])
    with pytest.raises(
        DataError,
        match=r"image cutout x=\[0, 20\] y=\[0, 5\] z=\[100, 101\] lies outside "
        r".*image.npy's box x=\[10, 40\] y=\[0, 20\] z=\[100, 112\]",
    ):
        source.cutout("image", (0, 20), (0, 5), (100, 101))
    with pytest.raises(
        DataError, match=r"channel 'roi_labels' is not configured \(set source.channels.roi_labels.path\)"
    ):
        source.cutout("roi_labels", (10, 20), (0, 5), (100, 101))


def test_open_volume_is_reusable(tmp_path: Path, volumes) -> None:
    write("hdf5", tmp_path, volumes["image"], volumes["labels"])
    reader = open_volume(tmp_path / "vol.h5", "volumes/raw")
    assert reader.shape == SHAPE and reader.dtype == np.uint8
    assert np.array_equal(reader.read((0, 2), (0, 2), (0, 2)), volumes["image"][:2, :2, :2])


# -- CLI ---------------------------------------------------------------------------------------
BOX_SPLITS = tuple(  # two 128x128 boxes of one file labelled cortex / striatum
    f"task.splits.{split}=[{{box: {{x: [0, 128], y: [0, 128]}}, z: [{z0}, {z1}], regions: [cortex]}},"
    f"{{box: {{x: [128, 256], y: [0, 128]}}, z: [{z0}, {z1}], regions: [striatum]}}]"
    for split, z0, z1 in (("train", 0, 30), ("val", 30, 36), ("test", 46, 56))
)


def test_cli_trains_on_local_files(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    image = rng.integers(0, 120, (56, 128, 256), dtype=np.uint8)
    image[:, :, 128:] += 100  # striatum half brighter: learnable, not needed for the contract
    with h5py.File(tmp_path / "cutout.h5", "w") as fh:
        fh["raw"] = image
    run_dir = tmp_path / "run"
    proc = run_inproc(
        "train.py",
        "source=local",
        f"source.channels.image.path={tmp_path / 'cutout.h5'}",
        "source.channels.pixel_labels=null",
        "source.origin=[0,0,0]",
        *BOX_SPLITS,
        run_dir=run_dir,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert "roi_c1/train: 60 samples of 32x32" in log and "roi_c1/test: 20 samples" in log
    assert 0.0 <= read_metrics(run_dir)["test/acc"] <= 1.0

    # same file shifted so the boxes fall outside it: one line at preflight, before any read
    cfg = compose(
        [
            "source=local",
            f"source.channels.image.path={tmp_path / 'cutout.h5'}",
            "source.channels.pixel_labels=null",
            "source.origin=[0,100,0]",
            *BOX_SPLITS,
        ]
    )
    with pytest.raises(ConfigError) as err:
        build_components(cfg)
    assert (
        "task.splits.train: box_x0_y0/cortex x[0, 128] y[0, 128] lies outside the source's box "
        "x[0, 256] y[100, 228]" in str(err.value)
    )
