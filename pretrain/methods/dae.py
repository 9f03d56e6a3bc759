"""Denoising autoencoder (Vincent et al. 2008): reconstruct the clean image from a corrupted one.

The encoder is one of pretrain/'s ResNets (``self.backbone``, so its pooled features are evaluated
and exported exactly like SimCLR's). Its last feature map goes through a 1x1 bottleneck
(``method.dae.code_channels``) and a decoder of stride-2 transposed convolutions that mirrors the
encoder's downsampling back to exactly the input size; the plan is made, and checked with a dry
run, when the method is built, so a decoder that cannot reach the input size fails before training.

Corruption (additive Gaussian, multiplicative Gaussian, masked squares, salt-and-pepper) comes from
``selfsup.augment.corrupt`` and is applied to the normalised image; the target is always the clean
normalised image. The loss is MSE or one of the robust losses of ``ae_losses.py`` (L1, Huber,
correntropy, Cauchy: large residuals from heavy noise or outlier pixels pull less).

With ``method.dae.corrupt.kind: none`` nothing is corrupted and this is the plain undercomplete
autoencoder: the code (bottleneck) must then be smaller than the image, otherwise the network could
learn the identity, so that combination is rejected at construction.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from selfsup.augment.corrupt import CorruptConfig, check_corrupt_config, corrupt
from selfsup.augment.views import Views
from selfsup.data_info import DataInfo
from selfsup.pretrain.methods.ae_losses import ROBUST_LOSSES, pixel_loss
from selfsup.pretrain.methods.base import Logs, Method
from selfsup.pretrain.methods.registry import register_method

LOSSES = ("mse", *ROBUST_LOSSES)  # targets are normalised images: no bce here
MAX_UPSAMPLING_STAGES = 8


@dataclass
class DAEConfig:
    loss: str = "mse"  # mse | l1 | huber | correntropy | cauchy
    huber_delta: float = 1.0
    correntropy_sigma: float = 0.5  # Gaussian kernel width, normalised-image units (ae_losses.py)
    cauchy_c: float = 1.0  # Cauchy scale, normalised-image units
    corrupt: CorruptConfig = field(default_factory=CorruptConfig)
    code_channels: int = 32  # 1x1 bottleneck on the encoder's feature map before decoding

    def check(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"method.dae.loss: '{self.loss}' is not one of {', '.join(LOSSES)}")
        if self.huber_delta <= 0:
            raise ValueError(f"method.dae.huber_delta must be > 0, got {self.huber_delta}")
        for key in ("correntropy_sigma", "cauchy_c"):
            if getattr(self, key) <= 0:
                raise ValueError(f"method.dae.{key} must be > 0, got {getattr(self, key)}")
        if self.code_channels < 1:
            raise ValueError(f"method.dae.code_channels must be >= 1, got {self.code_channels}")
        check_corrupt_config(self.corrupt)


def reconstruction_loss(
    recon: torch.Tensor, target: torch.Tensor, kind: str, huber_delta: float = 1.0,
    correntropy_sigma: float = 0.5, cauchy_c: float = 1.0,
) -> torch.Tensor:
    """Mean per-pixel reconstruction error in fp32 or wider (bf16/fp16 autocast outputs are
    promoted; fp64 stays fp64 so convergence tests can reach high accuracy)."""
    if kind not in LOSSES:
        raise ValueError(f"method.dae.loss: '{kind}' is not one of {', '.join(LOSSES)}")
    return pixel_loss(recon, target, kind, huber_delta, correntropy_sigma, cauchy_c,
                      key="method.dae.loss").mean()


def upsampling_plan(feature_size: int, image_size: int) -> list[int]:
    """``output_padding`` (0 or 1) of each stride-2 transposed conv taking ``feature_size`` to
    ``image_size``. A 3x3 stride-2 padding-1 transposed conv maps t to 2t - 1 + output_padding,
    the exact inverse of the encoder's ceil(t / 2) downsampling, so walking the halvings of the
    image size back up reproduces every intermediate size."""
    if feature_size < 1 or feature_size > image_size:
        raise ValueError(
            f"DAE decoder cannot reach {image_size} px from a {feature_size} px feature map"
        )
    paddings: list[int] = []
    size = image_size
    while size != feature_size:
        smaller = math.ceil(size / 2)
        if smaller == size or len(paddings) == MAX_UPSAMPLING_STAGES:
            raise ValueError(
                f"DAE decoder cannot reach {image_size} px from a {feature_size} px feature map "
                f"with stride-2 transposed convolutions (the encoder's downsampling is not a "
                f"sequence of halvings of {image_size})"
            )
        paddings.append(size - (2 * smaller - 1))
        size = smaller
    return paddings[::-1]


def probe_feature_map(backbone: nn.Module, channels: int, size: int) -> torch.Tensor:
    """The backbone's last feature map for one blank ``size``-px image, computed at construction
    to plan a decoder: eval mode (BatchNorm accepts a 1-image batch), no grad, mode restored."""
    was_training = backbone.training
    backbone.eval()
    with torch.no_grad():
        out = backbone.forward_features(torch.zeros(1, channels, size, size))
    backbone.train(was_training)
    return out


class ConvDecoder(nn.Module):
    """1x1 bottleneck, then (transposed conv, BatchNorm, ReLU) per stage, then a 3x3 conv to
    pixels. Channels halve per stage from the encoder's width (or ``2 * width``, when given), no
    lower than 32."""

    def __init__(
        self, in_channels: int, code_channels: int, out_channels: int, paddings: list[int],
        width: int | None = None,
    ) -> None:
        super().__init__()
        start = in_channels if width is None else 2 * width
        self.bottleneck = nn.Conv2d(in_channels, code_channels, kernel_size=1)
        stages: list[nn.Module] = []
        width = code_channels
        for i, pad in enumerate(paddings):
            nxt = max(start // 2 ** (i + 1), 32)
            stages += [
                nn.ConvTranspose2d(
                    width, nxt, 3, stride=2, padding=1, output_padding=pad, bias=False
                ),
                nn.BatchNorm2d(nxt),
                nn.ReLU(inplace=True),
            ]
            width = nxt
        self.stages = nn.Sequential(*stages)
        self.head = nn.Conv2d(width, out_channels, kernel_size=3, padding=1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.bottleneck(features)))


def dry_run(module: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Shape check at construction: eval mode (BatchNorm accepts tiny batches), no grad."""
    was_training = module.training
    module.eval()
    with torch.no_grad():
        out = fn(x)
    module.train(was_training)
    return out


