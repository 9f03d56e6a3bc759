"""Variational autoencoder (Kingma & Welling 2014).

Encoder ``q(z|x) = N(μ, diag σ²)``: the head outputs ``μ`` and ``log σ²`` (``latent_dim`` each).
Prior ``p(z) = N(0, I)``. Reparameterisation ``z = μ + σ ⊙ ε``, ``ε ~ N(0, I)``. Decoder
``p(x|z)``:

- ``gaussian``: ``N(x; g(z), σ_x² I)`` on the target. ``gaussian_std: 0`` sets one shared σ_x
  to its maximum-likelihood value, the RMS reconstruction error (the "optimal σ" of Rybkin et al.
  2021; a fixed σ_x weighs the KL arbitrarily, and a learned scalar moves only ~lr per Adam step):
  ``σ_x²`` is a running mean (momentum ``SIGMA_MOMENTUM``) of the batches' mean squared error,
  updated in training like BatchNorm's statistics, saved in checkpoints and used as it stands in
  eval. ``> 0`` fixes σ_x, in the target's units.
- ``bernoulli``: ``Π p^x (1 − p)^(1−x)`` with ``p = sigmoid(g(z))`` over pixels in [0, 1]
  (``target: unit``, chosen by ``auto``; ``target: normalized`` is a config error). Grey pixels
  make this the usual cross-entropy rather than a normalised likelihood.

``ELBO = E_q[log p(x|z)] − KL(q(z|x) ‖ p(z))`` per image, with the closed-form
``KL = ½ Σ_j (μ_j² + σ_j² − log σ_j² − 1)`` and a one-sample estimate of the expectation while
training. Units: nats per image. A Gaussian decoder's density is reported for pixels in [0, 1]
(the normalisation's Jacobian ``−H·W·Σ_c log std_c`` is added when the target is the normalised
image), so every VAE's numbers share units; ``bits_per_dim`` is ``−ELBO / (d ln 2)``, plus 8 for the
Gaussian (its density on [0, 1] compared with 8-bit data, Theis et al. 2016; a bound only for
dequantised data). Logged: ``elbo``, ``recon_nll`` (−E log p(x|z)), ``kl``, ``bits_per_dim``,
``sigma_x`` (Gaussian). The loss is ``recon_nll + w·KL`` with ``w = 1`` (β-VAE: ``beta_vae.py``).

``anomaly_score`` is the negative ELBO (``score_samples`` reparameterised draws of ``z``), used by
eval's reconstruction-error AUROC. ``pictures``: samples from the prior and a latent interpolation
between pairs of images (posterior means, linear path), saved at the end of a run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from selfsup.augment.views import Views
from selfsup.data_info import DataInfo
from selfsup.pretrain.methods.ae_losses import (
    bernoulli_log_likelihood,
    bits_per_dim,
    gaussian_kl,
    gaussian_log_likelihood,
    reparameterize,
)
from selfsup.pretrain.methods.ae_parts import AutoencoderConfig, VectorAutoencoder
from selfsup.pretrain.methods.base import Logs
from selfsup.pretrain.methods.registry import register_method

DECODERS = ("gaussian", "bernoulli")
SIGMA_MOMENTUM = 0.1  # weight of the current batch in the running σ_x² (gaussian_std: 0)
PICTURE_COLS = 8


@dataclass
class VAEConfig(AutoencoderConfig):
    SECTION: ClassVar[str] = "method.vae"
    latent_dim: int = 16
    decoder: str = "gaussian"  # gaussian | bernoulli
    gaussian_std: float = 0.0  # 0: σ_x = running RMS error (ML value); > 0: fixed, target units
    score_samples: int = 4  # draws of z per image for the anomaly score (−ELBO)

    def check(self) -> None:
        key = self.SECTION
        if self.decoder not in DECODERS:
            raise ValueError(f"{key}.decoder: '{self.decoder}' is not one of {', '.join(DECODERS)}")
        if self.gaussian_std < 0:
            raise ValueError(f"{key}.gaussian_std must be >= 0 (0 = learned), got {self.gaussian_std}")
        if self.score_samples < 1:
            raise ValueError(f"{key}.score_samples must be >= 1, got {self.score_samples}")
        super().check()

    def outputs_logits(self) -> bool:
        return self.decoder == "bernoulli"

    def logits_reason(self) -> str:
        return f"{self.SECTION}.decoder=bernoulli"


@register_method("vae", VAEConfig)
class VAE(VectorAutoencoder):
    """Variational autoencoder: Gaussian posterior, Gaussian or Bernoulli decoder, ELBO in nats."""

    code_outputs = 2
    anomaly_score_unit = "negative ELBO, nats per image"

    def __init__(self, cfg: VAEConfig, backbone: nn.Module, views: Views, info: DataInfo) -> None:
        super().__init__(cfg, backbone, views, info)
        self.gaussian = cfg.decoder == "gaussian"
        self.track_sigma = self.gaussian and cfg.gaussian_std == 0
        # σ_x² (running mean squared error when tracked; starts at 1 in the target's units)
        self.register_buffer("sigma_x2", torch.tensor((cfg.gaussian_std or 1.0) ** 2))
        # log-density of [0, 1] pixels = log-density of normalised pixels - sum of log std
        std = torch.tensor(views.std, dtype=torch.float64).expand(info.channels)
        normalised = self.gaussian and not self.unit_target
        self.unit_offset = -views.size**2 * float(std.log().sum()) if normalised else 0.0
        self.bits_offset = 8.0 if self.gaussian else 0.0

    # ------------------------------------------------------------------ the model
    def posterior(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(μ, log σ²)`` of q(z|x), fp32."""
        mu, logvar = self.head_out(x).float().chunk(2, dim=1)
        return mu, logvar

    def mean_code(self, x: Tensor) -> Tensor:
        return self.head_out(x)[:, : self.cfg.latent_dim]

    def log_likelihood(self, out: Tensor, target: Tensor) -> Tensor:
        """``log p(x|z)`` per image in nats (of [0, 1] pixels for the Gaussian)."""
        if self.gaussian:
            if self.track_sigma and self.training and torch.is_grad_enabled():
                with torch.no_grad():
                    mse = (out.detach().float() - target.float()).square().mean()
                    self.sigma_x2.lerp_(mse.clamp_min(1e-8), SIGMA_MOMENTUM)
            log_sigma = 0.5 * self.sigma_x2.log()
            return gaussian_log_likelihood(out, target, log_sigma) + self.unit_offset
        return bernoulli_log_likelihood(out, target)

    def elbo_terms(self, x: Tensor, samples: int = 1) -> tuple[Tensor, Tensor]:
        """``(E_q log p(x|z), KL)`` per image ``[B]``: ``samples`` reparameterised draws."""
        mu, logvar = self.posterior(x)
        target = self.target(x)
        ll = sum(self.log_likelihood(self.decoder(reparameterize(mu, logvar)), target)
                 for _ in range(samples)) / samples  # fmt: skip
        return ll, gaussian_kl(mu, logvar)

    def kl_weight(self) -> Tensor:
        """Weight of the KL in the loss: 1 for the VAE (β-VAE overrides)."""
        return torch.ones((), device=self.head.weight.device)

    def forward(self, images: Tensor) -> tuple[Tensor, Logs]:
        x = self.views(images, n_views=1)[0]
        ll, kl = self.elbo_terms(x)
        w = self.kl_weight()
        loss = (-ll + w * kl).mean()
        elbo = (ll - kl).detach().mean()
        logs = {"elbo": elbo, "recon_nll": -ll.detach().mean(), "kl": kl.detach().mean(),
                "bits_per_dim": bits_per_dim(-elbo, self.pixels, self.bits_offset),
                "kl_weight": w.detach()}  # fmt: skip
        if self.gaussian:
            logs["sigma_x"] = self.sigma_x2.sqrt()
        return loss, logs

    # ------------------------------------------------------------------ contract hooks
    @torch.no_grad()
    def anomaly_score(self, images: Tensor) -> Tensor:
        """Negative ELBO per image (nats), ``score_samples`` draws of z."""
        ll, kl = self.elbo_terms(self.plain_views(images, n_views=1)[0], self.cfg.score_samples)
        return kl - ll

    @torch.no_grad()
    def decode_pixels(self, z: Tensor) -> Tensor:
        return self.to_pixels(self.decoder(z.to(self.head.weight.dtype)))

    @torch.no_grad()
    def pictures(self, images: Tensor, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """``samples``: 2 rows of decoder means of ``z ~ N(0, I)``; ``interpolation``: per pair of
        images (first and last column), decoder means along the line between their μ."""
        k, dev = self.cfg.latent_dim, images.device
        z = torch.randn(2 * PICTURE_COLS, k, device=dev, generator=generator)
        out = {"samples": self.decode_pixels(z).unflatten(0, (2, PICTURE_COLS))}
        pairs = min(4, images.shape[0] // 2)
        if pairs:
            x = self.plain_views(images[: 2 * pairs], n_views=1)[0]
            mu = self.posterior(x)[0]
            t = torch.linspace(0, 1, PICTURE_COLS, device=dev).view(1, -1, 1)
            a, b = mu[0::2].unsqueeze(1), mu[1::2].unsqueeze(1)
            path = self.decode_pixels(((1 - t) * a + t * b).flatten(0, 1)).unflatten(0, (pairs, -1))
            unit = self.to_unit(x)
            out["interpolation"] = torch.cat([unit[0::2, None], path, unit[1::2, None]], dim=1)
        return out
