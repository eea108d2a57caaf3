"""The fused crop + dihedral + normalise gather (augment.gather_crop_augment) against the
sequential ops it replaces, and its transforms against hand-made tiles."""

from __future__ import annotations

import pytest
import torch

from mtneuro_lab.data import augment
from mtneuro_lab.data.augment import AugmentConfig

CFGS = [
    AugmentConfig(),
    AugmentConfig(hflip=False),
    AugmentConfig(vflip=False, rot90=False),
    AugmentConfig(hflip=False, vflip=False, rot90=False),
]


def _sequential(images, samples, size, cfg, mean, std, generator, aligned=()):
    """random_crop -> geometric (flips, rot90) -> to_float, the reference."""
    tensors = [t.index_select(0, samples).unsqueeze(1) for t in (images, *aligned)]
    tensors = augment.random_crop(tensors, size, generator=generator)
    tensors = augment.geometric(tensors, cfg, generator=generator)
    return augment.to_float(tensors[0].squeeze(1), mean, std), [t.squeeze(1) for t in tensors[1:]], tensors[0]


@pytest.mark.parametrize("cfg", CFGS)
@pytest.mark.parametrize(
    "tile,size", [((24, 24), (16, 16)), ((20, 31), (9, 9)), ((16, 16), (16, 16)), ((20, 24), (8, 12))]
)
def test_fused_equals_sequential(cfg, tile, size) -> None:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (40, *tile), dtype=torch.uint8, generator=g)
    mask = torch.randint(0, 5, (40, *tile), dtype=torch.uint8, generator=g)
    samples = torch.randperm(40, generator=g)[:33]
    mean, std = 0.43, 0.21
    for seed in range(3):
        want, (want_mask,), want_u8 = _sequential(
            images, samples, size, cfg, mean, std, torch.Generator().manual_seed(seed), (mask,)
        )
        got, (got_mask,) = augment.gather_crop_augment(
            images, samples, size, cfg, mean, std, generator=torch.Generator().manual_seed(seed), aligned=(mask,)
        )
        assert got.shape == (33, 1, *size) and got.dtype == torch.float32
        assert got_mask.shape == (33, *size) and got_mask.dtype == torch.uint8
        assert torch.equal(got_mask, want_mask)
        # same pixels exactly (the uint8 values are recoverable), float equal up to rounding
        u8 = (got * std + mean).mul_(255).round_().to(torch.uint8)
        assert torch.equal(u8, want_u8)
        torch.testing.assert_close(got, want, rtol=0, atol=2e-6)


def test_fused_draws_match_generator_state() -> None:
    """The fused path consumes exactly the sequential path's draws (later draws agree too)."""
    images = torch.randint(0, 256, (8, 32, 32), dtype=torch.uint8)
    samples = torch.arange(8)
    g_seq, g_new = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    _sequential(images, samples, (16, 16), AugmentConfig(), 0.5, 0.25, g_seq)
    augment.gather_crop_augment(images, samples, (16, 16), AugmentConfig(), 0.5, 0.25, generator=g_new)
    assert torch.equal(torch.rand(4, generator=g_seq), torch.rand(4, generator=g_new))


def _index_of(flip: int, turns: int, tile=(4, 4), size=(4, 4), top=0, left=0, sample=0) -> torch.Tensor:
    t = torch.tensor
    return augment.crop_dihedral_index(t([sample]), t([top]), t([left]), t([flip]), t([turns]), tile, size)[0]


def test_index_is_the_true_dihedral_group() -> None:
    tile = torch.arange(16, dtype=torch.uint8).view(1, 4, 4)
    flat = tile.view(-1)
    expected = {
        (0, 0): tile[0],
        (0, 1): torch.tensor([[3, 7, 11, 15], [2, 6, 10, 14], [1, 5, 9, 13], [0, 4, 8, 12]]),  # 90 deg ccw
        (0, 2): torch.tensor([[15, 14, 13, 12], [11, 10, 9, 8], [7, 6, 5, 4], [3, 2, 1, 0]]),  # 180 deg
        (0, 3): torch.tensor([[12, 8, 4, 0], [13, 9, 5, 1], [14, 10, 6, 2], [15, 11, 7, 3]]),  # 90 deg cw
        (1, 0): torch.tensor([[3, 2, 1, 0], [7, 6, 5, 4], [11, 10, 9, 8], [15, 14, 13, 12]]),  # mirror x
        (1, 1): tile[0].t().contiguous(),  # rot90(hflip) == transpose
        (1, 2): torch.tensor([[12, 13, 14, 15], [8, 9, 10, 11], [4, 5, 6, 7], [0, 1, 2, 3]]),  # mirror y
        (1, 3): torch.tensor([[15, 11, 7, 3], [14, 10, 6, 2], [13, 9, 5, 1], [12, 8, 4, 0]]),  # anti-transpose
    }
    seen = set()
    for (flip, turns), want in expected.items():
        got = flat[_index_of(flip, turns)]
        assert torch.equal(got, want.to(torch.uint8)), (flip, turns)
        seen.add(tuple(got.flatten().tolist()))
    assert len(seen) == 8


