"""Barlow Twins (Zbontar, Jing, Misra, LeCun, Deny 2021, "Barlow Twins: self-supervised learning
via redundancy reduction", ICML; arXiv 2103.03230): the cross-correlation of two views'
embeddings, standardised per dimension over the batch, is pushed towards the identity.

Projector: ``Linear(no bias) -> BN -> ReLU`` twice, then ``Linear`` (no bias), 8192-8192-8192 in the
paper (facebookresearch/barlowtwins ``main.py``); its BN layers are ``AllReduceBatchNorm1d``
(global-batch statistics, as the reference's ``convert_sync_batchnorm``). Each view is its own
forward pass. With ``z, z'`` a process's projector outputs ``[n, D]``, every dimension is
standardised with the mean and biased variance of the **global** batch (the reference code's
``BatchNorm1d(D, affine=False)`` under SyncBatchNorm, eps 1e-5):

    zhat_bd = (z_bd - mean_N(z_d)) / sqrt(var_N(z_d) + eps)
    C = (1/N) sum_{b in global batch} zhat_b zhat'_b^T                       [D, D]
    L = scale_loss * [ sum_i (1 - C_ii)^2 + lambda sum_{i != j} C_ij^2 ]

with lambda = 5e-3 (the paper, sec. 2 and fig. 4; the reference code's default is 0.0051), or
``lambd_per_dim``: lambda = 1/D, which keeps the two sums' weights comparable when D changes
(D diagonal entries against D (D - 1) off-diagonal ones).

Exact across processes: the per-dimension sums (and the row count) and then the sums of squared
deviations go through ``all_reduce_sum_grad`` (a differentiable all-reduce: its backward is an
all-reduce of the gradients), and so does each process's ``zhat^T zhat'``; ``C`` is then that sum
over ``N = n * P`` (the same ``n`` on every process). Every process computes the same ``C`` and
``L``; the backward hands each process the sum over processes of the gradients of its inputs, so
DDP's average is the one-process gradient on the concatenated batch
(tests/test_vicreg_barlow_ddp.py, fp64, 1e-10). Two variants shipped by others fail that check
and are kept in the test: a plain ``torch.distributed.all_reduce`` of ``C`` inside the loss (the
reference code's, lightly #1977 fixed by #1980, solo-learn's and mmpretrain's), whose gradient is
1/P of the true one under DDP averaging; and each process standardising its own batch
(solo-learn's ``barlow_loss_func``), a different function of the global batch. Statistics are
computed in fp32 at least (fp64 stays fp64), outside autocast.

Cost of the cross-process statistics per step, per process (bytes sent, = received; fp32; ring
all-reduce ``2 (P - 1)/P`` times the tensor; forward + backward), paper shapes: N = 2048, D = 8192:

    ===============================================  ========  =========  ==========
    P processes                                         2          8          64
    standardisation: [2D + 1] and [2D] all-reduces    0.25 MiB  0.44 MiB   0.49 MiB
    C: all-reduce of D^2 = 256 MiB, 4 (P - 1)/P D^2   512 MiB   896 MiB    1008 MiB
    projector BN (4 calls, 2 x (2 * 8192 + 1))        0.5 MiB   0.9 MiB    1.0 MiB
    for comparison, not used:
    C by gather-then-sum (fwd gather, bwd            512 MiB   3584 MiB   32256 MiB
      reduce-scatter: 2 (P - 1) D^2; holds P D^2)    (0.5 GiB) (2 GiB)    (16 GiB held)
    gather zhat, zhat' [n, 2D] instead of C           128 MiB   224 MiB    252 MiB
    ===============================================  ========  =========  ==========

The all-reduce of ``C`` costs ``D / N`` (4x here) more bytes than gathering the standardised
embeddings, but each process multiplies only its own ``n`` rows (``2 n D^2`` FLOPs: 4.3 GFLOP at
P = 64) where the gather would have every process form ``C`` from all ``N`` rows (0.27 TFLOP, the
same on every process). For scale: DDP's gradient all-reduce of ResNet-50 plus this projector
(~175 M parameters, 666 MiB) sends 2 (P - 1)/P x 666 MiB per process per step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from selfsup.augment.views import Views
from selfsup.data_info import DataInfo
from selfsup.pretrain.distributed import all_reduce_sum_grad, get_world_size
from selfsup.pretrain.methods.base import COLLAPSE_LOG, Logs, Method
from selfsup.pretrain.methods.registry import register_method
from selfsup.pretrain.methods.siamese import collapse_std, mlp
from selfsup.pretrain.methods.vicreg import off_diagonal

PAPER_LAMBDA = 5e-3


@dataclass
class BarlowTwinsConfig:
    proj_hidden: int = 8192  # the paper's 8192-8192-8192 (Zbontar et al. 2021, sec. 3 and fig. 2)
    proj_out: int = 8192
    proj_layers: int = 3  # Linear layers; all but the last followed by BN + ReLU
    lambd: float = PAPER_LAMBDA  # weight of the off-diagonal sum (paper: 5e-3)
    lambd_per_dim: bool = False  # lambda = 1 / proj_out instead of ``lambd``
    scale_loss: float = 1.0  # a constant factor on the loss (solo-learn's CIFAR recipe: 0.1)
    eps: float = 1e-5  # of the standardisation (the reference's BatchNorm1d default)
    sync_head_bn: bool = True  # projector BN over the global batch when there are several processes

    def check(self) -> None:
        for key in ("proj_hidden", "proj_out", "proj_layers"):
            if getattr(self, key) < 1:
                raise ValueError(f"method.barlow_twins.{key} must be >= 1, got {getattr(self, key)}")
        if self.lambd < 0:
            raise ValueError(f"method.barlow_twins.lambd must be >= 0, got {self.lambd}")
        if self.lambd_per_dim and self.lambd != PAPER_LAMBDA:
            raise ValueError("method.barlow_twins.lambd_per_dim=true sets lambda = 1/proj_out: "
                             f"leave method.barlow_twins.lambd unset (got {self.lambd})")  # fmt: skip
        if self.scale_loss <= 0:
            raise ValueError(f"method.barlow_twins.scale_loss must be > 0, got {self.scale_loss}")
        if self.eps <= 0:
            raise ValueError(f"method.barlow_twins.eps must be > 0, got {self.eps}")

    def off_diagonal_weight(self) -> float:
        return 1.0 / self.proj_out if self.lambd_per_dim else self.lambd


Sum = Callable[[Tensor], Tensor]


def cross_correlation(
    z1: Tensor, z2: Tensor, eps: float = 1e-5, *, stats_sum: Sum = all_reduce_sum_grad,
    corr_sum: Sum = all_reduce_sum_grad,
) -> Tensor:  # fmt: skip
    """``C`` ``[D, D]`` of the global batch from this process's ``z1``, ``z2`` ``[n, D]`` (module
    docstring). ``stats_sum`` sums the standardisation's statistics over processes and ``corr_sum``
    each process's ``zhat^T zhat'`` (both identity with one process)."""
    if z1.ndim != 2 or z1.shape != z2.shape:
        raise ValueError(f"barlow_twins: z1 and z2 must both be [n, D], got {tuple(z1.shape)} and {tuple(z2.shape)}")
    dtype = torch.promote_types(z1.dtype, torch.float32)
    with torch.autocast(z1.device.type, enabled=False):
        z = torch.stack([z1, z2]).to(dtype)  # [2, n, D]
        n, d = z.shape[1], z.shape[2]
        sums = stats_sum(torch.cat([z.sum(1).flatten(), z.new_full((1,), float(n))]))
        count = sums[-1].detach()  # rows the statistics are over: N, or n for per-process ones
        mean = sums[:-1].view(2, 1, d) / count
        dev = z - mean
        var = stats_sum(dev.pow(2).sum(1)) / count  # [2, D], biased (what BatchNorm normalises by)
        zhat = dev * torch.rsqrt(var + eps)[:, None, :]
        return corr_sum(zhat[0].T @ zhat[1]) / (n * get_world_size())


def barlow_twins_loss(c: Tensor, lambd: float) -> tuple[Tensor, Tensor, Tensor]:
    """``(sum_i (1 - C_ii)^2 + lambd * sum_{i != j} C_ij^2, on-diagonal sum, off-diagonal sum)``."""
    on = (1 - torch.diagonal(c)).pow(2).sum()
    off = off_diagonal(c).pow(2).sum()
    return on + lambd * off, on, off


@register_method("barlow_twins", BarlowTwinsConfig)
class BarlowTwins(Method):
    """Barlow Twins: shared backbone + projector, the global batch's cross-correlation towards I."""

    def __init__(self, cfg: BarlowTwinsConfig, backbone: nn.Module, views: Views, info: DataInfo):
        super().__init__(cfg, backbone, views, info)
        cfg.check()
        self.projector = mlp(backbone.feature_dim, cfg.proj_hidden, cfg.proj_out, cfg.proj_layers,
                             last_bias=False, sync_bn=cfg.sync_head_bn)  # fmt: skip

    def loss_from_views(self, v1: Tensor, v2: Tensor) -> tuple[Tensor, Logs]:
        """Loss of two aligned batches of float views; each view is its own forward pass."""
        z1, z2 = self.projector(self.backbone(v1)), self.projector(self.backbone(v2))
        c = cross_correlation(z1, z2, self.cfg.eps)
        loss, on, off = barlow_twins_loss(c, self.cfg.off_diagonal_weight())
        loss = self.cfg.scale_loss * loss
        logs = {"loss": loss.detach(), "on_diag": on.detach(), "off_diag": off.detach(),
                COLLAPSE_LOG: collapse_std(torch.cat([z1, z2]))}  # fmt: skip
        return loss, logs

    def forward(self, images: Tensor) -> tuple[Tensor, Logs]:
        return self.loss_from_views(*self.make_views(images))
