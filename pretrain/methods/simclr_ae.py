"""SimCLR with a reconstruction term: contrastive invariance plus the information a decoder needs.

The notes' first lecture names the trade-off this method addresses: invariance (SimCLR's views
agree) against sufficiency (the code keeps what a downstream task needs). SimCLR alone throws
away what its augmentations vary; on Fashion-MNIST that includes shape detail that separates
shirts from T-shirts, and ``selfsup eval --protocols properties`` measures the loss (SimCLR's
I(factor; z) bound falls below raw pixels'). A decoder that must redraw each view from the
backbone's feature map keeps that information in the backbone, while the InfoNCE term still
organises it by instance. This is the contrastive + reconstruction combination of CAN (Mishra et
al. 2022, "A simple, efficient and scalable contrastive masked autoencoder"), here with SimCLR's
full-image views and the DAE's convolutional decoder instead of masked patches.

Loss: ``InfoNCE(z1, z2) + recon_weight * MSE(decoder(f(v_i)), target_i)``, averaged over both
views, where ``target`` is the view itself (``recon_target: view``) or the un-augmented image
(``image``: predict the whole garment from a crop), in normalised pixel units, at
``recon_size`` pixels (area-downsampled; 0 = the view's size). Decoding at half size with a narrow
decoder (``decoder_width``) costs about a fifth of the encoder's forward pass.

Everything else is SimCLR's (``method.simclr_ae`` has SimCLR's keys): negatives from every process,
the projection head, the exported backbone. With ``recon_weight: 0`` it is SimCLR.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup.augment.views import Views
from selfsup.data_info import DataInfo
from selfsup.pretrain.methods.base import Logs
from selfsup.pretrain.methods.dae import ConvDecoder, probe_feature_map, upsampling_plan
from selfsup.pretrain.methods.registry import register_method
from selfsup.pretrain.methods.simclr import SimCLR, SimCLRConfig

RECON_TARGETS = ("view", "image")


@dataclass
class SimCLRAEConfig(SimCLRConfig):
    recon_weight: float = 1.0  # weight of the reconstruction MSE beside InfoNCE
    recon_target: str = "view"  # view (the augmented view) | image (the un-augmented image)
    recon_size: int = 14  # side of the reconstruction in pixels; 0 = the views' size
    code_channels: int = 32  # 1x1 bottleneck on the backbone's last feature map
    decoder_width: int = 64  # channels of the decoder's first stage (halved per stage, >= 32)

    def check(self) -> None:
        try:
            super().check()
        except ValueError as e:  # SimCLR's checks name method.simclr.*; this section is simclr_ae
            raise ValueError(str(e).replace("method.simclr.", "method.simclr_ae.")) from None
        if self.recon_weight < 0:
            raise ValueError(f"method.simclr_ae.recon_weight must be >= 0, got {self.recon_weight}")
        if self.recon_target not in RECON_TARGETS:
            raise ValueError(
                f"method.simclr_ae.recon_target: '{self.recon_target}' is not one of {', '.join(RECON_TARGETS)}"
            )
        for key in ("recon_size", "code_channels", "decoder_width"):
            if getattr(self, key) < (0 if key == "recon_size" else 1):
                raise ValueError(f"method.simclr_ae.{key} must be >= {0 if key == 'recon_size' else 1}")


@register_method("simclr_ae", SimCLRAEConfig, backbone="resnet")
class SimCLRAE(SimCLR):
    """SimCLR + a convolutional decoder on the backbone's feature map (see the module docstring)."""

    def __init__(self, cfg: SimCLRAEConfig, backbone: nn.Module, views: Views, info: DataInfo):
        super().__init__(cfg, backbone, views, info)
        for key in ("grad_cache_chunk", "small_crops"):
            if getattr(cfg, key):
                raise ValueError(f"method.simclr_ae.{key} is not supported (the decoder needs the two views' feature maps)")
        self.plain_views = views.plain()
        size = cfg.recon_size or views.size
        if size > views.size:
            raise ValueError(f"method.simclr_ae.recon_size={size} is larger than the views ({views.size} px)")
        self.recon_px = size
        fmap = probe_feature_map(backbone, info.channels, views.size)
        if fmap.dim() != 4 or fmap.shape[2] != fmap.shape[3]:
            raise ValueError(f"method.simclr_ae needs a square [B, C, h, w] feature map, got {tuple(fmap.shape)}")
        plan = upsampling_plan(fmap.shape[2], size)
        self.decoder = ConvDecoder(fmap.shape[1], cfg.code_channels, info.channels, plan,
                                   width=cfg.decoder_width)  # fmt: skip

    def _target(self, x: Tensor) -> Tensor:
        return x if x.shape[-1] == self.recon_px else F.adaptive_avg_pool2d(x, self.recon_px)

    def forward(self, images: Tensor, *, embed_only: bool = False) -> tuple[Tensor, Logs] | Tensor:
        if embed_only:
            return self.embed(images)
        v1, v2 = self.make_views(images)
        fmap = self.backbone.forward_features(torch.cat([v1, v2]))
        z1, z2 = self.head(fmap.mean((2, 3))).chunk(2)
        loss, logs = self._loss(z1, z2)
        if self.cfg.recon_weight == 0:
            return loss, logs
        with torch.no_grad():
            if self.cfg.recon_target == "image":
                clean = self._target(self.plain_views(images, n_views=1)[0])
                target = torch.cat([clean, clean])  # the same target for both views
            else:
                target = self._target(torch.cat([v1, v2]))
        recon = self.decoder(fmap)
        mse = (recon.float() - target.float()).pow(2).mean()
        logs["infonce"] = logs["loss"]
        logs["recon_mse"] = mse.detach()
        total = loss + self.cfg.recon_weight * mse
        logs["loss"] = total.detach()
        return total, logs
