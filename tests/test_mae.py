"""3D MAE pretraining and UNETR fine-tuning: token order, masking, loss, checkpoints, CLI."""

from __future__ import annotations

import math

import pytest
import torch

from mtneuro_lab.errors import CheckpointError, ConfigError
from mtneuro_lab.methods.mae_finetune import (
    MAEFinetune,
    layer_decay_groups,
    target_loss,
)
from mtneuro_lab.methods.mae_pretrain import (
    CKPT_META_KEY,
    MAEPretrain,
    save_encoder,
    tile_starts,
    tile_volume,
)
from mtneuro_lab.methods.optim import OptimizerConfig, build_optimizer
from mtneuro_lab.nets.unetr import UNETR, skip_blocks, upsampling_stages
from mtneuro_lab.nets.vit3d import (
    ViTEncoder,
    masked_patch_loss,
    patchify,
    random_masking,
    sincos_pos_embed_3d,
    unpatchify,
    vit_spec,
)

CROP = (4, 16, 16)
PATCH = (1, 4, 4)  # grid 4x4x4 = 64 tokens
BC = ["foreground", "contour"]
SMALL_DECODER = {"decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 4}


def pretrain(**kw) -> MAEPretrain:
    args = {
        "num_classes": 2,
        "class_names": BC,
        "input_shape": CROP,
        "preset": "tiny",
        "patch_size": PATCH,
        **SMALL_DECODER,
        **kw,
    }
    return MAEPretrain(**args)


def finetune(**kw) -> MAEFinetune:
    args = {
        "num_classes": 2,
        "class_names": BC,
        "input_shape": CROP,
        "preset": "tiny",
        "patch_size": PATCH,
        "feature_size": 4,
        **kw,
    }
    return MAEFinetune(**args)


# -- token order ------------------------------------------------------------------------------
def test_patchify_unpatchify_round_trip():
    x = torch.randn(2, 1, 6, 8, 12)
    patch = (2, 4, 3)
    tokens = patchify(x, patch)
    assert tokens.shape == (2, 3 * 2 * 4, 2 * 4 * 3)
    assert torch.equal(unpatchify(tokens, patch, (3, 2, 4)), x)


def test_patch_targets_follow_token_order_d_h_w():
    """Token t of the patch embedding and target t of patchify describe the same patch."""
    patch, grid = (2, 4, 4), (3, 2, 5)
    d, h, w = grid
    index = torch.arange(d * h * w, dtype=torch.float32).reshape(1, 1, d, h, w)
    x = index.repeat_interleave(patch[0], 2).repeat_interleave(patch[1], 3).repeat_interleave(patch[2], 4)
    targets = patchify(x, patch)
    # every voxel of target t carries the value t: the grid is enumerated d-major, then h, then w
    assert torch.equal(targets, torch.arange(d * h * w, dtype=torch.float32).view(1, -1, 1).expand_as(targets))

    # the encoder's Conv3d patch embedding, set to copy voxel k of a patch into channel k, gives
    # exactly the patchify targets in the same (token, voxel) order
    spec = vit_spec("tiny", patch, tuple(g * p for g, p in zip(grid, patch)))
    enc = ViTEncoder(spec)
    voxels = math.prod(patch)
    with torch.no_grad():
        enc.patch_embed.weight.zero_()
        enc.patch_embed.bias.zero_()
        enc.patch_embed.weight.view(spec.dim, voxels)[:voxels] = torch.eye(voxels)
    y = torch.randn(2, 1, *spec.input_shape)
    embedded = (enc.embed(y) - enc.pos_embed)[..., :voxels]
    assert torch.allclose(embedded, patchify(y, patch), atol=1e-5)


@pytest.mark.parametrize("dim", [1, 7, 16, 100, 192])
def test_sincos_position_embedding_any_width(dim):
    table = sincos_pos_embed_3d(dim, (3, 4, 5))
    assert table.shape == (60, dim) and torch.isfinite(table).all()
    if dim >= 6:  # every axis has a frequency pair: all positions are distinct
        assert len({tuple(r.tolist()) for r in table.round(decimals=5)}) == 60
    if dim % 2:
        assert torch.equal(table[:, -1], torch.zeros(60))


# -- masking ----------------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", ["random", "space", "section"])
@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.75, 0.9, 0.95])
def test_masking_keeps_exactly_round_L_times_one_minus_ratio(strategy, ratio):
    grid = (6, 5, 7)
    L = 6 * 5 * 7
    ids_keep, mask = random_masking(3, grid, ratio, strategy, generator=torch.Generator().manual_seed(0))
    keep = round(L * (1 - ratio))
    assert ids_keep.shape == (3, keep)
    assert (mask.sum(1) == L - keep).all()
    assert ((~mask).sum(1) == keep).all()
    assert torch.equal(torch.gather(mask, 1, ids_keep), torch.zeros_like(ids_keep, dtype=torch.bool))
    assert (ids_keep.diff(dim=1) > 0).all()  # sorted, no repeats


