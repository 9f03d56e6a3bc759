"""What the autoencoder family (``ae``, ``sparse_ae``, ``cae``, ``vae``, ``beta_vae``) shares: the
config fields of the code and decoder, the vector encoder and decoder, and a ``Method`` base that
reconstructs, scores anomalies and reports its latent code. Each method's file adds its loss.

Encoder: the backbone's pooled features (``self.backbone``, exactly what eval measures and export
writes, as for SimCLR) → a linear ``head`` to the code (``latent_dim`` values; twice that for a
VAE: μ and log σ²). The code is a vector, so any backbone works (ResNet or ViT). The code can be
smaller (undercomplete) or larger (overcomplete) than the image; the pooled features
(``backbone.feature_dim``) bound what reaches it either way.

Decoder (``VectorDecoder``): a linear layer to a ``decoder_width`` x s x s map (s ≤ 4, the end of
the image size's ceil-halvings), then the DAE's ``ConvDecoder`` (stride-2 transposed convs planned
by ``upsampling_plan``) back to exactly the input size; checked by a dry run at construction.

Linear mode (``linear: true``): encoder ``W x + b`` on the flattened normalised image and decoder
``W' z + b'``, the linear autoencoder whose optimum spans the top-``latent_dim`` principal
subspace of the data (Baldi & Hornik 1989; tests/test_linear_ae_pca.py trains it through the CLI).
The backbone is then unused and frozen (no gradients, so DDP needs no unused-parameter search);
its weights stay at initialisation, so eval's feature protocols on such a run measure an untrained
network: the linear mode is for the PCA property and the latent scatter, not for the table.

Targets: ``normalized`` (the normalised image, as the DAE) or ``unit`` (pixels in [0, 1], the
un-normalised image). ``auto`` picks ``unit`` for a Bernoulli decoder / BCE loss (they model
probabilities of pixel values in [0, 1]; normalised pixels lie outside [0, 1], so
``target: normalized`` with them is a config error) and ``normalized`` otherwise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from selfsup.augment.views import Views
from selfsup.data_info import DataInfo
from selfsup.pretrain.methods.ae_losses import LOSSES, UNIT_TARGET_LOSSES, pixel_loss
from selfsup.pretrain.methods.base import Method
from selfsup.pretrain.methods.dae import ConvDecoder, dry_run, upsampling_plan

TARGETS = ("auto", "normalized", "unit")
CODE_ACTIVATIONS = ("none", "relu", "sigmoid")
DECODER_START_PX = 4  # the vector decoder starts from a map of at most this side


@dataclass
class AutoencoderConfig:
    """Fields every autoencoder of the family has; ``SECTION`` names the keys in errors."""

    SECTION: ClassVar[str] = "method.autoencoder"
    latent_dim: int = 32  # size of the code (vector)
    linear: bool = False  # linear encoder/decoder on flattened pixels; the backbone is bypassed
    decoder_width: int = 128  # channels of the decoder's first map
    target: str = "auto"  # auto | normalized | unit (pixels in [0, 1])

    def check(self) -> None:
        key = self.SECTION
        if self.latent_dim < 1:
            raise ValueError(f"{key}.latent_dim must be >= 1 (the size of the code), got {self.latent_dim}")
        if self.decoder_width < 1:
            raise ValueError(f"{key}.decoder_width must be >= 1, got {self.decoder_width}")
        if self.target not in TARGETS:
            raise ValueError(f"{key}.target: '{self.target}' is not one of {', '.join(TARGETS)}")
        if self.outputs_logits() and self.target == "normalized":
            raise ValueError(
                f"{key}.target=normalized is impossible with {self.logits_reason()}: it models "
                f"pixel values in [0, 1] and normalised images lie outside [0, 1]; use "
                f"{key}.target=unit (or auto)"
            )

    def outputs_logits(self) -> bool:
        """True when the decoder outputs Bernoulli logits (targets must be in [0, 1])."""
        return False

    def logits_reason(self) -> str:
        return "this decoder"

    def unit_target(self) -> bool:
        return self.target == "unit" or (self.target == "auto" and self.outputs_logits())


@dataclass
class ReconConfig(AutoencoderConfig):
    """A deterministic autoencoder's loss and code activation (``ae``, ``sparse_ae``, ``cae``)."""

    loss: str = "mse"  # mse | l1 | huber | correntropy | cauchy | bce (ae_losses.py)
    code_activation: str = "none"  # none | relu | sigmoid, applied to the code
    huber_delta: float = 1.0
    correntropy_sigma: float = 0.5  # kernel width, in the target's units
    cauchy_c: float = 1.0  # scale, in the target's units

    def check(self) -> None:
        key = self.SECTION
        if self.loss not in LOSSES:
            raise ValueError(f"{key}.loss: '{self.loss}' is not one of {', '.join(LOSSES)}")
        if self.code_activation not in CODE_ACTIVATIONS:
            raise ValueError(
                f"{key}.code_activation: '{self.code_activation}' is not one of "
                f"{', '.join(CODE_ACTIVATIONS)}"
            )
        for name in ("huber_delta", "correntropy_sigma", "cauchy_c"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{key}.{name} must be > 0, got {getattr(self, name)}")
        super().check()

    def outputs_logits(self) -> bool:
        return self.loss in UNIT_TARGET_LOSSES

    def logits_reason(self) -> str:
        return f"{self.SECTION}.loss={self.loss}"


def decoder_start(image_size: int) -> int:
    """Side of the vector decoder's first map: halve (ceil) the image size until <= 4 px."""
    side = image_size
    while side > DECODER_START_PX:
        side = math.ceil(side / 2)
    return side


class VectorDecoder(nn.Module):
    """Code ``[B, k]`` → linear → ReLU → ``[B, width, s, s]`` → ``ConvDecoder`` → ``[B, C, H, W]``."""

    def __init__(self, latent_dim: int, image_shape: tuple[int, int, int], width: int) -> None:
        super().__init__()
        channels, size, _ = image_shape
        side = decoder_start(size)
        self.start = (width, side, side)
        self.fc = nn.Linear(latent_dim, width * side * side)
        self.act = nn.ReLU(inplace=True)
        self.convs = ConvDecoder(width, width, channels, upsampling_plan(side, size))

    def forward(self, z: Tensor) -> Tensor:
        return self.convs(self.act(self.fc(z)).view(-1, *self.start))


class LinearDecoder(nn.Module):
    """``W' z + b'`` reshaped to ``[B, C, H, W]`` (the linear autoencoder's decoder)."""

    def __init__(self, latent_dim: int, image_shape: tuple[int, int, int]) -> None:
        super().__init__()
        self.shape = image_shape
        self.linear = nn.Linear(latent_dim, math.prod(image_shape))

    def forward(self, z: Tensor) -> Tensor:
        return self.linear(z).view(-1, *self.shape)


class VectorAutoencoder(Method):
    """Base of the family: encoder head, decoder, targets, reconstruction, latent code.

    Subclasses implement ``forward`` (their loss) and ``mean_code(x)`` (the deterministic code of
    normalised images: the bottleneck, or the VAE's posterior mean)."""

    reconstructs = True
    code_outputs: ClassVar[int] = 1  # head outputs per latent dimension (2 for a VAE)

    def __init__(
        self, cfg: AutoencoderConfig, backbone: nn.Module, views: Views, info: DataInfo
    ) -> None:
        super().__init__(cfg, backbone, views, info)
        cfg.check()
        self.plain_views = views.plain()  # pictures and scores: no random crop/flip/colour
        self.image_shape = (info.channels, views.size, views.size)
        self.pixels = math.prod(self.image_shape)
        k = cfg.latent_dim
        if cfg.linear:
            backbone.requires_grad_(False)
            self.head = nn.Linear(self.pixels, k * self.code_outputs)
            self.decoder: nn.Module = LinearDecoder(k, self.image_shape)
        else:
            self.head = nn.Linear(backbone.feature_dim, k * self.code_outputs)
            self.decoder = VectorDecoder(k, self.image_shape, cfg.decoder_width)
        self.unit_target = cfg.unit_target()
        self.logits = cfg.outputs_logits()
        probe = torch.zeros(2, *self.image_shape)
        out = dry_run(self, lambda x: self.decoder(self.head_out(x)[:, :k]), probe)
        if out.shape != probe.shape:
            raise ValueError(
                f"{cfg.SECTION}: the decoder produced {tuple(out.shape)} for input {tuple(probe.shape)}"
            )

    # ------------------------------------------------------------------ pieces
    def features(self, x: Tensor) -> Tensor:
        """What the head reads: the backbone's pooled features, or the flat pixels (linear)."""
        return x.flatten(1) if self.cfg.linear else self.backbone(x)

    def head_out(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))

    def target(self, x: Tensor) -> Tensor:
        """The reconstruction target of normalised images ``x``: ``x`` itself or its [0, 1] pixels."""
        return self.views.to_unit(x) if self.unit_target else x

    def to_pixels(self, out: Tensor) -> Tensor:
        """Decoder output as a picture in [0, 1] (logits → probabilities; means → pixels)."""
        out = out.float()
        if self.logits:
            return torch.sigmoid(out)
        return out.clamp(0, 1) if self.unit_target else self.to_unit(out)

    def mean_code(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def recon_per_image(self, out: Tensor, target: Tensor) -> Tensor:
        """``Σ_pixels ℓ(x̂, x)`` per image ``[B]`` for the config's loss (the notes' ‖x − x̂‖²)."""
        c = self.cfg
        per = pixel_loss(out, target, c.loss, c.huber_delta, c.correntropy_sigma, c.cauchy_c,
                         key=f"{c.SECTION}.loss")  # fmt: skip
        return per.flatten(1).sum(dim=1)

    # ------------------------------------------------------------------ contract hooks
    @torch.no_grad()
    def reconstruct(
        self, images: Tensor, generator: torch.Generator | None = None
    ) -> dict[str, Tensor]:
        """Input, (no corruption: the input again) and the reconstruction of the mean code."""
        x = self.plain_views(images, n_views=1)[0]
        unit = self.to_unit(x)
        return {"input": unit, "corrupted": unit,
                "reconstruction": self.to_pixels(self.decoder(self.mean_code(x)))}  # fmt: skip

    @torch.no_grad()
    def latent(self, images: Tensor) -> Tensor:
        return self.mean_code(self.plain_views(images, n_views=1)[0]).float()
