"""Reference state-dict layouts of torchvision's ResNets and timm's VisionTransformer.

torchvision and timm are not dependencies, so their ``state_dict()`` names and shapes are written
out here from the published architectures, independently of selfsup's modules (including the
classifier head the exported backbone must lack). Backbone and export tests compare against them.
"""

from __future__ import annotations


def _bn(prefix: str, c: int) -> dict[str, tuple[int, ...]]:
    return {
        f"{prefix}.weight": (c,),
        f"{prefix}.bias": (c,),
        f"{prefix}.running_mean": (c,),
        f"{prefix}.running_var": (c,),
        f"{prefix}.num_batches_tracked": (),
    }


def torchvision_resnet_keys(
    blocks: tuple[int, ...], bottleneck: bool, in_chans: int, stem: str, base: int = 64
) -> dict[str, tuple[int, ...]]:
    """state_dict() names -> shapes of torchvision.models.resnet with ``num_classes=1000``."""
    expansion = 4 if bottleneck else 1
    kernel = 7 if stem == "imagenet" else 3
    keys = {"conv1.weight": (base, in_chans, kernel, kernel), **_bn("bn1", base)}
    inplanes = base
    for stage, n in enumerate(blocks):
        planes = base * 2**stage
        stride = 1 if stage == 0 else 2
        for i in range(n):
            p = f"layer{stage + 1}.{i}"
            if bottleneck:
                keys[f"{p}.conv1.weight"] = (planes, inplanes, 1, 1)
                keys.update(_bn(f"{p}.bn1", planes))
                keys[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
                keys.update(_bn(f"{p}.bn2", planes))
                keys[f"{p}.conv3.weight"] = (planes * 4, planes, 1, 1)
                keys.update(_bn(f"{p}.bn3", planes * 4))
            else:
                keys[f"{p}.conv1.weight"] = (planes, inplanes, 3, 3)
                keys.update(_bn(f"{p}.bn1", planes))
                keys[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
                keys.update(_bn(f"{p}.bn2", planes))
            if i == 0 and (stride != 1 or inplanes != planes * expansion):
                keys[f"{p}.downsample.0.weight"] = (planes * expansion, inplanes, 1, 1)
                keys.update(_bn(f"{p}.downsample.1", planes * expansion))
            inplanes = planes * expansion
    keys["fc.weight"] = (1000, inplanes)
    keys["fc.bias"] = (1000,)
    return keys


def timm_vit_keys(
    dim: int, depth: int, in_chans: int, image_size: int, patch: int
) -> dict[str, tuple[int, ...]]:
    """state_dict() names -> shapes of timm's VisionTransformer (class token, 1000-way head)."""
    n = (image_size // patch) ** 2
    keys = {
        "cls_token": (1, 1, dim),
        "pos_embed": (1, 1 + n, dim),
        "patch_embed.proj.weight": (dim, in_chans, patch, patch),
        "patch_embed.proj.bias": (dim,),
    }
    for i in range(depth):
        b = f"blocks.{i}"
        keys.update(
            {
                f"{b}.norm1.weight": (dim,),
                f"{b}.norm1.bias": (dim,),
                f"{b}.attn.qkv.weight": (3 * dim, dim),
                f"{b}.attn.qkv.bias": (3 * dim,),
                f"{b}.attn.proj.weight": (dim, dim),
                f"{b}.attn.proj.bias": (dim,),
                f"{b}.norm2.weight": (dim,),
                f"{b}.norm2.bias": (dim,),
                f"{b}.mlp.fc1.weight": (4 * dim, dim),
                f"{b}.mlp.fc1.bias": (4 * dim,),
                f"{b}.mlp.fc2.weight": (dim, 4 * dim),
                f"{b}.mlp.fc2.bias": (dim,),
            }
        )
    keys.update({"norm.weight": (dim,), "norm.bias": (dim,)})
    keys.update({"head.weight": (1000, dim), "head.bias": (1000,)})
    return keys
