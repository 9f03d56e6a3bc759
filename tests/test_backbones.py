"""Backbones: torchvision parameter names/shapes, stems, channels, width, feature sizes.

torchvision is not installed, so the expected state dict of ``torchvision.models.resnetXX()`` is
written out here from its architecture (layer counts, v1.5 bottleneck), independently of
pretrain/models/backbones.py, and cross-checked against torchvision's published parameter counts.
"""

from __future__ import annotations

import pytest
import torch
from reference_archs import torchvision_resnet_keys

from selfsup.config import ModelConfig
from selfsup.pretrain.models.backbones import build_backbone

LAYERS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3)}


def torchvision_resnet_shapes(depth: int, in_chans: int = 3) -> dict[str, tuple[int, ...]]:
    """State-dict shapes of torchvision's resnet{depth}() without fc."""
    keys = torchvision_resnet_keys(LAYERS[depth], depth == 50, in_chans, "imagenet")
    return {k: v for k, v in keys.items() if not k.startswith("fc.")}


# torchvision's documented parameter counts (with the 1000-class fc) minus that fc
TORCHVISION_PARAMS_NO_FC = {
    18: 11_689_512 - (512 * 1000 + 1000),
    34: 21_797_672 - (512 * 1000 + 1000),
    50: 25_557_032 - (2048 * 1000 + 1000),
}


@pytest.mark.parametrize("depth", [18, 34, 50])
def test_state_dict_matches_torchvision(depth: int) -> None:
    net = build_backbone(ModelConfig(backbone=f"resnet{depth}", stem="imagenet"), 3, 224)
    got = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    expected = torchvision_resnet_shapes(depth)
    assert list(got) == list(expected)  # same names, same order as torchvision's
    assert got == expected
    params = sum(p.numel() for p in net.parameters())
    assert params == TORCHVISION_PARAMS_NO_FC[depth]
    assert net.feature_dim == (2048 if depth == 50 else 512)


def test_state_dict_round_trips_into_fresh_model() -> None:
    cfg = ModelConfig(backbone="resnet_small", stem="imagenet")
    a, b = build_backbone(cfg, 3, 64), build_backbone(cfg, 3, 64)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 64, 64)
    a.eval(), b.eval()
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("stem", "size", "map_side"),
    [("imagenet", 64, 2), ("cifar", 32, 4), ("cifar_s2", 32, 2)],
)
def test_stems_set_the_feature_map_resolution(stem: str, size: int, map_side: int) -> None:
    net = build_backbone(ModelConfig(backbone="resnet18", stem=stem), 3, size)
    fmap = net.forward_features(torch.randn(2, 3, size, size))
    assert fmap.shape == (2, 512, map_side, map_side)
    conv = net.state_dict()["conv1.weight"]
    assert conv.shape[-1] == (7 if stem == "imagenet" else 3)


def test_pooled_output_is_mean_of_feature_map() -> None:
    net = build_backbone(ModelConfig(backbone="resnet_small", stem="cifar"), 1, 16).eval()
    x = torch.randn(3, 1, 16, 16)
    torch.testing.assert_close(net(x), net.forward_features(x).mean(dim=(2, 3)))


@pytest.mark.parametrize("in_chans", [1, 3, 5])
def test_any_input_channel_count(in_chans: int) -> None:
    net = build_backbone(ModelConfig(backbone="resnet_small", stem="cifar_s2"), in_chans, 28)
    assert net.state_dict()["conv1.weight"].shape == (32, in_chans, 3, 3)
    assert net(torch.randn(2, in_chans, 28, 28)).shape == (2, 256)


def test_resnet_small_layout_and_size() -> None:
    net = build_backbone(ModelConfig(backbone="resnet_small", stem="cifar_s2"), 1, 28)
    names = net.state_dict().keys()
    assert {k.split(".")[1] for k in names if k.startswith("layer")} == {"0"}  # 1 block/stage
    widths = [net.state_dict()[f"layer{i}.0.conv1.weight"].shape[0] for i in range(1, 5)]
    assert widths == [32, 64, 128, 256]
    assert 1.1e6 < sum(p.numel() for p in net.parameters()) < 1.3e6


def test_width_multiplier_scales_channels() -> None:
    net = build_backbone(ModelConfig(backbone="resnet50", stem="cifar_s2", width=0.5), 3, 16)
    assert net.feature_dim == 1024
    assert net.state_dict()["layer1.0.conv1.weight"].shape[0] == 32
    assert net(torch.randn(2, 3, 16, 16)).shape == (2, 1024)


def test_bad_names_are_named() -> None:
    with pytest.raises(ValueError, match="resnet99"):
        build_backbone(ModelConfig(backbone="resnet99"), 3, 32)
    with pytest.raises(ValueError, match="model.stem"):
        build_backbone(ModelConfig(backbone="resnet18", stem="tiny"), 3, 32)


def test_vit_names_go_to_the_vit_module() -> None:
    vit = pytest.importorskip("selfsup.pretrain.models.vit")
    cfg = ModelConfig(backbone="vit_tiny", patch_size=4)
    net = build_backbone(cfg, 1, 16)
    ref = vit.build_vit(cfg, 1, 16)
    assert type(net) is type(ref)
    assert net(torch.randn(2, 1, 16, 16)).shape == (2, net.feature_dim)
