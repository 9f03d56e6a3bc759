"""Losses of the autoencoder family: per-pixel reconstruction losses (plain and robust), and the
VAE's Gaussian/Bernoulli log-likelihoods and closed-form KL. Formulas, checked against the papers:

- ``mse``: ``r²``; ``l1``: ``|r|``; ``huber``: ``½r²`` for ``|r| ≤ δ``, else ``δ(|r| − ½δ)``.
- ``correntropy``: ``1 − exp(−r² / (2σ²))``. Liu, Pokharel & Príncipe (2007) define correntropy
  as ``V_σ = E[κ_σ(x − x̂)]`` with the Gaussian kernel ``κ_σ(e) = exp(−e²/(2σ²)) / (√(2π) σ)``,
  a *similarity* to maximise (the maximum correntropy criterion). The course notes write
  ``Σ_k exp(−(x_k − x̂_k)²/σ)`` as the loss ℓ: the same kernel with their ``σ`` = ``2σ²`` here and
  no normaliser, but as written it would be minimised by pushing residuals to infinity. We use
  Liu et al.'s kernel, divided by ``κ_σ(0)`` and subtracted from 1 (the "C-loss" of Singh &
  Príncipe 2010): it is minimised exactly where correntropy is maximised, is 0 at ``r = 0``, ≈
  ``r²/(2σ²)`` for small residuals and saturates at 1 for outliers (their gradient vanishes).
  ``σ`` (``correntropy_sigma``) is in the target's units.
- ``cauchy``: ``log(1 + (r/c)²)`` (Cauchy/Lorentzian; Barron 2019 scales it by ``c²/2`` so that it
  is ≈ ``r²/2`` near 0, a constant factor that only rescales the loss).
- ``bce``: binary cross-entropy of decoder logits against targets in [0, 1].

Every function returns per-element or per-image values in fp32 or wider, so bf16/fp16 autocast
outputs are promoted and fp64 stays fp64 (convergence tests).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LOSSES = ("mse", "l1", "huber", "correntropy", "cauchy", "bce")
ROBUST_LOSSES = ("l1", "huber", "correntropy", "cauchy")  # beside plain mse
UNIT_TARGET_LOSSES = ("bce",)  # need targets in [0, 1] (un-normalised pixels)


def _wide(*xs: torch.Tensor) -> list[torch.Tensor]:
    dtype = torch.float32
    for x in xs:
        dtype = torch.promote_types(dtype, x.dtype)
    return [x.to(dtype) for x in xs]


def pixel_loss(
    recon: torch.Tensor,
    target: torch.Tensor,
    kind: str,
    huber_delta: float = 1.0,
    correntropy_sigma: float = 0.5,
    cauchy_c: float = 1.0,
    key: str = "loss",
) -> torch.Tensor:
    """Element-wise loss of ``recon`` (logits for ``bce``) against ``target``, same shape.
    ``key`` names the config entry in errors (e.g. ``method.dae.loss``)."""
    recon, target = _wide(recon, target)
    r = recon - target
    if kind == "mse":
        return r.square()
    if kind == "l1":
        return r.abs()
    if kind == "huber":
        if huber_delta <= 0:
            raise ValueError(f"{_section(key)}.huber_delta must be > 0, got {huber_delta}")
        return F.huber_loss(recon, target, delta=huber_delta, reduction="none")
    if kind == "correntropy":
        if correntropy_sigma <= 0:
            raise ValueError(f"{_section(key)}.correntropy_sigma must be > 0, got {correntropy_sigma}")
        return 1.0 - torch.exp(-r.square() / (2.0 * correntropy_sigma**2))
    if kind == "cauchy":
        if cauchy_c <= 0:
            raise ValueError(f"{_section(key)}.cauchy_c must be > 0, got {cauchy_c}")
        return torch.log1p((r / cauchy_c).square())
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(recon, target, reduction="none")
    raise ValueError(f"{key}: '{kind}' is not one of {', '.join(LOSSES)}")


def _section(key: str) -> str:
    return key.rsplit(".", 1)[0] if "." in key else key


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """``KL(N(μ, diag σ²) ‖ N(0, I))`` per row, in nats: ``½ Σ_j (μ_j² + σ_j² − log σ_j² − 1)``
    (Kingma & Welling 2014, appendix B, with the sign of their −KL flipped)."""
    mu, logvar = _wide(mu, logvar)
    return 0.5 * (mu.square() + logvar.exp() - logvar - 1.0).sum(dim=1)


def gaussian_kl_per_dim(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """The KL's terms ``[B, k]`` (which latent dimensions carry information)."""
    mu, logvar = _wide(mu, logvar)
    return 0.5 * (mu.square() + logvar.exp() - logvar - 1.0)


def reparameterize(
    mu: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``z = μ + σ ⊙ ε``, ``ε ~ N(0, I)``, ``σ = exp(½ log σ²)``: differentiable in μ and log σ²."""
    eps = torch.randn(mu.shape, device=mu.device, dtype=mu.dtype, generator=generator)
    return mu + torch.exp(0.5 * logvar) * eps


def gaussian_log_likelihood(
    mean: torch.Tensor, target: torch.Tensor, log_sigma: torch.Tensor
) -> torch.Tensor:
    """``log N(target; mean, σ² I)`` per image in nats: ``−½ Σ ((t − m)²/σ² + log 2π + 2 log σ)``;
    ``log_sigma`` is a scalar (one shared σ) or broadcasts over the pixels."""
    mean, target, log_sigma = _wide(mean, target, log_sigma)
    per = 0.5 * ((target - mean) / log_sigma.exp()).square() + 0.5 * math.log(2 * math.pi) + log_sigma
    return -per.flatten(1).sum(dim=1)


def bernoulli_log_likelihood(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``Σ t log p + (1 − t) log(1 − p)`` per image in nats, ``p = sigmoid(logits)``, ``t`` in
    [0, 1] (grey pixels give the usual cross-entropy, not a normalised likelihood)."""
    logits, target = _wide(logits, target)
    return -F.binary_cross_entropy_with_logits(logits, target, reduction="none").flatten(1).sum(1)


def bits_per_dim(nats_per_image: torch.Tensor, dims: int, offset_bits: float = 0.0) -> torch.Tensor:
    """``nats / (dims · ln 2) + offset_bits`` (8 for a density on [0, 1] compared with 8-bit data:
    Theis et al. 2016's ``−log p + d log 256`` for pixels scaled to [0, 256))."""
    return nats_per_image / (dims * math.log(2.0)) + offset_bits