def test_space_masking_hides_whole_tubes_and_section_masking_whole_sections():
    d, h, w = 6, 5, 7
    g = torch.Generator().manual_seed(1)
    # 0.8 of 210 -> 42 visible = 7 whole tubes of 6 sections
    _, mask = random_masking(4, (d, h, w), 0.8, "space", generator=g)
    per_position = mask.view(4, d, h * w)
    assert ((per_position.all(1)) | (~per_position).all(1)).all()
    assert ((~per_position).all(1).sum(1) == 7).all()
    # 2/3 of 210 -> 70 visible = 2 whole sections of 35
    _, mask = random_masking(4, (d, h, w), 2 / 3, "section", generator=g)
    per_section = mask.view(4, d, h * w)
    assert ((per_section.all(2)) | (~per_section).all(2)).all()
    assert ((~per_section).all(2).sum(1) == 2).all()
    # 0.9 -> 21 visible: 3 whole tubes + 3 tokens of a fourth, still exactly 21
    _, mask = random_masking(2, (d, h, w), 0.9, "space", generator=g)
    visible = (~mask).view(2, d, h * w).sum(1)
    assert sorted(visible[0].tolist())[-4:] == [3, 6, 6, 6] and visible.sum(1).tolist() == [21, 21]


def test_loss_covers_only_masked_patches():
    torch.manual_seed(0)
    pred, target = torch.randn(2, 10, 8), torch.randn(2, 10, 8)
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[:, [1, 4, 7]] = True
    base = masked_patch_loss(pred, target, mask)
    changed = pred.clone()
    changed[~mask] += 5.0
    assert torch.allclose(masked_patch_loss(changed, target, mask), base)
    changed = pred.clone()
    changed[mask] += 5.0
    assert not torch.allclose(masked_patch_loss(changed, target, mask), base)
    # normalised per patch: the target's per-patch offset and scale do not matter
    assert torch.allclose(masked_patch_loss(pred, target * 3 + 2, mask), base, atol=1e-4)


def test_mae_encoder_sees_only_visible_tokens_and_gradients_only_from_masked():
    torch.manual_seed(0)
    model = pretrain(mask_ratio=0.75)
    seen = []
    model.encoder.blocks[0].register_forward_hook(lambda m, i, o: seen.append(i[0].shape))
    x = torch.randn(2, 1, *CROP)
    loss, pred, mask = model(x)
    assert seen == [(2, 16, model.encoder.spec.dim)]  # round(64 * 0.25) tokens
    assert mask.sum(1).tolist() == [48, 48]
    grad = torch.autograd.grad(loss, pred, retain_graph=True)[0]
    assert (grad[~mask] == 0).all() and (grad[mask] != 0).any()
    loss.backward()
    assert model.encoder.patch_embed.weight.grad.abs().sum() > 0