def test_index_crops_the_right_window_of_the_right_sample() -> None:
    images = torch.arange(3 * 6 * 7, dtype=torch.int64).view(3, 6, 7)
    for flip in (0, 1):
        for turns in range(4):
            idx = _index_of(flip, turns, tile=(6, 7), size=(3, 3), top=2, left=4, sample=2)
            window = images[2, 2:5, 4:7]
            if flip:
                window = window.flip(-1)
            assert torch.equal(images.view(-1)[idx], torch.rot90(window, turns, dims=(-2, -1)))


def test_non_square_crop_and_errors() -> None:
    images = torch.zeros(4, 10, 12, dtype=torch.uint8)
    x, extra = augment.gather_crop_augment(images, torch.tensor([3, 1]), (6, 8), AugmentConfig(), 0.0, 1.0)
    assert x.shape == (2, 1, 6, 8) and extra == []
    with pytest.raises(ValueError, match="larger"):
        augment.gather_crop_augment(images, torch.tensor([0]), (11, 8), AugmentConfig(), 0.0, 1.0)
    with pytest.raises(ValueError, match="contiguous"):
        augment.gather_crop_augment(images.transpose(1, 2), torch.tensor([0]), (4, 4), AugmentConfig(), 0.0, 1.0)
    with pytest.raises(ValueError, match="square"):
        _index_of(0, 1, tile=(10, 12), size=(6, 8))


def test_int64_index_for_large_splits_matches_int32() -> None:
    args = (
        torch.tensor([1, 0]),
        torch.tensor([3, 0]),
        torch.tensor([2, 5]),
        torch.tensor([1, 0]),
        torch.tensor([3, 2]),
        (12, 12),
        (7, 7),
    )
    assert torch.equal(augment.crop_dihedral_index(*args, dtype=torch.int32).long(), augment.crop_dihedral_index(*args))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
def test_fused_on_cuda_matches_cpu_index() -> None:
    images = torch.randint(0, 256, (6, 32, 32), dtype=torch.uint8)
    x, _ = augment.gather_crop_augment(images.cuda(), torch.arange(6).cuda(), (16, 16), AugmentConfig(), 0.5, 0.25)
    assert x.device.type == "cuda" and x.shape == (6, 1, 16, 16)


@pytest.mark.parametrize("lead", [(1,), (3,), (2, 3)])
def test_leading_planes_share_one_transform(lead) -> None:
    """(N, *lead, H, W) splits (channels, z stacks): every plane of a sample moves alike, as
    random_crop + geometric on the gathered batch would move it."""
    g = torch.Generator().manual_seed(1)
    split = torch.randint(0, 256, (9, *lead, 12, 12), dtype=torch.uint8, generator=g)
    samples = torch.tensor([4, 0, 8, 4, 2, 7])
    for seed in range(4):
        g1, g2 = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        seq = augment.geometric(
            augment.random_crop([split.index_select(0, samples)], (8, 8), generator=g1), AugmentConfig(), generator=g1
        )[0]
        got, _ = augment.gather_augmented(split, samples, (8, 8), AugmentConfig(), generator=g2)
        assert got.shape == (6, *lead, 8, 8)
        assert torch.equal(got, seq)


def test_workspace_reuse_gives_the_same_result_for_any_batch() -> None:
    images = torch.randint(0, 256, (30, 16, 16), dtype=torch.uint8)
    ws = augment.Workspace()
    for batch in (12, 5, 20, 12):
        samples = torch.arange(batch)
        with_ws, _ = augment.gather_crop_augment(
            images,
            samples,
            (10, 10),
            AugmentConfig(),
            0.5,
            0.25,
            generator=torch.Generator().manual_seed(batch),
            workspace=ws,
        )
        fresh, _ = augment.gather_crop_augment(
            images, samples, (10, 10), AugmentConfig(), 0.5, 0.25, generator=torch.Generator().manual_seed(batch)
        )
        assert torch.equal(with_ws, fresh)
    assert ws._buffers["index"].numel() == 20 * 10 * 10  # grown once to the largest batch, then reused


