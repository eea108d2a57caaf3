"""Network builders' one-line errors and fallbacks that the model configs never reach:
U-Net levels, timm encoder names, encoder weights that are missing or not in the cache (no
network: the hub is made unreachable), EM U-Net and RSUNet options, a small BasicUNet, and the
ResNet-18 encoder's ``width``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import config_error
from torchvision.models import resnet18

from mtneuro_lab.nets import segmentation
from mtneuro_lab.nets.resnet import ResNet18Encoder, resnet18_of_width
from mtneuro_lab.nets.rsunet import RSUNet
from mtneuro_lab.nets.segmentation import check_encoder_name, em_unet, hub_reachable, net3d, smp_net, unet_levels


def test_unet_levels() -> None:
    assert unet_levels(None) == 3 and unet_levels(5) == 5
    assert config_error(unet_levels, 6) == "model.levels: must be in 1..5, got 6"


def test_timm_encoder_names_are_checked() -> None:
    check_encoder_name("tu-resnet18")
    assert config_error(check_encoder_name, "tu-resnet_nonexistent") == (
        "model.encoder_name: unknown timm encoder 'tu-resnet_nonexistent'"
    )


@pytest.fixture
def no_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """An empty Hugging Face cache, and no connection to the hub (nothing is fetched)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def test_hub_reachable_names_why_not(no_hub: None, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    assert hub_reachable() == "HF_HUB_OFFLINE is set"
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "https://hub.invalid")

    def refuse(address: tuple[str, int], timeout: float) -> None:
        assert address == ("hub.invalid", 443)
        raise ConnectionRefusedError("refused by the test")

    monkeypatch.setattr(segmentation.socket, "create_connection", refuse)
    assert hub_reachable(timeout=0.1) == "hub.invalid unreachable: refused by the test"


def test_encoder_weights_that_do_not_exist_name_the_options(no_hub: None) -> None:
    message = config_error(smp_net, "unet", "resnet18", "nonexistent", 2)
    assert message.startswith("model.encoder_weights: ") and "Available options are: ['imagenet'" in message


def test_weights_not_in_the_cache_and_no_hub_is_one_line(no_hub: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(segmentation, "hub_reachable", lambda timeout=5.0: "test: no network")
    message = config_error(smp_net, "unet", "resnet18", "imagenet", 2)
    assert message.startswith(
        "model.encoder_weights=imagenet: cannot fetch weights for encoder 'resnet18' (test: no network); "
        "run with model.encoder_weights=null"
    )
    monkeypatch.setattr(segmentation, "hub_reachable", lambda timeout=5.0: None)  # reachable, but the fetch fails
    message = config_error(smp_net, "unet", "resnet18", "imagenet", 2)
    assert message.startswith("model.encoder_weights=imagenet: cannot fetch weights for encoder 'resnet18' (")
    assert "test: no network" not in message


def test_em_unet_options() -> None:
    assert config_error(em_unet, "unet3d", 3, 0, None, (8, 32, 32)) == "model.base_channels: must be >= 1, got 0"
    assert config_error(em_unet, "basic_unet", 3, 2, 3, (16, 32, 32)) == (
        "model.levels: basic_unet always has 4 levels; leave model.levels=null, got 3"
    )
    assert config_error(em_unet, "basic_unet", 3, 2, None, (8, 32, 32)).startswith(
        "task.crop: samples of 8x32x32 must be divisible by 16x16x16; basic_unet halves every axis 4 times"
    )
    assert config_error(em_unet, "vnet", 3, 2, None, (8, 32, 32)) == (
        "model.arch: on EM tasks must be unet3d or basic_unet, got 'vnet'"
    )
    net = em_unet("basic_unet", 3, 2, 4, (16, 32, 32))
    assert net(torch.zeros(1, 1, 16, 32, 32)).shape == (1, 3, 16, 32, 32)
    assert (
        config_error(net3d, "swin", 3, 2, 2) == "model.arch: must be one of unet3d, vnet_light, highresnet, got 'swin'"
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"widths": [8]}, "model.net.widths: need at least two positive widths, got [8]"),
        ({"widths": [8, 0]}, "model.net.widths: need at least two positive widths, got [8, 0]"),
        ({"widths": [4, 8]}, "model.net.downsample: null needs the crop (input_shape) to choose factors"),
        (
            {"widths": [4, 8], "downsample": [[1, 3, 2]]},
            "model.net.downsample[0]: expected [dz, dy, dx] with each 1 or 2, got [1, 3, 2]",
        ),
        (
            {"widths": [4, 8], "downsample": [[1, 2]]},
            "model.net.downsample[0]: expected [dz, dy, dx] with each 1 or 2, got [1, 2]",
        ),
        (
            {"widths": [4, 8], "downsample": [[1, 2, 2], [1, 2, 2]]},
            "model.net.downsample: 2 factors for 1 down-samplings (len(model.net.widths) - 1)",
        ),
    ],
)
def test_rsunet_options_name_their_key(kwargs: dict, message: str) -> None:
    assert config_error(RSUNet, **kwargs) == message


def test_rsunet_with_explicit_factors() -> None:
    net = RSUNet(out_channels=2, widths=[2, 4], downsample=[[2, 2, 2]], input_shape=(4, 8, 8))
    assert net.divisor == (2, 2, 2)
    assert net(torch.zeros(1, 1, 4, 8, 8)).shape == (1, 2, 4, 8, 8)


def test_resnet_width_scales_every_stage_and_keeps_the_checkpoint_keys() -> None:
    torch.manual_seed(0)
    wide, narrow = ResNet18Encoder(tile_size=64), ResNet18Encoder(tile_size=64, width=16)
    assert (wide.out_dim, narrow.out_dim) == (512, 128)
    assert narrow(torch.zeros(2, 1, 64, 64)).shape == (2, 128)
    big, small = wide.state_dict(), narrow.state_dict()
    assert big.keys() == small.keys()  # same module names: same checkpoint layout at any width
    for key, value in big.items():  # every conv and norm a quarter as wide (conv1 takes 1 channel in both)
        if value.ndim == 4:
            assert small[key].shape[0] * 4 == value.shape[0] and small[key].shape[1] in (1, value.shape[1] // 4), key
    ratio = sum(p.numel() for p in wide.parameters()) / sum(p.numel() for p in narrow.parameters())
    assert 15 < ratio < 16.1  # convs scale with width squared
    # torchvision's initialisation of the rebuilt stages (kaiming, fan_out), not PyTorch's default
    conv = narrow.net.layer4[1].conv2.weight
    assert conv.std().item() == pytest.approx((2 / (128 * 9)) ** 0.5, rel=0.1)
    # width 64 is torchvision's ResNet-18 itself
    assert {k: v.shape for k, v in resnet18_of_width(64).state_dict().items()} == {
        k: v.shape for k, v in resnet18(weights=None).state_dict().items()
    }


@pytest.mark.parametrize("width", [0, -16, 2.5, True])
def test_a_bad_resnet_width_is_one_line(width: object) -> None:
    assert config_error(ResNet18Encoder, width=width) == (
        f"model.width: must be a positive integer (ResNet-18: 64), got {width!r}"
    )
