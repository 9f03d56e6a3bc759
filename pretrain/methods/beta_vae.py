"""β-VAE (Higgins et al. 2017): the VAE with the KL scaled by β, ``E_q[log p(x|z)] − β KL``.

β = 1 is the VAE; β > 1 presses the posterior towards the factorised prior (disentanglement, at
the cost of reconstructions). ``kl_warmup`` (a fraction of the run's optimiser steps) ramps the
KL weight linearly from 0 to β (Bowman et al. 2016's annealing), so early training is not pulled
into posterior collapse. The weight is ``β · min(1, t / (kl_warmup · T))`` at step ``t`` of ``T``;
``t`` and ``T`` live in buffers set by ``after_step`` (the contract's hook), so they are saved in
every checkpoint and a resumed run uses exactly the weights of an uninterrupted one.

The logged ``elbo`` is always the true ELBO (weight 1); the loss uses the weight, logged as
``kl_weight``. ``pictures`` adds ``traversal``: from one image's posterior mean, each of the most
informative latent dimensions (highest mean KL over the given images) in turn set to values from
−3 to 3 with the others fixed, one row per dimension.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from selfsup.augment.views import Views
from selfsup.data_info import DataInfo
from selfsup.pretrain.methods.ae_losses import gaussian_kl_per_dim
from selfsup.pretrain.methods.registry import register_method
from selfsup.pretrain.methods.vae import VAE, VAEConfig

TRAVERSAL_ROWS = 8
TRAVERSAL_VALUES = (-3.0, 3.0, 9)  # from, to, count


@dataclass
class BetaVAEConfig(VAEConfig):
    SECTION: ClassVar[str] = "method.beta_vae"
    latent_dim: int = 10
    beta: float = 4.0  # weight of the KL (1 = the VAE)
    kl_warmup: float = 0.0  # fraction of all optimiser steps over which the weight ramps 0 -> β

    def check(self) -> None:
        super().check()
        key = self.SECTION
        if self.beta < 0:
            raise ValueError(f"{key}.beta must be >= 0 (1 = the VAE), got {self.beta}")
        if not 0.0 <= self.kl_warmup <= 1.0:
            raise ValueError(f"{key}.kl_warmup: a fraction of the run in [0, 1], got {self.kl_warmup}")


@register_method("beta_vae", BetaVAEConfig)
class BetaVAE(VAE):
    """β-VAE: KL weighted by β, with an optional linear warm-up of the weight."""

    def __init__(self, cfg: BetaVAEConfig, backbone: nn.Module, views: Views, info: DataInfo) -> None:
        super().__init__(cfg, backbone, views, info)
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))
        self.register_buffer("total_steps", torch.zeros((), dtype=torch.long))

    def after_step(self, step: int, total_steps: int) -> None:
        self.steps_done.fill_(step)
        self.total_steps.fill_(total_steps)

    def kl_weight(self) -> Tensor:
        beta = torch.tensor(self.cfg.beta, device=self.steps_done.device)
        if self.cfg.kl_warmup <= 0:
            return beta
        span = (self.total_steps.float() * self.cfg.kl_warmup).clamp_min(1.0)
        return beta * (self.steps_done.float() / span).clamp(max=1.0)

    @torch.no_grad()
    def pictures(self, images: Tensor, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        out = super().pictures(images, generator)
        mu, logvar = self.posterior(self.plain_views(images, n_views=1)[0])
        dims = gaussian_kl_per_dim(mu, logvar).mean(0).argsort(descending=True)[:TRAVERSAL_ROWS]
        lo, hi, n = TRAVERSAL_VALUES
        values = torch.linspace(lo, hi, n, device=mu.device)
        z = mu[0].repeat(len(dims), n, 1)  # [rows, cols, k]
        z[torch.arange(len(dims), device=mu.device), :, dims] = values
        out["traversal"] = self.decode_pixels(z.flatten(0, 1)).unflatten(0, (len(dims), n))
        return out
