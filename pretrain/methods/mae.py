"""Masked autoencoder (He et al. 2021): reconstruct the pixels of randomly hidden patches.

Each image's patches are masked independently by shuffling the patch indices with uniform noise
and keeping the first ``(1 - mask_ratio) * N``. The ViT encoder (``self.backbone``, the part that
is evaluated and exported) sees only the visible patches; a narrower decoder gets the encoded
visible tokens plus a shared learned mask token at every hidden position, restored to the original
order, and predicts all patches. The loss is the mean squared error over the masked patches only
(predicting visible pixels would be trivial), optionally against per-patch normalised pixels
(``norm_pix_loss``), which the paper found gives better features.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from selfsup.augment.views import Views
from selfsup.data_info import DataInfo
from selfsup.pretrain.methods.base import Logs, Method
from selfsup.pretrain.methods.registry import register_method
from selfsup.pretrain.models.vit import (
    Block,
    VisionTransformer,
    init_transformer_weights,
    sincos_2d,
)


@dataclass
class MAEConfig:
    mask_ratio: float = 0.75
    decoder_dim: int = 128
    decoder_depth: int = 2
    decoder_heads: int = 4
    norm_pix_loss: bool = False

    def check(self) -> None:
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"method.mae.mask_ratio must be in (0, 1), got {self.mask_ratio}")
        for key in ("decoder_dim", "decoder_depth", "decoder_heads"):
            if getattr(self, key) < 1:
                raise ValueError(f"method.mae.{key} must be >= 1, got {getattr(self, key)}")
        if self.decoder_dim % self.decoder_heads:
            raise ValueError(
                f"method.mae.decoder_dim={self.decoder_dim} must be divisible by "
                f"method.mae.decoder_heads={self.decoder_heads}"
            )


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, N, p*p*C], patches in row-major order, pixels (row, col, channel)."""
    b, c, h, w = images.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"image size {h}x{w} is not divisible by patch size {p}")
    x = images.reshape(b, c, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(patches: torch.Tensor, patch_size: int, channels: int) -> torch.Tensor:
    """Inverse of ``patchify`` for square images: [B, N, p*p*C] -> [B, C, H, W]."""
    b, n, d = patches.shape
    p = patch_size
    grid = round(n**0.5)
    if grid * grid != n or d != p * p * channels:
        raise ValueError(
            f"cannot unpatchify {n} patches of {d} values with patch size {p} and {channels} "
            f"channels (need a square number of patches of {p * p * channels} values)"
        )
    x = patches.reshape(b, grid, grid, p, p, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, channels, grid * p, grid * p)


def num_visible(num_patches: int, mask_ratio: float) -> int:
    """Patches the encoder sees; errors when the ratio would leave none visible or none masked."""
    if not 0.0 < mask_ratio < 1.0:
        raise ValueError(f"method.mae.mask_ratio must be in (0, 1), got {mask_ratio}")
    keep = int(num_patches * (1.0 - mask_ratio))
    if keep < 1 or keep >= num_patches:
        raise ValueError(
            f"method.mae.mask_ratio={mask_ratio} with {num_patches} patches leaves {keep} visible: "
            f"need at least one visible and one masked patch"
        )
    return keep


class Masking(NamedTuple):
    ids_keep: torch.Tensor  # [B, K] indices of the visible patches (in shuffled order)
    ids_restore: torch.Tensor  # [B, N] where each original patch sits in the shuffled order
    mask: torch.Tensor  # [B, N] 1.0 = masked, 0.0 = visible, in the original patch order


def random_masking(
    batch: int,
    num_patches: int,
    mask_ratio: float,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> Masking:
    """Independent uniform random mask per sample by argsort of noise (exactly K kept each)."""
    keep = num_visible(num_patches, mask_ratio)
    noise = torch.rand(batch, num_patches, device=device, generator=generator)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = torch.ones(batch, num_patches, device=device)
    mask[:, :keep] = 0.0
    return Masking(ids_shuffle[:, :keep], ids_restore, gather_tokens(mask, ids_restore))


def gather_tokens(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Per-sample index along dim 1: ``out[b, i] = x[b, ids[b, i]]`` for [B, N] or [B, N, D]."""
    if x.dim() == 2:
        return torch.gather(x, 1, ids)
    return torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def masked_patch_loss(
    pred: torch.Tensor, images: torch.Tensor, mask: torch.Tensor, patch_size: int, norm_pix: bool
) -> torch.Tensor:
    """Mean squared error per patch, averaged over the masked patches only (fp32 or wider)."""
    target = patch_targets(images, patch_size, norm_pix)
    per_patch = ((pred.to(target.dtype) - target) ** 2).mean(dim=-1)
    return (per_patch * mask).sum() / mask.sum()


def patch_targets(images: torch.Tensor, patch_size: int, norm_pix: bool) -> torch.Tensor:
    """Patchified targets; with ``norm_pix`` each patch is standardised by its own mean/var."""
    wide = torch.promote_types(images.dtype, torch.float32)
    target = patchify(images.to(wide), patch_size)
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1e-6) ** 0.5
    return target


class MAEDecoder(nn.Module):
    """Light transformer over all positions: encoded visible tokens + mask tokens -> pixels."""

    def __init__(
        self, encoder_dim: int, num_patches: int, patch_values: int, cfg: MAEConfig
    ) -> None:
        super().__init__()
        if cfg.decoder_depth < 1 or cfg.decoder_dim < 1:
            raise ValueError(
                f"method.mae.decoder_depth and decoder_dim must be >= 1, got "
                f"{cfg.decoder_depth} and {cfg.decoder_dim}"
            )
        grid = round(num_patches**0.5)
        self.embed = nn.Linear(encoder_dim, cfg.decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.decoder_dim))
        self.pos_embed = nn.Parameter(sincos_2d(cfg.decoder_dim, grid), requires_grad=False)
        self.blocks = nn.ModuleList(
            Block(cfg.decoder_dim, cfg.decoder_heads) for _ in range(cfg.decoder_depth)
        )
        self.norm = nn.LayerNorm(cfg.decoder_dim, eps=1e-6)
        self.pred = nn.Linear(cfg.decoder_dim, patch_values)
        self.apply(init_transformer_weights)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """latent [B, 1+K, D_enc] (class token first) -> predictions [B, N, p*p*C]."""
        x = self.embed(latent)
        b, n = ids_restore.shape
        masked = self.mask_token.to(x.dtype).expand(b, n - (x.shape[1] - 1), -1)
        patches = gather_tokens(torch.cat([x[:, 1:], masked], dim=1), ids_restore)
        x = torch.cat([x[:, :1], patches], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.pred(self.norm(x))[:, 1:]


@register_method("mae", MAEConfig, backbone="vit")
class MAE(Method):
    """Masked autoencoder: ViT encoder on the visible patches, light decoder, masked-patch MSE."""

    reconstructs = True

    def __init__(self, cfg: MAEConfig, backbone: nn.Module, views: Views, info: DataInfo) -> None:
        super().__init__(cfg, backbone, views, info)
        if not isinstance(backbone, VisionTransformer):
            raise ValueError(f"method.name=mae needs a ViT backbone, got {type(backbone).__name__}")
        self.patch_size = self.backbone.patch_size
        self.channels = info.channels
        num_visible(self.backbone.num_patches, self.cfg.mask_ratio)  # fail before training
        self.decoder = MAEDecoder(
            self.backbone.feature_dim,
            self.backbone.num_patches,
            self.patch_size**2 * info.channels,
            self.cfg,
        )
        # Grids show the un-augmented images: same size and normalisation, no random crop/flip.
        self.plain_views = views.plain()

    def no_weight_decay(self) -> set[str]:
        """Parameter names (last component) the optimiser leaves undecayed: the learned tokens."""
        return {"cls_token", "pos_embed", "mask_token"}

    def predict(
        self, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, Masking]:
        """Mask ``x`` (normalised float), encode the visible patches, predict every patch."""
        tokens = self.backbone.embed_patches(x)
        masking = random_masking(
            x.shape[0], tokens.shape[1], self.cfg.mask_ratio, x.device, generator
        )
        latent = self.backbone.encode(gather_tokens(tokens, masking.ids_keep))
        return self.decoder(latent, masking.ids_restore), masking

    def loss(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        pred, masking = self.predict(x, generator)
        return masked_patch_loss(pred, x, masking.mask, self.patch_size, self.cfg.norm_pix_loss)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, Logs]:
        loss = self.loss(self.views(images, n_views=1)[0])
        return loss, {}  # the loop logs the loss itself, averaged over ranks

    @property
    def reconstruction_caption(self) -> str:
        """What the reconstruction row of the picture shows (drawn on the grid)."""
        if self.cfg.norm_pix_loss:
            return ("hidden patches: the predicted standardised pixels (norm_pix_loss) shown at the mean "
                    "and std of the image's visible patches; each hidden patch's own statistics are unknown "
                    "to the model and not used")  # fmt: skip
        return "hidden patches: the predicted pixels; visible patches: the input"

    @torch.no_grad()
    def anomaly_score(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Per-image error in the space the decoder is trained in: mean over the hidden patches of
        the squared difference between prediction and target (with ``norm_pix_loss`` the target
        is the patch standardised by its own mean/var, so the prediction, made from the visible
        patches only, is never de-normalised with the statistics of the patch it is scored on)."""
        x = self.plain_views(images, n_views=1)[0]
        pred, masking = self.predict(x, generator)
        target = patch_targets(x, self.patch_size, self.cfg.norm_pix_loss)
        per_patch = ((pred.to(target.dtype) - target) ** 2).mean(dim=-1)
        return (per_patch * masking.mask).sum(1) / masking.mask.sum(1)

    @torch.no_grad()
    def reconstruct(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """Un-augmented images, their masked version (hidden patches grey) and the prediction
        pasted into the hidden patches, all as float images in [0, 1] (see
        ``reconstruction_caption`` for how a norm_pix prediction is shown)."""
        x = self.plain_views(images, n_views=1)[0]
        pred, masking = self.predict(x, generator)
        pred = pred.float()
        if self.cfg.norm_pix_loss:  # de-standardise with the VISIBLE patches' statistics only
            patches = patchify(x.float(), self.patch_size)
            seen = (1 - masking.mask).unsqueeze(-1)  # [B, N, 1]
            count = seen.sum(dim=1, keepdim=True) * patches.shape[-1]
            mean = (patches * seen).sum(dim=(1, 2), keepdim=True) / count
            var = (((patches - mean) ** 2) * seen).sum(dim=(1, 2), keepdim=True) / (count - 1).clamp(min=1)
            pred = pred * (var + 1e-6) ** 0.5 + mean
        shown = self.to_unit(x.float())
        predicted = self.to_unit(unpatchify(pred, self.patch_size, self.channels))
        hidden = unpatchify(
            masking.mask.unsqueeze(-1).expand(-1, -1, pred.shape[-1]),
            self.patch_size,
            self.channels,
        )
        return {
            "input": shown.clamp(0, 1),
            "corrupted": (shown * (1 - hidden) + 0.5 * hidden).clamp(0, 1),
            "reconstruction": (shown * (1 - hidden) + predicted * hidden).clamp(0, 1),
        }
