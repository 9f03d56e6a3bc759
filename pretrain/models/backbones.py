"""Image backbones with torchvision (ResNet) parameter names, so exports load without renaming.

``build_backbone(model_cfg, in_chans, image_size)`` returns a module that maps a normalised float
batch ``[B, in_chans, H, W]`` to pooled features ``[B, feature_dim]``; ``forward_features`` gives
the last feature map. The ResNets are written out here because torchvision is not a dependency;
they mirror ``torchvision.models.resnet`` (v1.5: stride on the 3x3 conv of a bottleneck, BN after
every conv, ``downsample.0/1`` shortcut) so that ``resnet18().load_state_dict(sd, strict=False)``
reports only the missing ``fc`` when ``in_chans=3`` and ``width=1``. Small images need a stem that
does not divide the resolution by 4 before the first stage: ``cifar`` (3x3 stride 1, no max-pool)
or ``cifar_s2`` (3x3 stride 2, 4x cheaper, what the CPU demo uses).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from selfsup.pretrain.models.base import Backbone
from selfsup.pretrain.models.vit import VIT_PRESETS, build_vit

STEMS = ("imagenet", "cifar", "cifar_s2")


@dataclass
class ModelConfig:
    backbone: str = "resnet_small"  # resnet_small | resnet18 | resnet34 | resnet50 | vit_micro | vit_tiny | vit_small | vit_base
    stem: str = "cifar"  # imagenet (7x7/2 + maxpool) | cifar (3x3/1) | cifar_s2 (3x3/2)
    width: float = 1.0  # channel width multiplier (ResNets)
    patch_size: int = 4  # ViT patch side in pixels
    init: str = ""  # start from weights: export folder | .safetensors | .pt/.pth | timm:<name>:<file>
    init_strict: bool = True  # a missing / unexpected / mis-shaped backbone tensor is an error

    def check(self) -> None:
        if self.backbone not in known_backbones():
            kind = "ViT" if self.backbone.startswith("vit") else "backbone"
            raise ValueError(
                f"model.backbone: unknown {kind} '{self.backbone}' "
                f"(known: {', '.join(known_backbones())})"
            )
        if self.stem not in STEMS:
            raise ValueError(f"model.stem: '{self.stem}' is not one of {', '.join(STEMS)}")
        if self.width <= 0:
            raise ValueError(f"model.width: must be > 0, got {self.width}")
        if self.patch_size < 1:
            raise ValueError(f"model.patch_size: must be >= 1, got {self.patch_size}")
        if self.init.startswith("timm:") and self.init.count(":") < 2:
            raise ValueError(f"model.init: '{self.init}': timm weights need a local file, timm:<name>:<path>")


class BasicBlock(nn.Module):
    """Two 3x3 convs (ResNet-18/34)."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int, downsample: nn.Module | None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carries the stride, torchvision v1.5), 1x1 expand by 4 (ResNet-50)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int, downsample: nn.Module | None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


# name -> (block, blocks per stage, channels of the first stage before expansion)
ARCHS: dict[str, tuple[type[BasicBlock] | type[Bottleneck], tuple[int, ...], int]] = {
    "resnet_small": (BasicBlock, (1, 1, 1, 1), 32),
    "resnet18": (BasicBlock, (2, 2, 2, 2), 64),
    "resnet34": (BasicBlock, (3, 4, 6, 3), 64),
    "resnet50": (Bottleneck, (3, 4, 6, 3), 64),
}


class ResNet(Backbone):
    """torchvision-compatible ResNet trunk without ``fc``; ``forward`` returns pooled features."""

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: tuple[int, ...],
        base_width: int = 64,
        in_chans: int = 3,
        stem: str = "imagenet",
        width: float = 1.0,
    ):
        super().__init__()
        if stem not in STEMS:
            raise ValueError(f"model.stem: '{stem}' is not one of {', '.join(STEMS)}")
        if in_chans < 1:
            raise ValueError(f"in_chans must be >= 1, got {in_chans}")
        if width <= 0:
            raise ValueError(f"model.width must be > 0, got {width}")
        widths = [max(1, round(base_width * width * 2**i)) for i in range(4)]
        self.inplanes = widths[0]
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(in_chans, widths[0], 7, 2, 3, bias=False)
            self.maxpool: nn.Module = nn.MaxPool2d(3, 2, 1)
        else:
            stride = 1 if stem == "cifar" else 2
            self.conv1 = nn.Conv2d(in_chans, widths[0], 3, stride, 1, bias=False)
            self.maxpool = nn.Identity()
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(block, widths[0], layers[0], 1)
        self.layer2 = self._make_layer(block, widths[1], layers[1], 2)
        self.layer3 = self._make_layer(block, widths[2], layers[2], 2)
        self.layer4 = self._make_layer(block, widths[3], layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = widths[3] * block.expansion
        # torchvision's initialisation, so a fresh backbone behaves like a fresh torchvision one
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(
        self, block: type[BasicBlock] | type[Bottleneck], planes: int, blocks: int, stride: int
    ) -> nn.Sequential:
        downsample = None
        out = planes * block.expansion
        if stride != 1 or self.inplanes != out:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, out, 1, stride, bias=False), nn.BatchNorm2d(out)
            )
        mods = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = out
        mods += [block(out, planes, 1, None) for _ in range(1, blocks)]
        return nn.Sequential(*mods)

    def forward_features(self, x: Tensor) -> Tensor:
        """Last feature map ``[B, feature_dim, h, w]``."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x: Tensor) -> Tensor:
        """Globally average-pooled features ``[B, feature_dim]``."""
        return torch.flatten(self.avgpool(self.forward_features(x)), 1)


def known_backbones() -> tuple[str, ...]:
    return (*ARCHS, *VIT_PRESETS)


def backbone_kind(name: str) -> str:
    """``vit`` or ``resnet``: what a method's heads or decoder can rely on."""
    return "vit" if name in VIT_PRESETS else "resnet"


def build_backbone(model_cfg: ModelConfig, in_chans: int, image_size: int) -> Backbone:
    """Backbone named by ``model_cfg.backbone``; ViTs come from ``selfsup.pretrain.models.vit``."""
    name = model_cfg.backbone
    if name in VIT_PRESETS:
        return build_vit(model_cfg, in_chans, image_size)
    if name not in ARCHS:
        known = ", ".join(known_backbones())
        raise ValueError(f"model.backbone: unknown backbone '{name}' (known: {known})")
    block, layers, base = ARCHS[name]
    return ResNet(block, layers, base, in_chans, model_cfg.stem, model_cfg.width)
