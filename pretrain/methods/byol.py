"""BYOL (Grill et al. 2020, "Bootstrap your own latent"): an online network predicts a slowly
moving target network's projection of the other view; no negatives.

Online: backbone -> projector (``Linear -> BN -> ReLU -> Linear``, 4096 -> 256 in the paper) ->
predictor (same shape, 256 -> 4096 -> 256). Target: a copy of the online backbone and projector,
updated only as an exponential moving average of them after every optimiser step, never by
gradients (its parameters have ``requires_grad=False``, so the optimiser, gradient clipping and
DDP never see them). Its BatchNorm layers normalise with batch statistics and keep their own
running statistics, as the online ones do; the EMA covers parameters (the reference code's
``target_params``), and the target's buffers are in the state dict, so checkpoints and resumes
carry them.

Loss, with ``q = predictor(projector(backbone(v)))`` of the online network and
``z' = target_projector(target_backbone(v))``, both L2-normalised, ``sg`` = stop-gradient:

    L = mean_b [ (2 - 2 cos(q(v1), sg(z'(v2)))) + (2 - 2 cos(q(v2), sg(z'(v1)))) ]

(``2 - 2 cos`` is ``||q/|q| - z'/|z'| ||^2``; the two terms are summed, as in the paper's
symmetrised loss and its reference code, so L is in [0, 8]).

EMA rate: after the optimiser step with 0-based index ``k`` (of ``K`` in the run),
``target <- tau_k * target + (1 - tau_k) * online`` with the paper's cosine schedule
``tau_k = 1 - (1 - tau_base) * (cos(pi k / K) + 1) / 2``: ``tau_base`` at the first step, 1 at
the end. ``tau_k`` is computed from the step alone, so a resumed run applies the same rates; the
rate the current step will use is logged as ``tau``.

Evaluated and exported: the online backbone (``backbone.*``), as in the paper.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from selfsup.augment.views import Views
from selfsup.data_info import DataInfo
from selfsup.pretrain.methods.base import COLLAPSE_LOG, Logs, Method
from selfsup.pretrain.methods.registry import register_method
from selfsup.pretrain.methods.siamese import collapse_std, cosine, mlp


@dataclass
class BYOLConfig:
    proj_hidden: int = 4096
    proj_out: int = 256
    pred_hidden: int = 4096
    tau_base: float = 0.996  # EMA rate at the first step; cosine schedule to 1 at the last
    sync_head_bn: bool = True  # heads' BN over the global batch when there are several processes

    def check(self) -> None:
        for key in ("proj_hidden", "proj_out", "pred_hidden"):
            if getattr(self, key) < 1:
                raise ValueError(f"method.byol.{key} must be >= 1, got {getattr(self, key)}")
        if not 0.0 <= self.tau_base <= 1.0:
            raise ValueError(f"method.byol.tau_base must be in [0, 1], got {self.tau_base}")


def momentum_tau(k: int, total: int, tau_base: float) -> float:
    """The paper's EMA rate at step ``k`` of ``total``: ``1 - (1 - tau_base)(cos(pi k/K) + 1)/2``
    (``k`` clamped to [0, K])."""
    if total <= 0:
        raise ValueError(f"momentum_tau: total steps must be > 0, got {total}")
    k = min(max(k, 0), total)
    return 1.0 - (1.0 - tau_base) * (math.cos(math.pi * k / total) + 1.0) / 2.0


@torch.no_grad()
def ema_update(target: Iterable[Tensor], online: Iterable[Tensor], tau: float) -> None:
    """``target <- tau * target + (1 - tau) * online``, in place, for matching tensors."""
    t, o = list(target), list(online)
    if len(t) != len(o):
        raise ValueError(f"ema_update: {len(t)} target tensors but {len(o)} online ones")
    torch._foreach_mul_(t, tau)
    torch._foreach_add_(t, o, alpha=1.0 - tau)


def byol_loss(q1: Tensor, q2: Tensor, t1: Tensor, t2: Tensor) -> Tensor:
    """Symmetrised BYOL loss: online predictions ``q1, q2`` against the target projections of the
    other view ``t2, t1``, which get no gradient (stop-gradient)."""
    return (2 - 2 * cosine(q1, t2.detach())).mean() + (2 - 2 * cosine(q2, t1.detach())).mean()


@register_method("byol", BYOLConfig)
class BYOL(Method):
    """BYOL: online network + predictor regress an EMA target network's projection of the other view."""

    exported: ClassVar[str] = (
        "the online backbone (`backbone.*`), which Grill et al. 2020 evaluate; the EMA target "
        "backbone stays in the checkpoint as `target_backbone.*`"
    )

    def __init__(self, cfg: BYOLConfig, backbone: nn.Module, views: Views, info: DataInfo):
        super().__init__(cfg, backbone, views, info)
        cfg.check()
        sync = cfg.sync_head_bn
        dim = backbone.feature_dim
        self.projector = mlp(dim, cfg.proj_hidden, cfg.proj_out, last_bias=False, sync_bn=sync)
        self.predictor = mlp(cfg.proj_out, cfg.pred_hidden, cfg.proj_out, last_bias=False, sync_bn=sync)
        self.target_backbone = copy.deepcopy(backbone)
        self.target_projector = copy.deepcopy(self.projector)
        for p in self.target_parameters():
            p.requires_grad_(False)
        # the EMA rate the next optimiser step will use (logged; set from the step in after_step)
        self.register_buffer("tau", torch.tensor(float(cfg.tau_base)))

    def online_parameters(self) -> Iterable[nn.Parameter]:
        return itertools.chain(self.backbone.parameters(), self.projector.parameters())

    def target_parameters(self) -> Iterable[nn.Parameter]:
        return itertools.chain(self.target_backbone.parameters(), self.target_projector.parameters())

    def loss_from_views(self, v1: Tensor, v2: Tensor) -> tuple[Tensor, Logs]:
        """Loss of two aligned batches of float views; each view is its own forward pass."""
        z1, z2 = self.projector(self.backbone(v1)), self.projector(self.backbone(v2))
        q1, q2 = self.predictor(z1), self.predictor(z2)
        with torch.no_grad():
            t1 = self.target_projector(self.target_backbone(v1))
            t2 = self.target_projector(self.target_backbone(v2))
        loss = byol_loss(q1, q2, t1, t2)
        logs = {"loss": loss.detach(), "tau": self.tau.detach().clone(),
                COLLAPSE_LOG: collapse_std(torch.cat([z1, z2]))}  # fmt: skip
        return loss, logs

    def forward(self, images: Tensor) -> tuple[Tensor, Logs]:
        return self.loss_from_views(*self.make_views(images))

    @torch.no_grad()
    def after_step(self, step: int, total_steps: int) -> None:
        """EMA update with the rate of the step just taken (0-based index ``step - 1``)."""
        ema_update(self.target_parameters(), self.online_parameters(),
                   momentum_tau(step - 1, total_steps, self.cfg.tau_base))  # fmt: skip
        self.tau.fill_(momentum_tau(step, total_steps, self.cfg.tau_base))