def test_pretrain_eval_tiles_whole_volumes_deterministically():
    assert tile_starts(10, 4) == [0, 4, 6] and tile_starts(8, 4) == [0, 4]
    vol = torch.randn(1, 1, 5, 20, 16)
    tiles = tile_volume(vol, CROP)
    assert tiles.shape == (2 * 2 * 1, 1, *CROP)
    assert torch.equal(tiles[-1], vol[0, :, 1:5, 4:20, 0:16])


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"mask_ratio": 1.0}, "model.mask_ratio"),
        ({"mask_ratio": -0.1}, "model.mask_ratio"),
        ({"mask_ratio": 0.995}, "model.mask_ratio"),  # no visible token of 64
        ({"patch_size": (1, 5, 4)}, "model.patch_size"),
        ({"patch_size": 4}, "model.patch_size"),
        ({"input_shape": (4, 18, 16)}, "model.patch_size"),
        ({"preset": "huge"}, "model.preset"),
        ({"decoder_dim": 30}, "model.decoder_dim"),
    ],
)
def test_pretrain_rejects_bad_values_with_one_line(kwargs, key):
    with pytest.raises(ConfigError, match=key) as err:
        pretrain(**kwargs)
    assert "\n" not in str(err.value)


# -- fine-tuning ------------------------------------------------------------------------------
def _pretrained_file(tmp_path, **kw):
    torch.manual_seed(0)
    model = pretrain(**kw)
    with torch.no_grad():  # make every tensor distinctive, norm and positions included
        for p in model.encoder.parameters():
            p.add_(torch.randn_like(p))
        model.encoder.pos_embed.mul_(1.5)
    return model, save_encoder(model.encoder, tmp_path / "encoder.pt")


def test_finetune_loads_every_pretrained_tensor_exactly(tmp_path):
    model, path = _pretrained_file(tmp_path)
    saved = torch.load(path, weights_only=True)
    ft = finetune(pretrained=str(path))
    loaded = ft.encoder.state_dict()
    assert set(loaded) == set(saved["state_dict"])
    assert {"pos_embed", "norm.weight", "norm.bias", "patch_embed.weight"} <= set(loaded)
    for name, tensor in saved["state_dict"].items():
        assert torch.equal(loaded[name], tensor), name
    # and the fine-tuned encoder computes what the pretrained one did
    x = torch.randn(1, 1, *CROP)
    ft.eval(), model.eval()
    with torch.no_grad():
        assert torch.allclose(ft.encoder(x)[0], model.encoder(x)[0], atol=1e-5)
    scratch = finetune()
    assert not torch.equal(scratch.encoder.norm.weight, loaded["norm.weight"])


def test_finetune_loads_a_lightning_checkpoint_of_mae_pretrain(tmp_path):
    model, _ = _pretrained_file(tmp_path)
    ckpt = {"state_dict": model.state_dict(), "epoch": 0}
    model.on_save_checkpoint(ckpt)
    assert CKPT_META_KEY in ckpt
    torch.save(ckpt, tmp_path / "last.ckpt")
    ft = finetune(pretrained=str(tmp_path / "last.ckpt"))
    for name, tensor in model.encoder.state_dict().items():
        assert torch.equal(ft.encoder.state_dict()[name], tensor), name


