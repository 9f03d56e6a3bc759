"""DINO's pieces that are not the method itself: the projection head with its weight-normalised
prototype layer, a ViT forward at another image size (local crops), the last layer's CLS
attention (pictures), and the schedules.

References: Caron et al. 2021, "Emerging Properties in Self-Supervised Vision Transformers", and
its code (facebookresearch/dino: ``vision_transformer.py`` ``DINOHead``,
``interpolate_pos_encoding``; ``main_dino.py`` ``DINOLoss``; ``utils.py`` ``cosine_scheduler``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup.pretrain.models.vit import VisionTransformer


class WeightNormLinear(nn.Module):
    """``x @ (g * v / ||v||).T`` without bias: one prototype per row of ``v`` (``weight_v``
    ``[K, d]``), its length ``weight_g`` ``[K, 1]`` (DINO: ``nn.utils.weight_norm`` of a
    ``Linear(d, K, bias=False)``, ``g`` filled with 1). ``fix_norm``: ``g`` stays 1 (DINO's
    ``norm_last_layer=True``, every prototype a unit vector; a frozen parameter, as there)."""

    def __init__(self, in_dim: int, out_dim: int, fix_norm: bool) -> None:
        super().__init__()
        v = torch.empty(out_dim, in_dim)
        nn.init.kaiming_uniform_(v, a=math.sqrt(5))  # nn.Linear's default, as DINO's last layer
        self.weight_v = nn.Parameter(v)
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1), requires_grad=not fix_norm)

    def weight(self) -> Tensor:
        return self.weight_g * self.weight_v / torch.linalg.vector_norm(self.weight_v, dim=1, keepdim=True)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight())


class DINOHead(nn.Module):
    """``layers`` Linear layers (GELU between, no BN: DINO's ``use_bn_in_head=False``) to the
    bottleneck, L2 normalisation, then the weight-normalised prototype layer ``last_layer``.
    Linear weights start as a truncated normal (std 0.02), biases at 0, as DINO's ``_init_weights``."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int, bottleneck: int, layers: int,
                 norm_last_layer: bool) -> None:  # fmt: skip
        super().__init__()
        dims = [in_dim] + [hidden] * (layers - 1) + [bottleneck]
        mods: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            mods.append(nn.Linear(a, b))
            if i < layers - 1:
                mods.append(nn.GELU())
        self.mlp = nn.Sequential(*mods)
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = WeightNormLinear(bottleneck, out_dim, fix_norm=norm_last_layer)

    def forward(self, x: Tensor) -> Tensor:
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))


def vit_tokens(vit: VisionTransformer, x: Tensor) -> Tensor:
    """Patch tokens of images of any side that is a multiple of the patch size, with the position
    table resized bicubically to their grid (DINO's ``interpolate_pos_encoding``: a local crop's
    patches span the whole table, as its pixels span the whole crop); [B, N, D]."""
    if x.shape[-1] == vit.patch_embed.image_size and x.shape[-2] == x.shape[-1]:
        return vit.embed_patches(x)
    p = vit.patch_size
    if x.shape[-1] % p or x.shape[-2] % p:
        raise ValueError(f"ViT with patch size {p} got images of {tuple(x.shape[-2:])} px")
    g0, d = vit.patch_embed.grid_size, vit.feature_dim
    table = vit.pos_embed[:, 1:, :].reshape(1, g0, g0, d).permute(0, 3, 1, 2)
    table = F.interpolate(table, size=(x.shape[-2] // p, x.shape[-1] // p), mode="bicubic", align_corners=False)
    return vit.patch_embed.proj(x).flatten(2).transpose(1, 2) + table.flatten(2).transpose(1, 2).to(x.dtype)


def features(backbone: nn.Module, x: Tensor) -> Tensor:
    """Backbone features ``[B, feature_dim]`` of images at any size (ResNets pool globally)."""
    if isinstance(backbone, VisionTransformer):
        return backbone.encode(vit_tokens(backbone, x))[:, 0]
    return backbone(x)


@torch.no_grad()
def cls_attention(vit: VisionTransformer, x: Tensor, whole_row: bool = False) -> Tensor:
    """The last block's attention of the class token to every patch, per head:
    ``[B, heads, grid, grid]`` (DINO's ``get_last_selfattention``, class-token row);
    ``whole_row``: the row over every token, class token first, ``[B, heads, 1 + grid^2]``."""
    tokens = vit_tokens(vit, x)
    cls = (vit.cls_token + vit.pos_embed[:, :1, :]).expand(tokens.shape[0], -1, -1)
    h = torch.cat([cls, tokens], dim=1)
    for block in vit.blocks[:-1]:
        h = block(h)
    last = vit.blocks[-1]
    b, n, d = h.shape
    heads = last.attn.num_heads
    q, k, _ = last.attn.qkv(last.norm1(h)).reshape(b, n, 3, heads, d // heads).unbind(2)
    att = torch.einsum("bhd,bnhd->bhn", q[:, 0], k) / math.sqrt(d // heads)
    att = att.softmax(-1)
    if whole_row:
        return att
    return att[:, :, 1:].reshape(b, heads, x.shape[-2] // vit.patch_size, x.shape[-1] // vit.patch_size)


def ramp(k: int, length: int, start: float, end: float) -> float:
    """``start`` at step ``k = 0`` rising linearly to ``end`` at ``k = length``, then ``end``
    (DINO's teacher-temperature warm-up, per step instead of per epoch)."""
    if length <= 0:
        return end
    return start + (end - start) * min(max(k, 0), length) / length


def steps_of(fraction: float, total: int) -> int:
    """Steps in ``fraction`` of a ``total``-step run; at least one when ``fraction > 0``."""
    return max(1, round(fraction * total)) if fraction > 0 else 0
