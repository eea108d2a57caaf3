"""Every MTNeuro Task 1 split: counts per split (hand-computed), leak checks, box entries,
roi_majority labels, downsampling; the CLI runs task=roi_c2 / roi_c3 end to end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import compose, read_metrics, run_inproc
from hydra.utils import instantiate
from omegaconf import OmegaConf

from mtneuro_lab.data.cubes import catalog_from_config
from mtneuro_lab.data.datamodules import VolumeDataModule
from mtneuro_lab.data.sources.base import VolumeSource
from mtneuro_lab.data.tasks import RegionClassificationTask, describe_counts
from mtneuro_lab.errors import ConfigError

REGIONS = ("cortex", "striatum", "vp", "zi")
SPLITS_ = ("train", "val", "test")


class FakeSource(VolumeSource):
    """In-memory source: image value encodes the z slice; roi_labels from a callback."""

    def __init__(self, roi=None, extent=None) -> None:
        self.roi = roi  # roi(x, y, z) -> (z, y, x) array, or None for "every voxel is its cube's id"
        self.requests: list[tuple[str, tuple, tuple, tuple]] = []
        if extent is not None:
            self.extent = extent

    def cutout(self, channel, x, y, z):
        self.requests.append((channel, tuple(x), tuple(y), tuple(z)))
        shape = (z[1] - z[0], y[1] - y[0], x[1] - x[0])
        if channel == "roi_labels":
            return self.roi(x, y, z)
        planes = (np.arange(z[0], z[1]) % 256).astype(np.uint8)
        return np.broadcast_to(planes[:, None, None], shape)


def make_task(name: str, *overrides: str) -> RegionClassificationTask:
    cfg = compose([f"task={name}", *overrides])
    task = instantiate(cfg.task, _convert_="all")
    return task.bind(catalog_from_config(cfg.cubes))


def per_region(task, arrays) -> dict[str, int]:
    return {r: int((arrays.regions == i).sum()) for i, r in enumerate(task.catalog.regions)}


# hand-computed: 4 regions per cube set; A train z[110,380) = 270, val [380,410) = 30,
# test [420,470) = 50; "all 360 slices" = z[110,470); ROI-C3 train = A's 270 + B's 360 per region
EXPECTED = {
    "roi_c1": {"train": 4 * 270, "val": 4 * 30, "test": 4 * 50},
    "roi_c2": {"train": 4 * 270, "val": 4 * 30, "test": 2 * 4 * 360},
    "roi_c3": {"train": 4 * (270 + 360), "val": 4 * 30, "test": 2 * 4 * 360},
}
SETS = {
    "roi_c1": {"train": {"A"}, "val": {"A"}, "test": {"A"}},
    "roi_c2": {"train": {"A"}, "val": {"A"}, "test": {"C", "D"}},
    "roi_c3": {"train": {"A", "B"}, "val": {"A"}, "test": {"C", "D"}},
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_counts_per_split_match_hand_computed(name: str) -> None:
    task = make_task(name, "task.downsample=4")
    source = FakeSource()
    arrays = {split: task.build(split, source) for split in ("train", "val", "test")}
    for split, expected in EXPECTED[name].items():
        arr = arrays[split]
        assert len(arr) == expected, (name, split)
        assert per_region(task, arr) == {r: expected // 4 for r in REGIONS}
        assert {key.split("/")[0] for key in arr.cubes} == SETS[name][split]
        assert arr.images.dtype == np.uint8 and arr.images.shape[1:] == (64, 64)
        assert np.array_equal(arr.targets, arr.regions)  # label_mode=cube
        # every tile's z is inside its split's range, and the image holds that slice
        assert np.array_equal(arr.images[:, 0, 0], (arr.z % 256).astype(np.uint8))
    summary = describe_counts(task, arrays)
    for split, expected in EXPECTED[name].items():
        assert f"{name}/{split}: {expected} samples of 64x64" in summary


def test_roi_c2_and_c3_reuse_roi_c1_train_and_val() -> None:
    c1, c2, c3 = (make_task(n) for n in ("roi_c1", "roi_c2", "roi_c3"))
    assert c2.splits["train"] == c1.splits["train"] and c2.splits["val"] == c1.splits["val"]
    assert c3.splits["val"] == c1.splits["val"] and c3.splits["test"] == c2.splits["test"]
    assert c3.splits["train"][0] == c1.splits["train"][0]
    assert [(p.set_name, p.z) for p in c3.splits["train"][1:]] == [("B", (110, 470))]


@pytest.mark.parametrize(
    "override,fragment",
    [
        ("task.splits.val=[{set: A, z: [370, 410]}]", "train z[110, 380] and val z[370, 410] overlap in cube cortex"),
        ("task.splits.test=[{set: A, z: [415, 470]}]", "val z[380, 410] and test z[415, 470] are only 5 slices apart"),
        ("task.splits.test=[{set: A, z: [390, 470], regions: [zi]}]", "overlap in cube zi x1543 y650"),
    ],
)
def test_leaks_are_one_line_naming_the_key(override: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        make_task("roi_c1", override)
    message = str(err.value)
    assert message.startswith("task.splits:") and fragment in message and "\n" not in message


def test_buffer_applies_only_to_the_same_physical_cube() -> None:
    # D's cortex shares A's cortex x window but not its y window: a different cube, no buffer
    task = make_task(
        "roi_c1",
        "task.splits.train=[{set: A, z: [110, 470], regions: [cortex]}]",
        "task.splits.val=[{set: D, z: [110, 470], regions: [cortex]}]",
        "task.splits.test=[{set: C, z: [110, 470]}]",
    )
    assert [len(task._slabs(s)) for s in ("train", "val", "test")] == [1, 1, 4]
    # a box intersecting A's cortex window is the same tissue
    with pytest.raises(ConfigError, match=r"overlapping box_x4700_y1000/cortex"):
        make_task("roi_c1", "task.splits.test=[{box: {x: [4700, 4956], y: [1000, 1256]}, z: [300, 350]}]")


def test_box_entries_address_plain_files() -> None:
    splits = (
        (
            "task.splits.train=[{box: {x: [0, 64], y: [0, 64]}, z: [0, 20], regions: [vp]},"
            "{box: {x: [64, 128], y: [0, 64]}, z: [0, 20]}]"
        ),
        "task.splits.val=[{box: {x: [0, 64], y: [0, 64]}, z: [20, 25], regions: [vp]}]",
        "task.splits.test=[{box: {x: [0, 64], y: [64, 128]}, z: [0, 30], regions: [zi]}]",
    )
    task = make_task("roi_c1", "task.downsample=1", *splits)
    assert task.sample_shape() == (64, 64)
    train = task.build("train", FakeSource())
    assert len(train) == 40 and per_region(task, train) == {"cortex": 20, "striatum": 0, "vp": 20, "zi": 0}
    # the source's box is checked before anything is read
    small = FakeSource(extent=((0, 128), (0, 100), (0, 50)))
    with pytest.raises(ConfigError, match=r"task.splits.test: box_x0_y64/zi x\[0, 64\] y\[64, 128\] lies outside"):
        task.check_source(small)
    assert small.requests == []
    task.check_source(FakeSource(extent=((0, 128), (0, 128), (0, 30))))
    with pytest.raises(ConfigError, match=r"lies outside the source's z range \[0, 20\]"):
        task.check_source(FakeSource(extent=((0, 128), (0, 128), (0, 20))))


@pytest.mark.parametrize(
    "override,fragment",
    [
        (
            "task.splits.train=[{box: {x: [0, 64]}, z: [0, 9]}]",
            "task.splits.train[0].box: expected {x: [x0, x1], y: [y0, y1]}",
        ),
        (
            "task.splits.train=[{box: {x: [0, 64], y: [9, 3]}, z: [0, 9]}]",
            "task.splits.train[0].box.y: expected [start, stop)",
        ),
        (
            "task.splits.train=[{box: {x: [0, 64], y: [0, 64]}, z: [0, 9], regions: [cortex, zi]}]",
            "task.splits.train[0].regions: a box entry takes one region",
        ),
        (
            "task.splits.train=[{set: A, box: {x: [0, 64], y: [0, 64]}, z: [0, 9]}]",
            "task.splits.train[0]: needs 'z' and exactly one of 'set'",
        ),
        ("task.splits.train=[{box: {x: [0, 64], y: [0, 64]}, z: [0, 9]}]", "tiles must share one in-plane shape"),
    ],
)
def test_bad_box_entries_are_one_line(override: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        make_task("roi_c1", override)
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_roi_majority_drops_unlabelled_tiles() -> None:
    cfg = compose(["task=roi_c1"])
    catalog = catalog_from_config(cfg.cubes)
    ids = dict(catalog.roi_ids)

    def roi(x, y, z):
        """Per slice: z%5==0 unlabelled everywhere; z%5==1 mostly striatum; z%5==2 40% unlabelled
        (majority still the cube's own region); else the cube's own region."""
        own = next(ids[c.region] for c in catalog.sets["A"].values() if tuple(c.x) == tuple(x))
        out = np.full((z[1] - z[0], y[1] - y[0], x[1] - x[0]), own, dtype=np.uint8)
        for i, zz in enumerate(range(*z)):
            if zz % 5 == 0:
                out[i] = 0
            elif zz % 5 == 1:
                out[i, : int(0.6 * out.shape[1])] = ids["striatum"]
            elif zz % 5 == 2:
                out[i, : int(0.4 * out.shape[1])] = 0
        return out

    task = make_task("roi_c1", "task.label_mode=roi_majority", "task.downsample=4")
    arr = task.build("train", FakeSource(roi=roi))
    z = np.arange(110, 380)
    assert len(arr) == 4 * int((z % 5 != 0).sum())  # 4 x 216: unlabelled tiles dropped, not cortex
    assert not np.isin(arr.z % 5, [0]).any()
    striatum = catalog.region_index("striatum")
    assert (arr.targets[arr.z % 5 == 1] == striatum).all()
    other = arr.z % 5 != 1
    assert np.array_equal(arr.targets[other], arr.regions[other])
    cube_mode = make_task("roi_c1", "task.downsample=4").build("train", FakeSource(roi=roi))
    assert len(cube_mode) == 4 * 270


@pytest.mark.parametrize("downsample,side", [(1, 256), (2, 128), (4, 64)])
def test_downsample_shapes(downsample: int, side: int) -> None:
    task = make_task("roi_c1", f"task.downsample={downsample}", "task.splits.train=[{set: A, z: [110, 114]}]")
    arr = task.build("train", FakeSource())
    assert task.sample_shape() == (side, side) and arr.images.shape == (16, side, side)


def test_datamodule_train_stats_match_numpy() -> None:
    task = make_task("roi_c1", "task.downsample=4")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(1000, 16, 16), dtype=np.uint8)
    mean, std = VolumeDataModule.train_stats(images)
    sample = images[::3].astype(np.float64) / 255.0
    assert mean == pytest.approx(sample.mean(), rel=1e-9) and std == pytest.approx(sample.std(), rel=1e-6)
    assert task.num_classes == 4


# -- touching windows (contacts) and task.guard_px --------------------------------------------
def contact_rows(task) -> set[tuple]:
    return {(c.split, c.eval_cube.key, c.train_cube.key, c.kind, c.side, c.length_px, c.z) for c in task.contacts}


# from mtneuro_lab/conf/cubes/paper.yaml by hand: D/zi x[1799, 2055) starts where A/zi x[1543, 1799) ends (same y);
# D/striatum y[244, 500) ends where A/striatum y[500, 756) starts, x overlap [3800, 3956) = 156 px;
# C/zi x[1031, 1287) ends where B/zi x[1287, 1543) starts (same y); D/vp x[2295, 2551) ends where
# B/vp starts, y overlap [850, 950) = 100 px; C/cortex's corner (5312, 644) is B/cortex's corner;
# A/zi's corner (1543, 906) is B/zi's. Shared z: A train [110, 380), B train [110, 470), A val [380, 410).
ROI_C2_CONTACTS = {
    ("test", "D/striatum", "A/striatum", "face", "y+", 156, (110, 380)),
    ("test", "D/zi", "A/zi", "face", "x-", 256, (110, 380)),
}
ROI_C3_CONTACTS = ROI_C2_CONTACTS | {
    ("test", "C/zi", "B/zi", "face", "x+", 256, (110, 470)),
    ("test", "D/vp", "B/vp", "face", "x+", 100, (110, 470)),
    ("test", "C/cortex", "B/cortex", "edge", "x+/y-", 0, (110, 470)),
    ("val", "A/zi", "B/zi", "edge", "x-/y+", 0, (380, 410)),
}


def test_paper_cubes_name_their_contacts(caplog) -> None:
    assert make_task("roi_c1").contacts == ()
    assert contact_rows(make_task("roi_c2")) == ROI_C2_CONTACTS
    task = make_task("roi_c3")
    assert contact_rows(task) == ROI_C3_CONTACTS
    with caplog.at_level("WARNING", logger="mtneuro_lab.data.tasks"):
        task.log_contacts()
    lines = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(lines) == 6
    assert "roi_c3: test cube D/zi touches training cube A/zi along its x- face (256 px, z[110, 380))" in lines
    assert "roi_c3: test cube C/cortex touches training cube B/cortex at its x+/y- corner" in "\n".join(lines)


BOX_TRAIN = "task.splits.train=[{box: {x: [0, 64], y: [0, 64]}, z: [0, 20]}]"
BOX_VAL = "task.splits.val=[{box: {x: [0, 64], y: [0, 64]}, z: [20, 25]}]"


def box_task(test: str, *overrides: str) -> RegionClassificationTask:
    return make_task("roi_c1", "task.downsample=1", BOX_TRAIN, BOX_VAL, f"task.splits.test=[{test}]", *overrides)


@pytest.mark.parametrize(
    "test,expected",
    [
        ("{box: {x: [64, 128], y: [16, 80]}, z: [10, 30]}", {("face", "x-", 48, (10, 20))}),
        ("{box: {x: [0, 64], y: [64, 128]}, z: [0, 30]}", {("face", "y-", 64, (0, 20))}),
        ("{box: {x: [64, 128], y: [64, 128]}, z: [0, 30]}", {("edge", "x-/y-", 0, (0, 20))}),
        ("{box: {x: [65, 129], y: [0, 64]}, z: [0, 30]}", set()),  # a 1 px gap: apart
        ("{box: {x: [64, 128], y: [65, 129]}, z: [0, 30]}", set()),  # corners 1 px apart
        ("{box: {x: [64, 128], y: [0, 64]}, z: [20, 30]}", set()),  # face, but no shared slice
    ],
)
def test_synthetic_contacts(test: str, expected: set) -> None:
    task = box_task(test)
    assert {(c.kind, c.side, c.length_px, c.z) for c in task.contacts} == expected
    assert all(c.split == "test" and c.train_cube.x == (0, 64) for c in task.contacts)


def test_overlapping_windows_stay_an_error() -> None:
    with pytest.raises(ConfigError, match=r"^task.splits: train z\[0, 20\] and test z\[0, 30\] overlap"):
        box_task("{box: {x: [63, 127], y: [0, 64]}, z: [0, 30]}")


@pytest.mark.parametrize(
    "override,fragment",
    [
        ("task.guard_px=-1", "task.guard_px: must be >= 0, got -1"),
        ("task.guard_px=128", "task.guard_px: must be < half the 256x256 tile (full resolution), got 128"),
    ],
)
def test_bad_guard_is_one_line(override: str, fragment: str) -> None:
    from mtneuro_lab.run import instantiate_cfg

    cfg = compose(["task=roi_c2", override])
    with pytest.raises(ConfigError) as err:
        instantiate_cfg(cfg.task, _convert_="all").bind(catalog_from_config(cfg.cubes))
    assert str(err.value) == fragment


def test_bad_guard_stops_the_cli_before_any_work(tmp_path: Path) -> None:
    proc = run_inproc("train.py", "task=roi_c2", "task.guard_px=200", run_dir=tmp_path / "run")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: task.guard_px: must be < half the 256x256 tile (full resolution), got 200"
    )
    assert not (tmp_path / "run").exists()


def test_guard_leaves_out_only_touching_test_windows(caplog) -> None:
    source = FakeSource()
    today = make_task("roi_c2", "task.downsample=4")
    off = make_task("roi_c2", "task.downsample=4", "task.guard_px=0")
    guarded = make_task("roi_c2", "task.downsample=4", "task.guard_px=127")
    base = {s: today.build(s, source) for s in SPLITS_}
    # guard_px=0: every array identical to today's
    for split in SPLITS_:
        arr = off.build(split, source)
        for name in ("images", "targets", "regions", "z", "cube_index"):
            assert np.array_equal(getattr(arr, name), getattr(base[split], name)), (split, name)
    # train and val untouched; test loses exactly D/striatum's and D/zi's 360 slices each
    for split in ("train", "val"):
        assert np.array_equal(guarded.build(split, source).images, base[split].images)
    test = guarded.build("test", source)
    kept = ~np.isin(np.array(base["test"].cubes)[base["test"].cube_index], ["D/striatum", "D/zi"])
    assert len(test) == 2880 - 2 * 360 and len(test) == int(kept.sum())
    assert test.cubes == ["C/cortex", "C/striatum", "C/vp", "C/zi", "D/cortex", "D/vp"]
    for name in ("images", "targets", "regions", "z"):
        assert np.array_equal(getattr(test, name), getattr(base["test"], name)[kept]), name
    with caplog.at_level("WARNING", logger="mtneuro_lab.data.tasks"):
        guarded.log_contacts()
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "task.guard_px=127 trims test window D/zi to x[1926, 2055] y[650, 906]" in text
    assert "D/striatum to x[3800, 4056] y[244, 373]" in text


def test_guard_trims_each_touching_side_and_needs_a_whole_window_left() -> None:
    # a corner contact trims both sides of the corner; no test window left is one line
    with pytest.raises(ConfigError, match=r"^task.guard_px: 4 px guards leave no whole test window"):
        box_task("{box: {x: [64, 128], y: [64, 128]}, z: [0, 30]}", "task.guard_px=4")
    task = box_task(
        "{box: {x: [64, 128], y: [64, 128]}, z: [0, 30]}, {box: {x: [200, 264], y: [0, 64]}, z: [0, 30]}",
        "task.guard_px=4",
    )
    assert [(c.x, c.y) for c, _ in task._slabs("test")] == [((200, 264), (0, 64))]
    assert [(s, t.x, t.y) for s, _, t, _ in task._left_out] == [("test", (68, 128), (68, 128))]


def test_segmentation_tasks_take_the_guard() -> None:
    test = "task.splits.test=[{set: D, z: [110, 470], regions: [cortex, zi]}]"
    task = make_task("seg2d_3class", "task.downsample=4", test, "task.guard_px=16")
    assert [c.key for c, _ in task._slabs("test")] == ["D/cortex"]

    class LabelSource(FakeSource):
        def cutout(self, channel, x, y, z):
            out = super().cutout("image", x, y, z)
            return out % 3 if channel == "pixel_labels" else out

    arr = task.build("test", LabelSource())
    assert len(arr) == 360 and arr.images.shape[1:] == (64, 64) and arr.cubes == ["D/cortex"]
    assert [c.key for c, _ in make_task("seg3d_4class", "task.guard_px=16")._slabs("test")] == [
        "A/cortex",
        "A/striatum",
        "A/vp",
    ]


# -- end to end on the phantom ----------------------------------------------------------------
FAST_SPLITS = {  # few slices (phantom cubes generated over z 100-160 only)
    "roi_c2": (
        "source.z_extent=[100,160]",
        "task.splits.train=[{set: A, z: [110, 130]}]",
        "task.splits.val=[{set: A, z: [130, 140]}]",
        "task.splits.test=[{set: C, z: [110, 160]}, {set: D, z: [110, 160]}]",
    ),
    "roi_c3": (
        "source.z_extent=[100,160]",
        "task.splits.train=[{set: A, z: [110, 130]}, {set: B, z: [110, 160]}]",
        "task.splits.val=[{set: A, z: [130, 140]}]",
        "task.splits.test=[{set: C, z: [110, 160]}, {set: D, z: [110, 160]}]",
    ),
}
FAST_COUNTS = {"roi_c2": (80, 40, 400), "roi_c3": (280, 40, 400)}


def _check_run(proc, run_dir: Path, task: str, counts: tuple[int, int, int]) -> None:
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    for split, n in zip(("train", "val", "test"), counts):
        assert f"{task}/{split}: {n} samples" in log, log[-2000:]
    assert 0.0 <= read_metrics(run_dir)["test/acc"] <= 1.0
    saved = OmegaConf.load(run_dir / "config.yaml")
    assert saved.task.name == task


@pytest.mark.parametrize("task", ["roi_c2", "roi_c3"])
def test_cli_runs_roi_c2_and_c3_with_few_slices(task: str, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = run_inproc("train.py", f"task={task}", *FAST_SPLITS[task], run_dir=run_dir)
    _check_run(proc, run_dir, task, FAST_COUNTS[task])


@pytest.mark.slow
@pytest.mark.parametrize("task", ["roi_c2", "roi_c3"])
def test_cli_runs_full_roi_c2_and_c3(task: str, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = run_inproc("train.py", f"task={task}", run_dir=run_dir)
    _check_run(proc, run_dir, task, (EXPECTED[task]["train"], EXPECTED[task]["val"], EXPECTED[task]["test"]))


# -- batched augmentation (the fast path the data benchmark measures) ---------------------------
@pytest.mark.parametrize("shape", [(33, 1, 12, 12), (33, 1, 3, 12, 12), (33, 1, 8, 12)])
def test_one_pass_geometric_equals_flips_then_rot90(shape) -> None:
    import torch

    from mtneuro_lab.data import augment
    from mtneuro_lab.data.augment import AugmentConfig

    image = torch.randint(0, 256, shape, dtype=torch.uint8)
    mask = torch.randint(0, 4, shape, dtype=torch.uint8)
    for cfg in (AugmentConfig(), AugmentConfig(hflip=False), AugmentConfig(vflip=False, rot90=False)):
        g_seq, g_new = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
        expected = [image, mask]
        if cfg.hflip:
            expected = augment.random_flip(expected, -1, generator=g_seq)
        if cfg.vflip:
            expected = augment.random_flip(expected, -2, generator=g_seq)
        if cfg.rot90:
            expected = augment.random_rot90(expected, generator=g_seq)
        got = augment.geometric([image, mask], cfg, generator=g_new)
        assert all(torch.equal(a, b) for a, b in zip(expected, got)), cfg


def test_crop_at_takes_each_samples_window() -> None:
    import torch

    from mtneuro_lab.data import augment

    t = torch.randint(0, 256, (5, 1, 3, 20, 24), dtype=torch.uint8)
    top, left = torch.tensor([0, 4, 2, 1, 4]), torch.tensor([8, 0, 3, 8, 5])
    got = augment.crop_at(t, top, left, (16, 16))
    assert got.shape == (5, 1, 3, 16, 16)
    for b in range(5):
        assert torch.equal(got[b], t[b, :, :, top[b] : top[b] + 16, left[b] : left[b] + 16])