def test_finetune_rejects_checkpoints_of_another_model_with_one_line(tmp_path):
    _, path = _pretrained_file(tmp_path)
    with pytest.raises(CheckpointError, match="model.pretrained: .*dim=192 .*dim=384"):
        finetune(pretrained=str(path), preset="small")
    with pytest.raises(CheckpointError, match="patch_size"):
        finetune(pretrained=str(path), patch_size=(2, 4, 4))
    torch.save({"state_dict": {"w": torch.zeros(1)}}, tmp_path / "other.ckpt")
    with pytest.raises(CheckpointError, match="not an MAE encoder"):
        finetune(pretrained=str(tmp_path / "other.ckpt"))
    with pytest.raises(CheckpointError, match="no checkpoint file"):
        finetune(pretrained=str(tmp_path / "missing.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot load") as err:
        finetune(pretrained=str(tmp_path / "junk.pt"))
    assert "\n" not in str(err.value)


def test_finetune_on_another_crop_resizes_position_table(tmp_path):
    model, path = _pretrained_file(tmp_path)
    ft = finetune(pretrained=str(path), input_shape=(8, 16, 16))  # grid 8x4x4 from 4x4x4
    assert ft.encoder.pos_embed.shape == (1, 128, model.encoder.spec.dim)
    grid_old = model.encoder.pos_embed.view(4, 4, 4, -1)
    grid_new = ft.encoder.pos_embed.view(8, 4, 4, -1)
    assert torch.allclose(grid_new[0], grid_old[0]) and torch.allclose(grid_new[-1], grid_old[-1])
    assert torch.equal(ft.encoder.norm.weight, model.encoder.norm.weight)


def test_layer_decay_groups_scale_lr_by_depth():
    ft = finetune(layer_decay=0.5)
    cfg = OptimizerConfig(name="adamw", lr=0.1, weight_decay=0.05)
    groups = layer_decay_groups([(n[4:], p) for n, p in ft.named_parameters()], 12, 0.5, 0.05)
    opt = build_optimizer(groups, cfg, global_batch=8)
    lr_of = {name: g["lr"] for g in opt.param_groups for name in g["names"]}
    wd_of = {name: g["weight_decay"] for g in opt.param_groups for name in g["names"]}
    assert math.isclose(lr_of["encoder.patch_embed.weight"], 0.1 * 0.5**13)
    assert math.isclose(lr_of["encoder.blocks.0.attn.qkv.weight"], 0.1 * 0.5**12)
    assert math.isclose(lr_of["encoder.blocks.11.mlp.0.weight"], 0.1 * 0.5)
    assert math.isclose(lr_of["encoder.norm.weight"], 0.1)
    assert math.isclose(lr_of["head.conv.conv.weight"], 0.1)
    assert wd_of["encoder.blocks.3.attn.qkv.weight"] == 0.05 and wd_of["encoder.blocks.3.attn.qkv.bias"] == 0.0
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(ft.parameters()))


def test_unetr_anisotropic_patch_stages_and_shapes():
    assert upsampling_stages((1, 16, 16)) == [(1, 2, 2)] * 4
    assert upsampling_stages((2, 8, 8)) == [(2, 2, 2), (1, 2, 2), (1, 2, 2)]
    assert skip_blocks(12, 4) == [2, 5, 8]
    with pytest.raises(ConfigError, match="model.patch_size"):
        upsampling_stages((1, 12, 12))
    spec = vit_spec("tiny", (2, 8, 8), (4, 16, 32))
    net = UNETR(ViTEncoder(spec), out_channels=3, feature_size=4)
    assert net(torch.randn(2, 1, 4, 16, 32)).shape == (2, 3, 4, 16, 32)


def test_target_kind_comes_from_the_bound_task_and_loss():
    ft = finetune()
    with pytest.raises(ConfigError, match="no task bound"):
        _ = ft.target_kind
    with pytest.raises(ConfigError, match="needs an EM task"):
        ft.bind_task(object())  # type: ignore[arg-type]
    logits = torch.zeros(1, 3, 2, 4, 4, requires_grad=True)
    target = torch.rand(1, 3, 2, 4, 4) * 2 - 1
    target[:, :2] = target[:, :2].abs()
    mask = torch.ones_like(target)
    mask[..., 0, :, :] = 0
    loss = target_loss(logits, target, "bcd", mask)
    grad = torch.autograd.grad(loss, logits)[0]
    assert (grad[..., 0, :, :] == 0).all() and (grad[..., 1, :, :] != 0).any()
    assert torch.isclose(target_loss(logits, target, "bcd"), math.log(2) + (target[:, 2] ** 2).mean(), atol=1e-5)


# -- config and CLI ---------------------------------------------------------------------------
#: the first 16 sections of gala's separate test volume (sizes: the debug group's fast_mae*)
GALA_TEST = "task.splits.test.z=[0,16]"


