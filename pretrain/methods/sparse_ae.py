"""Sparse autoencoder: the bottleneck AE plus a sparsity penalty on its code ``h``.

- L1 (the notes): ``λ ‖h‖₁ = λ Σ_j |h_j|`` per image, with a ReLU code by default so that inactive
  units are exactly 0.
- KL sparsity target (Ng, CS294A "Sparse autoencoder" notes, §2.3): with ``ρ̂_j`` the mean
  activation of unit ``j`` over the batch, ``β Σ_j KL(ρ ‖ ρ̂_j)`` where
  ``KL(ρ ‖ ρ̂) = ρ log(ρ/ρ̂) + (1 − ρ) log((1 − ρ)/(1 − ρ̂))``. It needs activations in (0, 1), so
  ``kl_weight > 0`` requires ``code_activation: sigmoid``. ``ρ̂`` is the mean over the process's
  own batch (Ng averages over the training set; a batch estimate is the usual stochastic stand-in).

Logged: ``active_frac`` (fraction of code values that are active: > 0 for ReLU/none codes, > 0.5
for a sigmoid code), ``mean_activation`` (mean ``h``), ``l1`` (mean ``‖h‖₁`` per image) and
``kl_sparsity``. Both penalties add to the per-image reconstruction loss (a sum over pixels), as in
Ng's cost. The default code (512 values) is wider than the small ResNet's 256 pooled features;
``latent_dim`` above the pixel count (e.g. 1024 for 28x28) makes it overcomplete with respect to
the image too. Sparsity, not size, is what limits it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from selfsup.pretrain.methods.ae import AE, AEConfig
from selfsup.pretrain.methods.base import Logs
from selfsup.pretrain.methods.registry import register_method

RHO_EPS = 1e-6


@dataclass
class SparseAEConfig(AEConfig):
    SECTION: ClassVar[str] = "method.sparse_ae"
    latent_dim: int = 512
    code_activation: str = "relu"
    lam: float = 1e-2  # λ of the L1 penalty λ‖h‖₁ (per image)
    kl_weight: float = 0.0  # β of the KL sparsity target (0 = off); needs a sigmoid code
    rho: float = 0.05  # target mean activation ρ

    def check(self) -> None:
        super().check()
        key = self.SECTION
        if self.lam < 0:
            raise ValueError(f"{key}.lam (the L1 weight λ) must be >= 0, got {self.lam}")
        if self.kl_weight < 0:
            raise ValueError(f"{key}.kl_weight must be >= 0, got {self.kl_weight}")
        if not 0.0 < self.rho < 1.0:
            raise ValueError(f"{key}.rho: a target activation in (0, 1), got {self.rho}")
        if self.kl_weight > 0 and self.code_activation != "sigmoid":
            raise ValueError(
                f"{key}.kl_weight > 0 needs activations in (0, 1): set "
                f"{key}.code_activation=sigmoid (got {self.code_activation})"
            )


def kl_sparsity(rho: float, rho_hat: Tensor) -> Tensor:
    """``Σ_j ρ log(ρ/ρ̂_j) + (1 − ρ) log((1 − ρ)/(1 − ρ̂_j))`` (Ng's sparsity penalty)."""
    r = rho_hat.float().clamp(RHO_EPS, 1 - RHO_EPS)
    return (rho * torch.log(rho / r) + (1 - rho) * torch.log((1 - rho) / (1 - r))).sum()


def active_fraction(code: Tensor, activation: str) -> Tensor:
    """Fraction of code values counted as active (> 0; > 0.5 for a sigmoid code)."""
    threshold = 0.5 if activation == "sigmoid" else 0.0
    return (code.detach().float() > threshold).float().mean()


@register_method("sparse_ae", SparseAEConfig)
class SparseAE(AE):
    """Sparse autoencoder: L1 penalty on the code (optionally Ng's KL sparsity target)."""

    def penalty(self, x: Tensor, code: Tensor) -> tuple[Tensor, Logs]:
        h = code.float()
        l1 = h.abs().sum(dim=1).mean()
        total = self.cfg.lam * l1
        logs = {"l1": l1.detach(), "mean_activation": h.detach().mean(),
                "active_frac": active_fraction(h, self.cfg.code_activation)}  # fmt: skip
        if self.cfg.kl_weight > 0:
            kl = kl_sparsity(self.cfg.rho, h.mean(dim=0))
            total = total + self.cfg.kl_weight * kl
            logs["kl_sparsity"] = kl.detach()
        return total, logs
