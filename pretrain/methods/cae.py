"""Contractive autoencoder (Rifai et al. 2011): reconstruction + ``λ ‖∂f(x)/∂x‖²_F`` per image.

``f`` is the encoder up to the code ``h`` (``[B, k]``, sigmoid by default as in the paper: with an
unbounded code the penalty could be met by shrinking the code while the decoder grows, which the
paper's tied weights rule out); ``x`` is the normalised image the encoder reads.

Two ways to get ``‖J‖²_F = Σ_j ‖∇_x h_j‖²``:

- ``exact``: one vector-Jacobian product per code unit (``k`` backward passes, kept in the graph).
  It is the per-image Frobenius norm when images do not interact in the encoder, which holds for the
  linear encoder (``linear: true``); a BatchNorm backbone in training mode couples the batch, so
  ``exact`` is only accepted with ``linear: true`` (``auto`` picks it there).
- ``estimate`` (``auto`` for backbones): Hutchinson's random projections. For ``u ~ N(0, I_k)``,
  ``E_u ‖Jᵀu‖² = tr(J Jᵀ) = ‖J‖²_F``: one double-backward VJP per projection, whatever ``k`` is.
  Unbiased; for Gaussian ``u`` the variance of one draw is ``2 ‖J Jᵀ‖²_F = 2 ‖JᵀJ‖²_F`` per image
  (``Var(uᵀAu) = 2 tr(A²)`` for symmetric ``A``), so ``projections`` draws divide it by their number.
  (A JVP with ``v ~ N(0, I)`` in input space estimates the same trace with the same variance; the
  VJP is used because double backward works through every layer and under autocast.) With
  BatchNorm in training mode the projection is taken through the batch map, so the estimate also
  counts the small (O(1/B)) cross-image blocks of its Jacobian.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from selfsup.pretrain.methods.ae import AE, AEConfig
from selfsup.pretrain.methods.base import Logs
from selfsup.pretrain.methods.registry import register_method

JACOBIANS = ("auto", "exact", "estimate")


@dataclass
class CAEConfig(AEConfig):
    SECTION: ClassVar[str] = "method.cae"
    code_activation: str = "sigmoid"
    lam: float = 0.1  # λ of λ‖J_f(x)‖²_F (per image)
    jacobian: str = "auto"  # auto | exact (linear encoder only) | estimate
    projections: int = 1  # random projections per image for the estimate

    def check(self) -> None:
        super().check()
        key = self.SECTION
        if self.lam < 0:
            raise ValueError(f"{key}.lam (the contraction weight λ) must be >= 0, got {self.lam}")
        if self.jacobian not in JACOBIANS:
            raise ValueError(f"{key}.jacobian: '{self.jacobian}' is not one of {', '.join(JACOBIANS)}")
        if self.projections < 1:
            raise ValueError(f"{key}.projections must be >= 1, got {self.projections}")
        if self.jacobian == "exact" and not self.linear:
            raise ValueError(
                f"{key}.jacobian=exact needs an encoder whose images do not interact "
                f"({key}.linear=true); a backbone with BatchNorm uses jacobian=estimate"
            )

    def exact(self) -> bool:
        return self.jacobian == "exact" or (self.jacobian == "auto" and self.linear)


def jacobian_frobenius_exact(code: Tensor, x: Tensor, create_graph: bool = True) -> Tensor:
    """``‖∂code_b/∂x_b‖²_F`` per image ``[B]``, from ``k`` VJPs (one per code unit). Exact when the
    images of the batch do not interact; ``code`` must be computed from ``x`` (requires grad)."""
    total = torch.zeros(code.shape[0], device=code.device, dtype=torch.float32)
    for j in range(code.shape[1]):
        (g,) = torch.autograd.grad(code[:, j].sum(), x, create_graph=create_graph, retain_graph=True)
        total = total + g.float().square().flatten(1).sum(dim=1)
    return total


def jacobian_frobenius_estimate(
    code: Tensor, x: Tensor, projections: int = 1, generator: torch.Generator | None = None,
    create_graph: bool = True,
) -> Tensor:
    """Unbiased estimate of ``‖∂code_b/∂x_b‖²_F`` per image ``[B]``: the mean over ``projections``
    draws of ``‖Jᵀu‖²``, ``u ~ N(0, I)``; variance per draw ``2 ‖JᵀJ‖²_F`` (module docstring)."""
    total = torch.zeros(code.shape[0], device=code.device, dtype=torch.float32)
    for _ in range(projections):
        u = torch.randn(code.shape, device=code.device, dtype=code.dtype, generator=generator)
        (g,) = torch.autograd.grad(code, x, grad_outputs=u, create_graph=create_graph, retain_graph=True)
        total = total + g.float().square().flatten(1).sum(dim=1)
    return total / projections


@register_method("cae", CAEConfig)
class CAE(AE):
    """Contractive autoencoder: penalty λ‖∂f(x)/∂x‖²_F (exact or random-projection estimate)."""

    def encoder_input(self, x: Tensor) -> Tensor:
        return x.detach().requires_grad_(True)

    def penalty(self, x: Tensor, code: Tensor) -> tuple[Tensor, Logs]:
        graph = self.cfg.lam > 0  # λ = 0: measured and logged only
        if self.cfg.exact():
            frob = jacobian_frobenius_exact(code, x, create_graph=graph)
        else:
            frob = jacobian_frobenius_estimate(code, x, self.cfg.projections, create_graph=graph)
        frob = frob.mean()
        return self.cfg.lam * frob, {"jacobian_frob2": frob.detach()}
