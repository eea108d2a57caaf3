"""The EM method layer: networks from config, post-processing chosen on validation, floors, outputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import build as components
from conftest import compose, read_metrics, run_inproc
from scipy import sparse

from mtneuro_lab.config.schema import validate_config
from mtneuro_lab.config.sections import PostprocessConfig
from mtneuro_lab.data import targets
from mtneuro_lab.data.em import section_components
from mtneuro_lab.data.sources.phantom_em import PhantomEMSource
from mtneuro_lab.decoding import postprocess as pp
from mtneuro_lab.decoding.export import write_predictions
from mtneuro_lab.decoding.floors import intensity_watershed, intensity_watershed_candidates, one_segment
from mtneuro_lab.decoding.segments import (
    RegionGraph,
    drop_small,
    merge_small,
    relabel_consecutive,
    strongest_neighbour,
)
from mtneuro_lab.decoding.volume import open_output, predict_chunked
from mtneuro_lab.errors import ConfigError
from mtneuro_lab.methods.em import EMSegmentation, balance_weights, target_loss
from mtneuro_lab.methods.em_eval import choose, search_postprocess, with_params
from mtneuro_lab.metrics.em import contingency, evaluate_instances
from mtneuro_lab.nets.rsunet import RSUNet
from mtneuro_lab.nets.segmentation import inplane_first_factors

SMALL = [
    "source.em_shape=[24,64,64]",
    "task.crop=[4,32,32]",
    "task.samples_per_epoch=8",
    "task.splits.train.z=[0,14]",
    "task.splits.val.z=[14,18]",
    "task.splits.test.z=[18,24]",
    "data.batch_size=2",
]
TINY_RSUNET = ["model=rsunet", "model.net.widths=[4,8]"]
EM_TASKS = ("snemi3d", "mitoem", "gala_fibsem", "isbi2012_em")


@pytest.fixture(scope="module")
def phantom() -> tuple[np.ndarray, np.ndarray]:
    """A small phantom: neuron labels and image (24 x 96 x 96)."""
    src = PhantomEMSource(seed=0, shape=(24, 96, 96))
    box = ((0, 96), (0, 96), (0, 24))
    return np.array(src.cutout("labels", *box)).astype(np.int64), np.array(src.cutout("image", *box))


def noisy_affinities(labels: np.ndarray, noise: float = 0.4, seed: int = 0) -> np.ndarray:
    aff, _ = targets.affinities(torch.from_numpy(labels)[None], targets.NEAREST_OFFSETS)
    rng = np.random.default_rng(seed)
    return np.clip(aff[0].numpy() + rng.uniform(-noise, noise, aff[0].shape), 0, 1).astype(np.float32)


# -- segment-level post-processing ---------------------------------------------------------------
def test_small_segments_join_their_strongest_neighbour_and_then_tiny_ones_go():
    seg = np.zeros((1, 4, 9), dtype=np.int64)
    seg[0, :, 0:4] = 1  # 16 voxels
    seg[0, :, 4] = 2  # 4 voxels between 1 and 3
    seg[0, :, 5:9] = 3  # 16 voxels
    seg[0, 0, 8] = 4  # 1 voxel inside 3's corner
    affs = np.zeros((3, 1, 4, 9), dtype=np.float32)
    affs[2, :, :, 5] = 0.9  # x-affinity between column 4 (segment 2) and 5 (segment 3): strong
    affs[2, :, :, 4] = 0.1  # between column 3 (segment 1) and 4: weak
    base, _, sizes = relabel_consecutive(seg)
    graph = RegionGraph.build(base, affs)
    merged = merge_small(np.arange(sizes.size), sizes, graph, merge_size=5)
    out = merged[base]
    assert out[0, 0, 4] == out[0, 0, 6] != out[0, 0, 0]  # 2 joined 3 (stronger), not 1
    assert out[0, 0, 8] == out[0, 1, 8]  # the 1-voxel segment joined its only neighbour
    dropped = drop_small(np.arange(sizes.size), sizes, min_size=5)[base]
    assert (dropped[seg == 2] == 0).all() and (dropped[seg == 4] == 0).all() and (dropped[seg == 1] > 0).all()


def test_every_threshold_of_one_waterz_pass_equals_its_own_run(phantom):
    labels, _ = phantom
    affs = noisy_affinities(labels)
    cfg = PostprocessConfig(merge_size=0)
    thresholds = [0.1, 0.3, 0.5, 0.7]
    for cand, t in zip(pp.affinity_candidates(affs, cfg, thresholds), thresholds):
        alone = pp.agglomerate(affs, PostprocessConfig(threshold=t)).astype(np.int64)
        same = evaluate_instances(cand.labels(), alone, ignore_zero=False)
        assert same["voi"] < 1e-9 and same["n_pred"] == len(np.unique(alone[alone > 0])), t
    # with merging and a size filter, the search's candidate is what segment() gives alone
    cfg = PostprocessConfig(merge_size=100, min_size=20)
    cand = list(pp.affinity_candidates(affs, cfg, thresholds))[2]
    alone = pp.segment(affs, "affinity", PostprocessConfig(threshold=0.5, merge_size=100, min_size=20))
    assert evaluate_instances(cand.labels(), alone, ignore_zero=False)["voi"] < 1e-9
    sizes = np.bincount(alone.ravel())[1:]
    assert sizes[sizes > 0].min() >= 20


def test_scores_from_merged_tables_equal_scoring_the_volumes(phantom):
    labels, _ = phantom
    affs = noisy_affinities(labels)
    cfg = PostprocessConfig(merge_size=64)
    conf = pp.confidence_map(affs, "affinity")
    for cand in pp.affinity_candidates(affs, cfg, [0.05, 0.4, 0.8]):
        fast = choose([cand], labels, "arand", confidence=conf).metrics
        seg = cand.labels()
        slow = evaluate_instances(seg, labels, scores=pp.instance_scores(seg, conf))
        for key in ("arand", "voi_split", "voi_merge", "ap50", "ap75", "n_pred"):
            assert fast[key] == pytest.approx(slow[key], abs=1e-9), key


def test_search_on_validation_beats_a_fixed_threshold_that_merges_everything(phantom):
    labels, _ = phantom
    affs = noisy_affinities(labels, noise=0.45)
    affs[1:] = np.clip(affs[1:] + 0.35, 0, 1)  # leaky membranes: high thresholds merge neurites
    cfg = PostprocessConfig(threshold=0.9, merge_size=32)
    fixed = search_postprocess(affs, labels, "affinity", cfg, "arand", search=False)
    searched = search_postprocess(affs, labels, "affinity", cfg, "arand")
    assert fixed.params == {"threshold": 0.9} and len(searched.tried) == len(cfg.grid.threshold)
    assert searched.metrics["arand"] < fixed.metrics["arand"] - 0.1
    assert searched.metrics["arand"] == min(score for _, score in searched.tried)


def test_bc_search_varies_seeds_and_mask():
    src = PhantomEMSource(seed=0, shape=(16, 96, 96))
    mito = np.array(src.cutout("mito", (0, 96), (0, 96), (0, 16))).astype(np.int64)
    bc, _ = targets.compute_targets("bc", torch.from_numpy(mito)[None])
    pred = np.clip(bc[0].numpy() + np.random.default_rng(0).uniform(-0.2, 0.2, bc[0].shape), 0, 1)
    cfg = PostprocessConfig(min_seed_size=4, min_size=16)
    choice = search_postprocess(pred, mito, "bc", cfg, "ap75", ignore_zero=False)
    assert len(choice.tried) == len(cfg.grid.seed_foreground) * len(cfg.grid.mask_foreground)
    assert set(choice.params) == {"seed_foreground", "mask_foreground"} and choice.metrics["ap75"] > 0.5


def unshared_candidates(pred: np.ndarray, kind: str, cfg: PostprocessConfig) -> list:
    """One full post-processing per grid setting, nothing shared: what the search must equal."""
    out = []
    for params in pp.search_settings(kind, cfg):
        values = with_params(cfg, params)
        if kind == "affinity":
            out.append(pp.clean(pp.agglomerate(pred, values).astype(np.int64), cfg, params, pred))
        else:
            out.append(pp.clean(pp.seeded_watershed(pred, values), cfg, params))
    return out


@pytest.mark.parametrize("kind", ["affinity", "bc", "bcd"])
def test_the_shared_search_equals_one_post_processing_per_setting(phantom, kind):
    if kind == "affinity":
        labels, _ = phantom
        pred = noisy_affinities(labels, noise=0.45)
        cfg = PostprocessConfig(merge_size=64, min_size=10)
    else:
        src = PhantomEMSource(seed=0, shape=(16, 96, 96))
        labels = np.array(src.cutout("mito", (0, 96), (0, 96), (0, 16))).astype(np.int64)
        distance = torch.from_numpy(targets.signed_distance(labels, (30, 8, 8), 50.0))[None]
        target, _ = targets.compute_targets(kind, torch.from_numpy(labels)[None], distance=distance)
        rng = np.random.default_rng(1)
        pred = np.clip(target[0].numpy() + rng.uniform(-0.3, 0.3, target[0].shape), 0, 1)
        cfg = PostprocessConfig(min_seed_size=4, merge_size=16, min_size=8)
    unshared = unshared_candidates(pred, kind, cfg)
    shared = list(pp.candidates(pred, kind, cfg, pp.search_settings(kind, cfg)))
    assert [c.params for c in shared] == [c.params for c in unshared]
    for a, b in zip(shared, unshared):
        assert np.array_equal(a.labels(), b.labels()), a.params
    assert len({c.labels().tobytes() for c in unshared}) >= 3  # the grid gives different segmentations
    chosen = search_postprocess(pred, labels, kind, cfg, "arand")
    reference = choose(unshared, labels, "arand")
    assert chosen.params == reference.params and chosen.tried == reference.tried
    assert chosen.metrics == reference.metrics
    assert np.array_equal(chosen.segmentation.labels(), reference.segmentation.labels())


def test_the_mask_after_the_flood_keeps_a_cut_off_piece_in_its_instance():
    # one seed (voxels 0-2); voxel 3 (0.6) is flooded but masked off, so voxels 4-5 are cut off
    # from the seed by the mask: they stay in its instance (a mask inside the flood loses them)
    fg = np.array([0.95, 0.95, 0.95, 0.6, 0.88, 0.88, 0.1, 0.88])
    pred = np.stack([fg, np.zeros_like(fg)])[:, None, None, :]
    cfg = PostprocessConfig(min_seed_size=1, seed_foreground=0.9, flood_foreground=0.5, mask_foreground=0.85)
    expected = [1, 1, 1, 0, 1, 1, 0, 0]
    assert pp.seeded_watershed(pred, cfg)[0, 0].tolist() == expected
    assert pp.segment(pred, "bc", cfg)[0, 0].tolist() == expected
    inside = pp.flood(pp.flood_depth(pred), pp.seed_markers(pred, cfg), pred[0] > cfg.mask_foreground)
    assert inside[0, 0].tolist() == [1, 1, 1, 0, 0, 0, 0, 0]


def test_the_shared_bc_search_is_exact_on_foreground_values_equal_to_the_thresholds():
    # float32 foreground on a 0.05 grid: many voxels sit exactly on a mask threshold
    rng = np.random.default_rng(3)
    pred = (rng.integers(0, 21, (2, 6, 24, 24)) / 20).astype(np.float32)
    pred[1] = (rng.uniform(size=pred[1].shape) < 0.2).astype(np.float32)
    cfg = PostprocessConfig(min_seed_size=2, merge_size=4, min_size=3)
    shared = list(pp.candidates(pred, "bc", cfg, pp.search_settings("bc", cfg)))
    for cand, reference in zip(shared, unshared_candidates(pred, "bc", cfg), strict=True):
        assert cand.params == reference.params and np.array_equal(cand.labels(), reference.labels()), cand.params
    assert len({c.labels().tobytes() for c in shared}) >= 3


def test_seed_markers_drop_specks_like_cc3d_dust():
    import cc3d

    pred = np.random.default_rng(0).uniform(0, 1, (2, 6, 20, 20))
    cfg = PostprocessConfig(min_seed_size=3, seed_foreground=0.5, seed_contour=0.5)
    seeds = (pred[0] > 0.5) & (pred[1] < 0.5)
    reference = cc3d.dust(cc3d.connected_components(seeds, connectivity=6), threshold=3, connectivity=6)
    markers = pp.seed_markers(pred, cfg)
    assert np.array_equal(markers, reference) and 0 < np.count_nonzero(markers) < np.count_nonzero(seeds)


def test_a_table_counted_on_the_foreground_alone_is_the_full_table():
    from mtneuro_lab.methods.em_eval import contingency_of

    rng = np.random.default_rng(0)
    gt = rng.integers(0, 6, (4, 16, 16))
    base = np.where(rng.uniform(size=gt.shape) < 0.2, rng.integers(1, 9, gt.shape), 0)
    where = np.flatnonzero(base)
    full = contingency_of(gt, base, 12)
    sparse_count = contingency_of(gt, base, 12, np.bincount(gt.reshape(-1)), where)
    assert full.shape == sparse_count.shape == (6, 12) and (full != sparse_count).nnz == 0


def test_strongest_neighbour_breaks_ties_like_a_four_key_sort():
    rng = np.random.default_rng(0)
    n, m = 40, 600
    seg, other = rng.integers(1, n, m), rng.integers(1, n, m)
    strength = rng.integers(0, 3, m).astype(float)  # few values: many ties on strength and area
    area = rng.integers(1, 3, m).astype(float)
    order = np.lexsort((other, -area, -strength, seg))
    expected = np.full(n, -1)
    for i in order[::-1]:  # the first of each segment in sorted order wins
        expected[seg[i]] = other[i]
    assert np.array_equal(strongest_neighbour(seg, other, strength, area, n), expected)


def test_dense_and_sparse_contingency_tables_are_the_same():
    rng = np.random.default_rng(0)
    gt, pred = rng.integers(0, 5, (4, 8, 8)), rng.integers(0, 300, (4, 8, 8))  # 5 x 300 > 256 voxels
    small_pred = pred % 7
    for p in (pred, small_pred):
        table = contingency(gt, p)
        reference = sparse.csr_array((np.ones(gt.size), (gt.ravel(), p.ravel())), shape=(5, int(p.max()) + 1))
        assert table.has_canonical_format and table.nnz == reference.nnz
        assert (table != reference).nnz == 0 and table.sum() == gt.size


# -- floors ---------------------------------------------------------------------------------------------
def test_floors_one_segment_and_intensity_watershed(phantom):
    labels, image = phantom
    one = choose([one_segment(labels.shape)], labels, "arand").metrics
    cfg = PostprocessConfig(merge_size=64)
    ws = choose(intensity_watershed_candidates(image, cfg, sigmas=[1.0], seed_levels=[0.7, 0.9]), labels, "arand")
    assert one["n_pred"] == 1 and one["arand"] > 0.5
    assert ws.metrics["arand"] < one["arand"] - 0.2 and set(ws.params) == {"sigma", "seed_level"}
    per_section = intensity_watershed(image, 1.0, 0.8, sections=True)
    ids_per_section = [set(np.unique(per_section[z])) - {0} for z in range(per_section.shape[0])]
    assert all(not (a & b) for a, b in zip(ids_per_section, ids_per_section[1:]))  # never across sections


def test_section_components_are_per_section_and_unique():
    mask = np.zeros((2, 5, 5), dtype=np.uint8)
    mask[:, 0:2, 0:2] = 255
    mask[:, 3:5, 3:5] = 255
    lab = section_components(mask)
    assert lab.dtype == np.int32 and len(np.unique(lab[lab > 0])) == 4
    assert not set(np.unique(lab[0])) - {0} & set(np.unique(lab[1]))


# -- networks and the method ----------------------------------------------------------------------------
def test_rsunet_downsamples_in_plane_first_and_keeps_the_shape():
    assert inplane_first_factors((16, 64, 64), 3) == [(2, 2, 2)] * 3
    assert inplane_first_factors((6, 96, 96), 3) == [(1, 2, 2), (1, 2, 2), (2, 2, 2)]
    net = RSUNet(1, 5, input_shape=(6, 32, 32), widths=(4, 8, 8, 8))
    assert net.divisor == (2, 8, 8) and net(torch.zeros(1, 1, 6, 32, 32)).shape == (1, 5, 6, 32, 32)
    with pytest.raises(ConfigError, match=r"task.crop: samples of 6x30x32 must be divisible by 2x8x8"):
        RSUNet(1, 3, input_shape=(6, 30, 32), widths=(4, 8, 8, 8))


def test_rebalanced_loss_weighs_the_rare_class_up():
    target = torch.zeros(1, 1, 1, 1, 10)
    target[..., :2] = 1.0  # 20 % positives
    w = balance_weights(target, torch.ones_like(target))
    assert torch.allclose(w[target > 0.5], torch.tensor(4.0)) and torch.allclose(w[target < 0.5], torch.tensor(1.0))
    logits = torch.zeros_like(target, requires_grad=True)
    loss = target_loss(logits, target, "affinity", rebalance=True)
    grad = torch.autograd.grad(loss, logits)[0]
    assert grad[target > 0.5].abs().sum() == pytest.approx(grad[target < 0.5].abs().sum().item(), rel=1e-5)


@pytest.mark.parametrize("model", ["rsunet", "unet3d"])
@pytest.mark.parametrize("task", EM_TASKS)
def test_em_models_build_on_every_em_task(model, task, shared_data):
    comps = components(f"task={task}", f"model={model}")
    method = comps.method
    assert isinstance(method, EMSegmentation) and method.num_classes == comps.task.num_classes
    assert method.monitor == ("val/ap75", "max") if task == "mitoem" else ("val/arand", "min")
    x = torch.zeros(1, 1, *comps.task.crop, device="meta")  # shapes only: a full-size crop costs no arithmetic
    assert method.to("meta").eval()(x).shape == (1, comps.task.num_classes, *comps.task.crop)


def test_unet3d_is_the_xray_method_on_seg3d_and_the_em_method_on_em_tasks():
    xray = compose(["task=seg3d_3class", "model=unet3d"])
    em = compose(["task=snemi3d", "model=unet3d"])
    assert xray.model._target_.endswith("Volumetric3DSegmentation") and xray.model.loss == "ce"
    assert em.model._target_.endswith("UNet3DEM") and "loss" not in em.model and em.model.base_channels == 16
    validate_config(xray), validate_config(em)


def test_every_task_config_declares_its_kind():
    from conftest import ROOT

    from mtneuro_lab.build import build_task
    from mtneuro_lab.data.cubes import catalog_from_config

    for path in sorted((ROOT / "mtneuro_lab" / "conf" / "task").glob("*.yaml")):
        cfg = compose([f"task={path.stem}"], return_hydra_config=True)
        task = build_task(cfg, catalog_from_config(cfg.cubes))
        assert cfg.hydra.runtime.choices.task_kind == task.kind, path.stem


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["task.crop=[4,31,32]", *TINY_RSUNET], "task.crop: samples of 4x31x32 must be divisible"),
        (["task.postprocess.grid.threshold=[]", *TINY_RSUNET], "task.postprocess.grid.threshold: empty"),
        (["task.postprocess.grid.threshold=[0.1,1.5]", *TINY_RSUNET], "task.postprocess.grid.threshold: values"),
        (["task.postprocess.select=best", *TINY_RSUNET], "task.postprocess.select: must be one of val, fixed"),
        (["task.postprocess.grid.mask_foreground=[0.3,0.7]"], "task.postprocess.grid.mask_foreground: 0.3 is below"),
        (["trainer.limit_val_batches=0", *TINY_RSUNET], "task.postprocess.select=val chooses post-processing"),
        (["model=unet3d", "model.arch=basic_unet", "model.levels=null"], "task.crop: samples of 4x32x32"),
        (["model=rsunet", "+model.net.out_channels=2"], "model.net.out_channels: set by the run"),
    ],
)
def test_bad_em_inputs_are_one_line_errors(overrides, key):
    with pytest.raises(ConfigError) as err:
        components("task=snemi3d", *SMALL, *overrides)
    assert key in str(err.value) and "\n" not in str(err.value)


def test_a_network_whose_output_does_not_fit_the_targets_is_one_line():
    with pytest.raises(ConfigError, match=r"model.net: the network maps a crop of \[4, 8, 8\] to \[2, 4, 8, 8\]"):
        EMSegmentation(3, ["aff_z", "aff_y", "aff_x"], (4, 8, 8), net=torch.nn.Conv3d(1, 2, 1))
    method = EMSegmentation(3, ["aff_z", "aff_y", "aff_x"], (4, 32, 32), net=torch.nn.Conv3d(1, 3, 1))
    bc_task = components("task=mitoem", *SMALL, *TINY_RSUNET).task
    with pytest.raises(ConfigError, match="the network predicts 3 channels, but task.target=bc needs 2"):
        method.bind_task(bc_task)


# -- outputs ---------------------------------------------------------------------------------------------
def test_chunked_prediction_equals_whole_volume_inference(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 3, 3, padding=1), torch.nn.Sigmoid()).eval()
    vol = np.random.default_rng(0).integers(0, 255, (21, 40, 52), dtype=np.uint8)

    def norm(a):
        return torch.from_numpy((a.astype(np.float32) / 255 - 0.5) / 0.25)

    whole = pp.sliding_window_predict(net, norm(vol)[None, None], (6, 16, 16), overlap=0.5)[0].numpy()
    out = open_output(tmp_path / "p.zarr", (3, *vol.shape), dtype="float32")
    stats = predict_chunked(net, vol, out, (6, 16, 16), norm, overlap=0.5)
    assert stats.voxels == vol.size and np.abs(np.asarray(out[:]) - whole).max() < 1e-6
    with pytest.raises(ConfigError, match=r"task.crop: \[6, 16, 64\] is larger than the volume"):
        predict_chunked(net, vol, out, (6, 16, 64), norm)


def test_predictions_file_holds_segmentation_probabilities_and_image(tmp_path):
    import h5py

    seg = np.arange(24, dtype=np.int64).reshape(2, 3, 4)
    prob = np.random.default_rng(0).random((3, 2, 3, 4)).astype(np.float32)
    image = np.full((2, 3, 4), 7, dtype=np.uint8)
    path = write_predictions(tmp_path / "predictions" / "test.h5", seg, prob, image, {"postprocess_threshold": 0.2})
    with h5py.File(path, "r") as f:
        assert np.array_equal(f["segmentation"][:], seg) and f["segmentation"].compression == "gzip"
        assert np.allclose(f["probabilities"][:], prob, atol=1e-3) and np.array_equal(f["image"][:], image)
        assert f.attrs["postprocess_threshold"] == 0.2
    assert [p.name for p in path.parent.iterdir()] == ["test.h5"]  # no temporary file left


def test_cli_trains_chooses_postprocessing_on_validation_and_writes_outputs(tmp_path):
    run = tmp_path / "run"
    proc = run_inproc("train.py", "task=snemi3d", *SMALL, *TINY_RSUNET, "trainer=cpu", "task.downsample=1", run_dir=run)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = read_metrics(run)
    assert metrics["selection/metric"] == "val/arand"
    grid = compose(["task=snemi3d"]).task.postprocess.grid.threshold
    assert metrics["val/pp_threshold"] == pytest.approx(metrics["test/pp_threshold"])
    assert min(abs(metrics["val/pp_threshold"] - t) for t in grid) < 1e-6
    for key in ("test/arand", "test/voi_split", "test/voi_merge", "val/arand", "test/infer_cpu_s"):
        assert np.isfinite(metrics[key]), key
    ckpt = next(p for p in (run / "checkpoints").glob("*.ckpt") if p.name != "last.ckpt")
    stored = torch.load(ckpt, weights_only=True)["em_postprocess"]
    assert stored["threshold"] == pytest.approx(metrics["val/pp_threshold"])
    import h5py

    with h5py.File(run / "predictions" / "test.h5", "r") as f:
        assert f["segmentation"].shape == (6, 64, 64) and f["probabilities"].shape == (3, 6, 64, 64)
        assert f["image"].dtype == np.uint8 and f.attrs["postprocess_threshold"] == pytest.approx(stored["threshold"])