@register_method("dae", DAEConfig, backbone="resnet")
class DAE(Method):
    """Denoising (or, with no corruption, plain undercomplete) convolutional autoencoder."""

    reconstructs = True

    def __init__(self, cfg: DAEConfig, backbone: nn.Module, views: Views, info: DataInfo) -> None:
        super().__init__(cfg, backbone, views, info)
        cfg.check()
        # Grids show the un-augmented images: same size and normalisation, no random crop/flip.
        self.plain_views = views.plain()
        size, channels = views.size, info.channels
        probe = torch.zeros(1, channels, size, size)
        features = probe_feature_map(self.backbone, channels, size)
        if features.dim() != 4:
            raise ValueError(
                f"method.name=dae needs a convolutional (ResNet) backbone with a [B, C, h, w] "
                f"feature map, got {type(backbone).__name__}"
            )
        c, h, w = features.shape[1:]
        if h != w:
            raise ValueError(f"DAE decoder needs a square feature map, got {h}x{w}")
        self.decoder = ConvDecoder(c, self.cfg.code_channels, channels, upsampling_plan(h, size))
        out = dry_run(self, self.autoencode, probe).shape
        if out != probe.shape:
            raise ValueError(f"DAE decoder produced {tuple(out)} for input {tuple(probe.shape)}")
        code, pixels = self.cfg.code_channels * h * w, channels * size * size
        if self.cfg.corrupt.kind == "none" and code >= pixels:
            raise ValueError(
                f"method.dae.corrupt.kind=none needs an undercomplete code, but "
                f"method.dae.code_channels={self.cfg.code_channels} x {h}x{w} = {code} values "
                f">= {pixels} pixel values: lower code_channels or add noise"
            )
        mean = torch.tensor(views.mean).view(1, -1, 1, 1)
        std = torch.tensor(views.std).view(1, -1, 1, 1)
        self.register_buffer("black", ((0.0 - mean) / std).flatten(), persistent=False)
        self.register_buffer("white", ((1.0 - mean) / std).flatten(), persistent=False)

    def corrupt(
        self, clean: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Corrupted copy of normalised ``clean``; salt and pepper are true white and black."""
        return corrupt(clean, self.cfg.corrupt, generator, value_range=(self.black, self.white))

    def autoencode(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.backbone.forward_features(x))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, Logs]:
        clean = self.views(images, n_views=1)[0]
        recon = self.autoencode(self.corrupt(clean))
        c = self.cfg
        loss = reconstruction_loss(recon, clean, c.loss, c.huber_delta, c.correntropy_sigma, c.cauchy_c)
        return loss, {}  # the loop logs the loss itself, averaged over ranks

    @torch.no_grad()
    def reconstruct(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """Clean input, its corruption and the reconstruction as float images in [0, 1]."""
        clean = self.plain_views(images, n_views=1)[0]
        corrupted = self.corrupt(clean, generator)
        recon = self.autoencode(corrupted).float()
        return {
            "input": self.to_unit(clean),
            "corrupted": self.to_unit(corrupted),
            "reconstruction": self.to_unit(recon),
        }
