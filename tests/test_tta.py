"""Flip test-time augmentation (``task.tta=flips``): exact for a predictor that knows the answer,
affinity channels realigned by their offset, and wired into the EM method's val/test inference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_em_task_edges import SPLITS, _message

from mtneuro_lab.data import targets
from mtneuro_lab.data.em import EMTask
from mtneuro_lab.decoding.tta import flip_averaged

OFFSETS = [(1, 0, 0), (0, 1, 0), (0, 0, 1), (0, 0, 3), (2, -2, 0)]


def _labels(seed: int = 0) -> torch.Tensor:
    """Blocky ids ``(1, 1, 6, 12, 12)`` with a few zeros (boundary): every affinity is 0 somewhere, 1 elsewhere."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 5, (3, 4, 4))
    return torch.from_numpy(coarse.repeat(2, 0).repeat(3, 1).repeat(3, 2)).float()[None, None]


def _oracle(offsets: list[tuple[int, int, int]]) -> torch.Tensor:
    """A 'network' whose input IS the label volume: it outputs the exact affinity logits (+-4)."""

    def predict(x: torch.Tensor) -> torch.Tensor:
        aff, _ = targets.affinities(x[:, 0].long(), offsets)
        return 8 * aff - 4

    return predict  # type: ignore[return-value]


def test_flip_average_of_an_exact_affinity_predictor_is_exact() -> None:
    """Each flipped variant, flipped back and shifted by its channel's offset, predicts the same
    edges; a wrong shift (or none) would average 0s and 1s into values strictly between."""
    x = _labels()
    plain = _oracle(OFFSETS)(x)
    averaged = flip_averaged(_oracle(OFFSETS), OFFSETS)(x)
    assert torch.equal(averaged, plain)
    assert set(plain.unique().tolist()) == {-4.0, 4.0}


def test_without_the_shift_the_average_would_blur_edges() -> None:
    """The same predictor averaged as if its channels were point-wise: boundaries come out blurred."""
    x = _labels()
    plain = _oracle(OFFSETS)(x)
    naive = flip_averaged(_oracle(OFFSETS), [(0, 0, 0)] * len(OFFSETS))(x)
    assert not torch.equal(naive, plain)
    assert ((naive > -4) & (naive < 4)).any()


def test_pointwise_channels_average_plain_flips() -> None:
    """BC/BCD channels: a flip-equivariant predictor is unchanged, a position-biased one is symmetrised."""
    x = torch.randn(2, 1, 4, 6, 6)
    assert torch.allclose(flip_averaged(lambda t: 3 * t, [(0, 0, 0)])(x), 3 * x)
    ramp = torch.arange(6.0).view(1, 1, 1, 1, 6)
    out = flip_averaged(lambda t: t * 0 + ramp, [(0, 0, 0)])(x)
    assert torch.allclose(out, torch.full_like(out, 2.5))


def test_partly_flipped_diagonal_offsets_skip_the_variant() -> None:
    """Offset (2, -2, 0) is read from the identity, x, z+y and z+y+x flips only (a z-only flip
    predicts direction (2, 2, 0)); the z+y ones are shifted and miss their border rows."""
    z, y, x = torch.meshgrid(torch.arange(4.0), torch.arange(5.0), torch.arange(5.0), indexing="ij")
    volume = (100 * z + 10 * y + x)[None, None]

    def corner(t: torch.Tensor) -> torch.Tensor:  # every voxel holds the corner value: names the flip
        return t[:, :, :1, :1, :1].expand_as(t).clone()

    out = flip_averaged(corner, [(2, -2, 0)])(volume)[0, 0]
    # identity 0, x flip 4, z+y flips 300 + 40, z+y+x 344
    assert out[2, 0, 0] == pytest.approx((0 + 4 + 340 + 344) / 4)
    assert out[0, 0, 0] == pytest.approx((0 + 4) / 2)  # z < 2: no shifted variant reaches it
    assert out[3, 4, 4] == pytest.approx((0 + 4) / 2)  # y >= 3 likewise (dy = -2)


def test_channel_count_mismatch_is_one_line() -> None:
    with pytest.raises(Exception, match=r"^task.tta: the network predicts 2 channels, offsets name 3$"):
        flip_averaged(lambda t: torch.zeros(1, 2, *t.shape[2:]), [(0, 0, 0)] * 3)(torch.zeros(1, 1, 2, 2, 2))


def test_task_option() -> None:
    assert _message(tta="rot90") == "task.tta: must be one of none, flips, got 'rot90'"
    task = EMTask("t", SPLITS, crop=[4, 8, 8], tta="flips", offsets=[[0, 0, 3]])
    assert task.tta == "flips"
    assert task.channel_offsets == [(1, 0, 0), (0, 1, 0), (0, 0, 1), (0, 0, 3)]
    assert EMTask("t", SPLITS, crop=[4, 8, 8], target="bcd").channel_offsets == [(0, 0, 0)] * 3


def test_the_em_method_predicts_val_and_test_volumes_with_the_flip_average() -> None:
    """``task.tta=flips`` reaches sliding-window inference (and so validation, test and the
    threshold search); ``none`` is one pass of the network."""
    from conftest import build as components
    from test_em_methods import SMALL, TINY_RSUNET

    from mtneuro_lab.decoding.postprocess import sliding_window_predict

    torch.manual_seed(0)
    flips = components("task=snemi3d", *SMALL, *TINY_RSUNET, "task.tta=flips").method.eval()
    plain = components("task=snemi3d", *SMALL, *TINY_RSUNET).method.eval()
    plain.load_state_dict(flips.state_dict())
    image = torch.randn(1, 1, *flips.input_shape)
    expected = sliding_window_predict(
        flip_averaged(plain, plain.em_task.channel_offsets), image, plain.input_shape, activation=plain.em_task.activate
    )
    assert torch.allclose(flips.predict_volume(image), expected, atol=1e-6)
    assert not torch.allclose(plain.predict_volume(image), expected, atol=1e-3)
