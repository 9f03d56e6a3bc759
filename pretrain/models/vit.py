"""Vision Transformer backbone with timm's parameter names and fixed 2-D sin-cos positions.

Parameter names match ``timm.models.vision_transformer.VisionTransformer`` built with
``num_classes=0, global_pool="token"`` (cls_token, pos_embed, patch_embed.proj, blocks.N.norm1,
blocks.N.attn.qkv, blocks.N.attn.proj, blocks.N.norm2, blocks.N.mlp.fc1/fc2, norm), so an exported
state dict loads into timm without renaming. Position embeddings are the fixed sin-cos table of
MAE (He et al. 2021): stored as a frozen parameter so the name and shape stay timm's while the
optimiser never moves it.

The pieces the masked autoencoder needs (``embed_patches``, ``encode``) are public so MAE can run
the encoder on the visible patches only, without a second copy of the transformer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from selfsup.pretrain.models.base import Backbone


class ViTSpec(Protocol):
    """What ``build_vit`` reads of a ``ModelConfig``."""

    backbone: str
    patch_size: int


@dataclass(frozen=True)
class ViTPreset:
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0


# vit_micro is not a timm model: a CPU-sized encoder for tests and demos that must finish in minutes.
VIT_PRESETS: dict[str, ViTPreset] = {
    "vit_micro": ViTPreset(128, 4, 4),
    "vit_tiny": ViTPreset(192, 12, 3),
    "vit_small": ViTPreset(384, 12, 6),
    "vit_base": ViTPreset(768, 12, 12),
}


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """[len(positions), dim] table: sin of the first half of frequencies, cos of the second."""
    if dim % 2:
        raise ValueError(f"sin-cos embedding needs an even dimension, got {dim}")
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    angles = positions.to(torch.float64).reshape(-1, 1) * omega.reshape(1, -1)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def sincos_2d(dim: int, grid_size: int, cls_token: bool = True) -> torch.Tensor:
    """[1, (1+) grid_size**2, dim] MAE position table: half the channels encode the row, half the
    column; the class token (if any) gets zeros. Row-major patch order, as ``patchify`` uses."""
    if dim % 4:
        raise ValueError(
            f"2-D sin-cos position embedding needs a dimension divisible by 4, got {dim}"
        )
    coords = torch.arange(grid_size)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    # MAE's reference code puts the width (column) coordinate in the first half of the channels.
    table = torch.cat([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], dim=1)
    if cls_token:
        table = torch.cat([torch.zeros(1, dim, dtype=table.dtype), table], dim=0)
    return table.unsqueeze(0).float()


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens with one strided convolution (timm's ``patch_embed``)."""

    def __init__(self, image_size: int, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        if patch_size <= 0:
            raise ValueError(f"model.patch_size must be > 0, got {patch_size}")
        if image_size % patch_size:
            raise ValueError(
                f"image size {image_size} is not divisible by model.patch_size={patch_size}: "
                f"pick a patch size that divides {image_size} (e.g. "
                f"{', '.join(str(p) for p in range(2, image_size) if image_size % p == 0)})"
            )
        self.image_size = image_size
        self.patch_size = patch_size
        self.grid_size = image_size // patch_size
        self.num_patches = self.grid_size**2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"ViT built for {self.image_size}x{self.image_size} images got {tuple(x.shape[-2:])}"
            )
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embedding width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).unbind(2)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        )
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block (timm's ``Block`` without layer scale or drop path)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def init_transformer_weights(module: nn.Module) -> None:
    """MAE's initialisation: xavier-uniform linears, zero biases, unit LayerNorms."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class VisionTransformer(Backbone):
    """ViT encoder; ``forward`` returns the normalised class token (timm's default pooling)."""

    def __init__(
        self,
        image_size: int,
        patch_size: int,
        in_chans: int,
        embed_dim: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        if in_chans <= 0:
            raise ValueError(f"in_chans must be > 0, got {in_chans}")
        self.patch_embed = PatchEmbed(image_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(
            sincos_2d(embed_dim, self.patch_embed.grid_size), requires_grad=False
        )
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.feature_dim = embed_dim
        self.in_chans = in_chans
        self.apply(init_transformer_weights)
        # MAE initialises the patch projection like a linear layer on the flattened patch.
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)

    def no_weight_decay(self) -> set[str]:
        """timm's convention: learned tokens and position tables are not decayed."""
        return {"cls_token", "pos_embed"}

    @property
    def patch_size(self) -> int:
        return self.patch_embed.patch_size

    @property
    def num_patches(self) -> int:
        return self.patch_embed.num_patches

    def embed_patches(self, x: torch.Tensor) -> torch.Tensor:
        """Patch tokens with their position embedding added, no class token: [B, N, D]."""
        return self.patch_embed(x) + self.pos_embed[:, 1:, :]

    def encode(self, patch_tokens: torch.Tensor) -> torch.Tensor:
        """Prepend the class token and run the transformer on any subset of patch tokens."""
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(patch_tokens.shape[0], -1, -1)
        x = torch.cat([cls, patch_tokens], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """All tokens after the final norm: [B, 1 + N, D]."""
        return self.encode(self.embed_patches(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)[:, 0]


def build_vit(model_cfg: ViTSpec, in_chans: int, image_size: int) -> VisionTransformer:
    """ViT named by ``model_cfg.backbone`` (vit_micro | vit_tiny | vit_small | vit_base)."""
    preset = VIT_PRESETS.get(model_cfg.backbone)
    if preset is None:
        raise ValueError(
            f"model.backbone: unknown ViT '{model_cfg.backbone}' (known: {', '.join(VIT_PRESETS)})"
        )
    return VisionTransformer(
        image_size=image_size,
        patch_size=model_cfg.patch_size,
        in_chans=in_chans,
        embed_dim=preset.embed_dim,
        depth=preset.depth,
        num_heads=preset.num_heads,
        mlp_ratio=preset.mlp_ratio,
    )