@pytest.mark.parametrize("model", ["mae_pretrain", "mae_finetune"])
@pytest.mark.parametrize("task", ["snemi3d", "mitoem"])
def test_model_configs_compose_validate_and_build(model, task):
    from conftest import compose

    from mtneuro_lab.config.schema import validate_config
    from mtneuro_lab.run import build_components

    cfg = compose([f"task={task}", f"model={model}", "model.preset=tiny"])
    validate_config(cfg)
    comps = build_components(cfg)
    assert comps.method.input_shape == tuple(cfg.task.crop)
    assert comps.method.encoder.grid == (6, 6, 6)
    if model == "mae_finetune":  # the loss follows the task's target (snemi3d: affinity, mitoem: bc)
        assert comps.method.target_kind == cfg.task.target == {"snemi3d": "affinity", "mitoem": "bc"}[task]


@pytest.mark.parametrize(
    "override, key",
    [
        ("model.mask_strategy=tube", "model.mask_strategy: must be one of random, space, section"),
        ("model.preset=huge", "model.preset: must be one of tiny, small, base, large"),
        ("task.crop=[6,90,96]", "model.patch_size: crop [6, 90, 96]"),
        ("model.mask_ratio=0.999", "model.mask_ratio"),
    ],
)
def test_bad_mae_config_fails_before_training_with_one_line(override, key):
    from conftest import compose

    from mtneuro_lab.config.schema import validate_config
    from mtneuro_lab.run import build_components

    cfg = compose(["task=snemi3d", "model=mae_pretrain", override])
    with pytest.raises(ConfigError) as err:
        validate_config(cfg)
        build_components(cfg)
    assert key in str(err.value) and "\n" not in str(err.value)


def test_cli_rejects_bad_mae_values_with_one_line(tmp_path):
    from conftest import run_inproc

    for override, key in (("model.mask_ratio=1.0", "model.mask_ratio"),):
        proc = run_inproc(
            "train.py", "task=snemi3d", "model=mae_pretrain", "model.preset=tiny", override, run_dir=tmp_path / key
        )
        assert proc.returncode == 2, proc.stderr[-2000:]
        lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
        assert len(lines) == 1 and key in lines[0], proc.stderr[-2000:]
        assert not (tmp_path / key).exists()


def test_cli_pretrain_then_finetune_on_real_fibsem(tmp_path, shared_data):
    """The user's two commands on the real FIB-SEM volume: encoder.pt, then test/arand."""
    from conftest import read_metrics, run_inproc

    assert (shared_data / "gala_fibsem" / "train-image.h5").is_file()
    pre = run_inproc(
        "train.py",
        "task=gala_fibsem",
        "model=mae_pretrain",
        GALA_TEST,
        run_dir=tmp_path / "pre",
        fast="fast_mae",
    )
    assert pre.returncode == 0, pre.stderr[-3000:]
    encoder = tmp_path / "pre" / "encoder.pt"
    payload = torch.load(encoder, weights_only=True)
    assert payload["meta"]["preset"] == "tiny" and payload["meta"]["input_shape"] == [8, 32, 64]
    assert math.isfinite(read_metrics(tmp_path / "pre")["test/loss"])

    ft = run_inproc(
        "train.py",
        "task=gala_fibsem",
        "model=mae_finetune",
        GALA_TEST,
        f"model.pretrained={encoder}",
        run_dir=tmp_path / "ft",
        fast="fast_mae_finetune",
    )
    assert ft.returncode == 0, ft.stderr[-3000:]
    metrics = read_metrics(tmp_path / "ft")
    for key in ("test/arand", "test/voi_split", "test/voi_merge"):
        assert math.isfinite(metrics[key]), key
    assert 0.0 <= metrics["test/arand"] <= 1.0
    # the fine-tuned run started from the pretrained encoder: its checkpoint's position table
    # and final norm are the pretrained ones (positions are a buffer and never trained)
    ckpt = next((tmp_path / "ft" / "checkpoints").glob("*.ckpt"))
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    assert torch.equal(state["net.encoder.pos_embed"], payload["state_dict"]["pos_embed"])
