"""Bottleneck autoencoder (Rumelhart et al. 1986; the notes' ``‖x − g(f(x))‖²``).

``f`` = backbone → pooled features → linear → code of ``latent_dim`` values (optionally through
``code_activation``); ``g`` = ``VectorDecoder`` (``ae_parts.py``). The loss per image is the sum
over pixels of ``ℓ(x̂, x)``: MSE on the normalised image by default, BCE on [0, 1] pixels
(``loss: bce``; the decoder then outputs logits), or a robust loss (``ae_losses.py``). The code may
be undercomplete or overcomplete (``latent_dim`` larger than the pixel count); with no
regularisation an overcomplete code relies on the pooled features and the decoder to bottleneck.

With ``latent_dim`` 2 or 3 the run writes ``latent_scatter.png``: the codes of the test images
(``data.test``, else the training images) coloured by class, the notes' visualisation
(``pretrain/hooks/pictures.py``). With ``linear: true`` the encoder and decoder are single linear maps on
the flattened pixels: the linear autoencoder whose optimum spans the principal subspace.

``sparse_ae.py`` and ``cae.py`` subclass this method and add a penalty through ``penalty``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from selfsup.augment.views import Views
from selfsup.data_info import DataInfo
from selfsup.pretrain.methods.ae_parts import ReconConfig, VectorAutoencoder
from selfsup.pretrain.methods.base import Logs
from selfsup.pretrain.methods.registry import register_method

ACTIVATIONS = {"none": nn.Identity, "relu": nn.ReLU, "sigmoid": nn.Sigmoid}


@dataclass
class AEConfig(ReconConfig):
    SECTION: ClassVar[str] = "method.ae"


@register_method("ae", AEConfig)
class AE(VectorAutoencoder):
    """Bottleneck autoencoder with a vector code (under- or overcomplete; linear = PCA)."""

    def __init__(self, cfg: AEConfig, backbone: nn.Module, views: Views, info: DataInfo) -> None:
        super().__init__(cfg, backbone, views, info)
        self.activation = ACTIVATIONS[cfg.code_activation]()

    def mean_code(self, x: Tensor) -> Tensor:
        return self.activation(self.head_out(x))

    def encoder_input(self, x: Tensor) -> Tensor:
        """The normalised images the encoder reads (the CAE makes them require grad)."""
        return x

    def penalty(self, x: Tensor, code: Tensor) -> tuple[Tensor, Logs]:
        """A regulariser on the code (added to the mean reconstruction loss) and its logs."""
        return torch.zeros((), device=code.device), {}

    def forward(self, images: Tensor) -> tuple[Tensor, Logs]:
        clean = self.views(images, n_views=1)[0]
        x = self.encoder_input(clean)
        code = self.mean_code(x)
        recon = self.recon_per_image(self.decoder(code), self.target(clean)).mean()
        penalty, logs = self.penalty(x, code)
        logs["recon"] = recon.detach()
        return recon + penalty, logs
