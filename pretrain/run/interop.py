"""How an exported backbone loads outside selfsup: the exact timm / torchvision calls.

ViTs: every preset (vit_micro included) is timm's ``VisionTransformer`` with a class token and
``global_pool="token"``; timm's ``vit_tiny_patch16_224`` entry point takes the sizes as keyword
arguments, so ``timm.create_model('vit_tiny_patch16_224', patch_size=4, img_size=32, in_chans=3,
num_classes=0, embed_dim=192, depth=12, num_heads=3)`` builds the exact module and
``load_state_dict(weights)`` then finds nothing missing (checked with timm 1.0.31: features equal
to ``selfsup.load_backbone``'s). The export's ``config.json`` also carries timm's own fields
(``architecture``, ``model_args``, ``pretrained_cfg``), so with timm >= 1.0.16 the folder loads
directly: ``timm.create_model('local-dir:<export folder>', pretrained=True)``.

ResNets: the names are torchvision's (and timm's, which shares them). Only the ImageNet stem
(7x7 stride-2 conv + max-pool) at width 1 is torchvision's/timm's ``resnet18/34/50``; the CIFAR
stems (3x3 conv, no max-pool) are not a preset of either, and the card says how to rebuild them.
"""

from __future__ import annotations

from typing import Any

from selfsup.data_info import DataInfo
from selfsup.pretrain.models.backbones import ModelConfig
from selfsup.pretrain.models.vit import VIT_PRESETS

TIMM_VIT_ENTRY = "vit_tiny_patch16_224"  # an entry point whose sizes are all keyword arguments
PRESET_RESNETS = ("resnet18", "resnet34", "resnet50")


def timm_spec(model_cfg: ModelConfig, info: DataInfo) -> dict[str, Any] | None:
    """timm's ``config.json`` fields for this backbone, or None where timm has no such model."""
    name = model_cfg.backbone
    pretrained_cfg = {
        "input_size": [info.channels, info.image_size, info.image_size],
        "mean": list(info.mean), "std": list(info.std), "num_classes": 0,
        "crop_pct": 1.0, "interpolation": "bicubic",
    }  # fmt: skip
    if name in VIT_PRESETS:
        p = VIT_PRESETS[name]
        args = {"patch_size": model_cfg.patch_size, "img_size": info.image_size,
                "in_chans": info.channels, "num_classes": 0, "embed_dim": p.embed_dim,
                "depth": p.depth, "num_heads": p.num_heads, "mlp_ratio": p.mlp_ratio,
                "global_pool": "token", "class_token": True}  # fmt: skip
        return {"architecture": TIMM_VIT_ENTRY, "num_classes": 0, "model_args": args,
                "pretrained_cfg": pretrained_cfg}  # fmt: skip
    if name in PRESET_RESNETS and model_cfg.stem == "imagenet" and model_cfg.width == 1.0:
        return {"architecture": name, "num_classes": 0,
                "model_args": {"in_chans": info.channels, "num_classes": 0},
                "pretrained_cfg": pretrained_cfg}  # fmt: skip
    return None


def _call(name: str, args: dict[str, Any]) -> str:
    return f"timm.create_model('{name}', " + ", ".join(f"{k}={v!r}" for k, v in args.items()) + ")"


def param_naming(model_cfg: ModelConfig, info: DataInfo) -> str:
    """One line: whose names the weights follow and the constructor that takes them."""
    spec = timm_spec(model_cfg, info)
    if model_cfg.backbone in VIT_PRESETS:
        return f"timm VisionTransformer: {_call(spec['architecture'], spec['model_args'])}"
    if spec is not None:
        tv = f"torchvision.models.{model_cfg.backbone}()" + (
            "" if info.channels == 3 else f" with conv1 = nn.Conv2d({info.channels}, 64, 7, 2, 3, bias=False)")
        return f"torchvision/timm ResNet: {tv}, or {_call(spec['architecture'], spec['model_args'])}"
    return ("torchvision ResNet naming (conv1, bn1, layerN.M..., no fc); not a torchvision/timm preset "
            f"(stem={model_cfg.stem}, width={model_cfg.width}, backbone={model_cfg.backbone})")


def loading_snippet(model_cfg: ModelConfig, info: DataInfo, weights_file: str) -> str:
    """The model card's "without selfsup" code: the exact calls for this backbone."""
    spec = timm_spec(model_cfg, info)
    load = f'state = load_file("{weights_file}")\n'
    if model_cfg.backbone in VIT_PRESETS:
        return ("import timm\nfrom safetensors.torch import load_file\n" + load
                + f"model = {_call(spec['architecture'], spec['model_args'])}\n"
                "model.load_state_dict(state)           # strict: nothing missing, nothing extra\n"
                "# or, timm >= 1.0.16, from this folder (reads config.json):\n"
                "model = timm.create_model('local-dir:path/to/this/folder', pretrained=True)\n")
    if spec is not None:
        conv = "" if info.channels == 3 else (
            f"model.conv1 = torch.nn.Conv2d({info.channels}, 64, 7, 2, 3, bias=False)\n")
        return ("import torch, torchvision\nfrom safetensors.torch import load_file\n" + load
                + f"model = torchvision.models.{model_cfg.backbone}()\n" + conv
                + "model.fc = torch.nn.Identity()\n"
                "model.load_state_dict(state)           # strict: the trunk, no classifier\n"
                f"# or: model = {_call(spec['architecture'], spec['model_args'])}; model.load_state_dict(state)\n"
                "# or, timm >= 1.0.16: timm.create_model('local-dir:path/to/this/folder', pretrained=True)\n")
    if model_cfg.backbone not in PRESET_RESNETS or model_cfg.width != 1.0:
        return ("from safetensors.torch import load_file\n" + load
                + "# not a torchvision/timm preset (custom depth or width): use selfsup.load_backbone,\n"
                "# or build a torchvision-style ResNet with these block counts/widths (see the names).\n")
    stride = 1 if model_cfg.stem == "cifar" else 2
    return ("import torch, torchvision\nfrom safetensors.torch import load_file\n" + load
            + f"model = torchvision.models.{model_cfg.backbone}()\n"
            f"model.conv1 = torch.nn.Conv2d({info.channels}, 64, 3, {stride}, 1, bias=False)  # CIFAR stem\n"
            "model.maxpool = torch.nn.Identity()\nmodel.fc = torch.nn.Identity()\n"
            "model.load_state_dict(state)           # strict\n")
