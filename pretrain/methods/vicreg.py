"""VICReg (Bardes, Ponce, LeCun 2022, "VICReg: Variance-Invariance-Covariance Regularization for
self-supervised learning", ICLR; arXiv 2105.04906): two views, a shared backbone and expander, and
a loss with no negatives, no predictor and no momentum network.

Expander: ``Linear -> BN -> ReLU`` twice, then ``Linear`` (no bias), 8192-8192-8192 in the paper;
its BN layers are ``AllReduceBatchNorm1d`` (statistics of the global batch, as the reference
code's ``convert_sync_batchnorm``). Each view is its own forward pass (BN statistics per view, as
facebookresearch/vicreg ``main_vicreg.py``). With ``z, z'`` the expander outputs ``[n, D]`` of a
process's ``n`` image pairs and ``Z, Z'`` those of the global batch ``[N, D]``:

    invariance  s = mean_{i, d} (z_id - z'_id)^2                      (this process's pairs)
    variance    v = 1/2 [ mean_d relu(1 - sqrt(Var_N(Z_d) + eps)) + same for Z' ]   (global)
    covariance  c = 1/D sum_{d != e} Cov_N(Z)_de^2 + same for Z'                   (global)
    L = 25 s + 25 v + 1 c        (sim_coeff, std_coeff, cov_coeff; eps = 1e-4)

``Var_N`` and ``Cov_N`` are unbiased (``/ (N - 1)``). This is the reference code: ``F.mse_loss``
(a mean over dimensions too, where the paper's eq. (5) sums them; the weights 25/25/1 are tuned
for the mean) and the ``/ 2`` on the variance term of both branches (solo-learn drops it, which
doubles the variance weight). The invariance term is a mean over local pairs: DDP's average of it
over processes is the global mean. The variance and covariance terms are statistics of the
global batch: ``Z, Z'`` come from ``all_gather_grad``, whose backward returns each process the sum
over processes of the gradients of its rows; every process computes the same ``v`` and ``c``, so
DDP's average of the summed gradients is the one-process gradient on the concatenated batch
(tests/test_vicreg_barlow_ddp.py, fp64, 1e-10). A gather whose backward returns only the local
slice (lightly #1528, fixed by #1531) scales the variance/covariance gradient by 1/P; the test
keeps that variant and watches it fail. Statistics are computed in fp32 at least (fp64 stays
fp64), outside autocast.

Cost of the cross-process statistics per step, per process (bytes sent, = received; fp32;
ring collectives; forward + backward), paper shapes: global batch N = 2048, D = 8192, the two
views gathered together as one ``[n, 2D]`` tensor:

    ==========================================  =========  =========  =========
    P processes                                     2          8         64
    gather of Z, Z' (fwd) + reduce-scatter (bwd)  128 MiB    224 MiB    252 MiB
      = 4 (P - 1)/P * N * D * 4 bytes
    alternative: all-reduce Z^T Z, Z'^T Z' and    1024 MiB   1792 MiB   2016 MiB
      their sums, 8 (P - 1)/P (D^2 + D) * 4 bytes
    expander BN (4 calls, 2 x (2 * 8192 + 1))     0.5 MiB    0.9 MiB    1.0 MiB
    ==========================================  =========  =========  =========

The gather is cheaper by ``2 D / N`` (8x here) and its memory is ``N x 2D`` (128 MiB); the price
is that every process forms the full ``D x D`` covariances from all ``N`` rows
(``2 * 2 N D^2`` = 0.55 TFLOP per step forward, about 3x that with backward, the same on every
process) where the all-reduce variant would split that work. For scale: DDP's gradient
all-reduce of ResNet-50 plus this expander (~175 M parameters, 666 MiB) sends
2 (P - 1)/P x 666 MiB, 0.65 to 1.3 GiB per process per step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup.augment.views import Views
from selfsup.data_info import DataInfo
from selfsup.pretrain.distributed import all_gather_grad
from selfsup.pretrain.methods.base import COLLAPSE_LOG, Logs, Method
from selfsup.pretrain.methods.registry import register_method
from selfsup.pretrain.methods.siamese import collapse_std, mlp


@dataclass
class VICRegConfig:
    expander_hidden: int = 8192  # the paper's 8192-8192-8192 (Bardes et al. 2022, sec. 4.1)
    expander_out: int = 8192
    expander_layers: int = 3  # Linear layers; all but the last followed by BN + ReLU
    sim_coeff: float = 25.0  # lambda in the paper (invariance)
    std_coeff: float = 25.0  # mu (variance)
    cov_coeff: float = 1.0  # nu (covariance)
    eps: float = 1e-4  # inside the square root of the variance term
    sync_head_bn: bool = True  # expander BN over the global batch when there are several processes

    def check(self) -> None:
        for key in ("expander_hidden", "expander_out", "expander_layers"):
            if getattr(self, key) < 1:
                raise ValueError(f"method.vicreg.{key} must be >= 1, got {getattr(self, key)}")
        for key in ("sim_coeff", "std_coeff", "cov_coeff"):
            if getattr(self, key) < 0:
                raise ValueError(f"method.vicreg.{key} must be >= 0, got {getattr(self, key)}")
        if self.sim_coeff == self.std_coeff == self.cov_coeff == 0:
            raise ValueError("method.vicreg.sim_coeff, std_coeff and cov_coeff are all 0: no loss")
        if self.eps <= 0:
            raise ValueError(f"method.vicreg.eps must be > 0, got {self.eps}")


def off_diagonal(m: Tensor) -> Tensor:
    """The ``d (d - 1)`` off-diagonal entries of a square matrix, flattened."""
    d = m.shape[0]
    return m.flatten()[:-1].view(d - 1, d + 1)[:, 1:].flatten()


def vicreg_terms(
    z1: Tensor, z2: Tensor, eps: float = 1e-4, *, gather: Callable[[Tensor], Tensor] = all_gather_grad
) -> dict[str, Tensor]:
    """The three unweighted terms ``invariance``, ``variance``, ``covariance`` (module docstring).

    ``z1``, ``z2``: this process's expander outputs ``[n, D]`` (same ``n`` on every process).
    ``gather`` concatenates a tensor over processes in rank order (identity with one process);
    both views go through one call.
    """
    if z1.ndim != 2 or z1.shape != z2.shape:
        raise ValueError(f"vicreg: z1 and z2 must both be [n, D], got {tuple(z1.shape)} and {tuple(z2.shape)}")
    dtype = torch.promote_types(z1.dtype, torch.float32)
    with torch.autocast(z1.device.type, enabled=False):
        z1, z2 = z1.to(dtype), z2.to(dtype)
        invariance = F.mse_loss(z1, z2)
        d = z1.shape[1]
        both = gather(torch.cat([z1, z2], dim=1))  # [N, 2D]: one collective for both views
        n_global = both.shape[0]
        if n_global < 2:
            raise ValueError("vicreg: the variance needs a global batch of at least 2 images")
        both = both - both.mean(dim=0)
        variance = both.new_zeros(())
        covariance = both.new_zeros(())
        for centred in (both[:, :d], both[:, d:]):
            std = torch.sqrt(centred.pow(2).sum(0) / (n_global - 1) + eps)
            variance = variance + F.relu(1 - std).mean() / 2
            cov = centred.T @ centred / (n_global - 1)
            covariance = covariance + off_diagonal(cov).pow(2).sum() / d
    return {"invariance": invariance, "variance": variance, "covariance": covariance}


def vicreg_loss(
    z1: Tensor, z2: Tensor, cfg: VICRegConfig, *, gather: Callable[[Tensor], Tensor] = all_gather_grad
) -> tuple[Tensor, dict[str, Tensor]]:
    """``sim_coeff * invariance + std_coeff * variance + cov_coeff * covariance`` and the terms."""
    terms = vicreg_terms(z1, z2, cfg.eps, gather=gather)
    loss = (cfg.sim_coeff * terms["invariance"] + cfg.std_coeff * terms["variance"]
            + cfg.cov_coeff * terms["covariance"])  # fmt: skip
    return loss, terms


@register_method("vicreg", VICRegConfig)
class VICReg(Method):
    """VICReg: shared backbone + expander, invariance + variance + covariance over the global batch."""

    def __init__(self, cfg: VICRegConfig, backbone: nn.Module, views: Views, info: DataInfo):
        super().__init__(cfg, backbone, views, info)
        cfg.check()
        self.expander = mlp(backbone.feature_dim, cfg.expander_hidden, cfg.expander_out, cfg.expander_layers,
                            last_bias=False, sync_bn=cfg.sync_head_bn)  # fmt: skip

    def loss_from_views(self, v1: Tensor, v2: Tensor) -> tuple[Tensor, Logs]:
        """Loss of two aligned batches of float views; each view is its own forward pass."""
        z1, z2 = self.expander(self.backbone(v1)), self.expander(self.backbone(v2))
        loss, terms = vicreg_loss(z1, z2, self.cfg)
        logs = {"loss": loss.detach(), **{k: v.detach() for k, v in terms.items()},
                COLLAPSE_LOG: collapse_std(torch.cat([z1, z2]))}  # fmt: skip
        return loss, logs

    def forward(self, images: Tensor) -> tuple[Tensor, Logs]:
        return self.loss_from_views(*self.make_views(images))