def test_float_split_and_identity_config() -> None:
    """The SSL views gather float batches; with nothing to move the gather is a plain copy."""
    x = torch.randn(5, 1, 8, 8)
    off = AugmentConfig(hflip=False, vflip=False, rot90=False)
    same, _ = augment.gather_augmented(x, torch.arange(5), (8, 8), off)
    assert torch.equal(same, x) and same.data_ptr() != x.data_ptr()
    rotated, _ = augment.gather_augmented(
        x, torch.arange(5), (8, 8), AugmentConfig(hflip=False, vflip=False), generator=torch.Generator().manual_seed(0)
    )
    k = torch.randint(0, 4, (5,), generator=torch.Generator().manual_seed(0))
    for b in range(5):
        assert torch.equal(rotated[b], torch.rot90(x[b], int(k[b]), dims=(-2, -1)))


@pytest.mark.parametrize("cfg", CFGS)
@pytest.mark.parametrize("shape", [(40, 16, 16), (40, 3, 12, 12), (40, 10, 14)])
def test_grouped_path_is_the_reference_reordered(cfg, shape) -> None:
    g = torch.Generator().manual_seed(2)
    images = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)
    mask = torch.randint(0, 5, shape, dtype=torch.uint8, generator=g)
    mean, std = 0.43, 0.21
    for seed in range(3):
        ref = augment.geometric(
            [images.unsqueeze(1), mask.unsqueeze(1)], cfg, generator=torch.Generator().manual_seed(seed)
        )
        got, (got_mask,), order = augment.dihedral_to_float_grouped(
            images, cfg, mean, std, generator=torch.Generator().manual_seed(seed), aligned=(mask,)
        )
        assert sorted(order.tolist()) == list(range(40))
        assert got.shape == (40, 1, *shape[1:]) and got_mask.dtype == torch.uint8
        assert torch.equal(got_mask, ref[1][:, 0][order])
        torch.testing.assert_close(got, augment.to_float(ref[0][:, 0], mean, std)[order], rtol=0, atol=2e-6)


def test_dihedral_view_table_matches_torch_rot90() -> None:
    x = torch.arange(2 * 5 * 5).view(2, 5, 5)
    for code, (dims, transpose) in augment._DIHEDRAL_VIEWS.items():
        want = torch.rot90(x.flip(-1) if code >= 4 else x, code % 4, dims=(-2, -1))
        got = x.flip(dims) if dims else x
        assert torch.equal(got.transpose(-2, -1) if transpose else got, want), code


@pytest.mark.parametrize("mask_target", [False, True])
def test_training_batch_keeps_every_per_sample_tensor_aligned(mask_target) -> None:
    """The CPU path reorders the batch by transform: labels, regions and ids must follow."""
    from mtneuro_lab.data.datamodules import augment_training_batch

    n = 32
    ids = torch.randperm(n)
    images = (ids * 7 % 256).to(torch.uint8)[:, None, None].expand(n, 8, 8).contiguous()
    images[:, 0, 0] = 0  # a marker pixel so the tile is not symmetric
    target = ids[:, None, None].expand(n, 8, 8).contiguous() if mask_target else ids % 4
    batch = {"image": images, "target": target, "region": ids % 4, "index": ids}
    out = augment_training_batch(batch, AugmentConfig(), 0.0, 1.0)
    assert sorted(out["index"].tolist()) == sorted(ids.tolist())
    value = (out["image"] * 255).round().long()[:, 0].amax(dim=(-2, -1))
    assert torch.equal(value, out["index"] * 7 % 256)
    assert torch.equal(out["region"], out["index"] % 4)
    if mask_target:
        assert torch.equal(out["target"].amax(dim=(-2, -1)), out["index"])
    else:
        assert torch.equal(out["target"], out["index"] % 4)
    corners = (out["image"][:, 0] == 0).nonzero()[:, 1:].tolist()
    assert {tuple(c) for c in corners} > {(0, 0)}  # the marker moved for some tiles: augmented
