"""MoCo v3 (Chen, Xie & He 2021, "An Empirical Study of Training Self-Supervised Vision
Transformers", arXiv 2104.02057; reference code facebookresearch/moco-v3 ``moco/builder.py``,
``main_moco.py``): queries of one view against the momentum encoder's keys of the other view,
every process's keys in the softmax, no memory queue.

Networks (``moco/builder.py``). Base (query) encoder: backbone -> projector -> predictor.
Momentum (key) encoder: a copy of backbone + projector, never reached by gradients
(``requires_grad=False``: the optimiser, gradient clipping and DDP never see it), moved only by an
EMA of the base backbone + projector. MLPs: ``Linear(bias=False) -> BN -> ReLU`` blocks, then a
last ``Linear(bias=False)``; the projector ends in a BN without affine parameters, the predictor
too for a ViT but not for a ResNet (``MoCo_ViT`` / ``MoCo_ResNet``). Projector 2 layers (ResNet)
or 3 (ViT), predictor 2, hidden width 4096, output 256. Every head BN is an
``AllReduceBatchNorm1d`` (``siamese.mlp``): with several processes it normalises with the global
batch's statistics, the reference's SyncBN. Each view is its own forward pass (BN per view).

Loss, with ``q = predictor(projector(backbone(v)))`` and ``k = momentum_projector(momentum_backbone(v))``,
both L2-normalised (fp32 at least, outside autocast), ``n`` images per process, ``P`` processes,
``r`` this process's rank, keys ``K`` = the concatenation over ranks (rank-major) of every
process's ``k``, gathered WITHOUT gradient (they come from the momentum encoder):

    ctr(q, K) = 2 tau * mean_i CE(q_i K^T / tau, label_i),   label_i = i + r n
    L = ctr(q(v1), K(v2)) + ctr(q(v2), K(v1))

``label_i`` is where query ``i``'s positive key (the other view of the same image) sits in ``K``.
The ``2 tau`` factor makes the gradient scale independent of ``tau`` (the reference's comment);
``tau`` = 1.0 for a ResNet (``--moco-t`` default), 0.2 for a ViT (CONFIG.md). The loss is a mean
over this process's queries; DDP averages the processes' gradients, so N processes equal one
process on the concatenated batch (keys carry no gradient, so no term crosses processes;
tests/test_mocov3.py checks it to 1e-10 in fp64, and that un-offset labels fail the check).

Momentum: after the optimiser step that leaves ``k`` steps done (``after_step(k, K)``, once per
optimiser step, never per micro-batch), ``momentum <- m_k momentum + (1 - m_k) base`` with
``m_k = 1 - (1 - m)(cos(pi k / K) + 1) / 2`` (``--moco-m-cos``; ``byol.momentum_tau``): the
reference's ``adjust_moco_momentum`` at the start of iteration ``k``, which then updates the
momentum encoder before computing that iteration's keys, i.e. the same rates at the same points.
Frozen base parameters (a ViT's position table, the frozen patch projection) are left out of the
EMA: their copies stay bitwise equal. ``momentum`` (logged) is the rate of the last update;
``momentum_updates`` counts the updates (checkpointed).

ViT stability trick (the paper's section 4.2, ``--stop-grad-conv1``): the patch projection
``backbone.patch_embed.proj`` stays at its random initialisation (``frozen_patch_proj``, on by
default for a ViT).

Exported: the base encoder's backbone (``backbone.*``), which the reference's ``main_lincls.py``
and ``convert_to_deit.py`` keep (``base_encoder``, head removed).

Bytes moved per step (``collective_bytes``; fp32, received per process, fixed global batch
``N = 4096``, ``D = 256``, hidden 4096, one micro-batch per step). The key gather is ONE
all-gather of both views' keys ``[2n, D]``: each process receives ``(P - 1) 2n D 4`` bytes
(``2 N D 4 = 8 MiB`` as ``P`` grows), no backward. The head BNs all-reduce their statistics
through ``all_reduce_sum_grad``, an all-gather of ``[P, C + 1]`` and ``[P, C]`` per BN call (+ the
same as a reduce-scatter in backward for the base encoder's BNs), so it grows like ``P - 1``:

    processes |  key gather      | head BN (ResNet) | head BN (ViT)
    2         |   4,194,304 B    |     340,032 B    |     544,872 B
    8         |   7,340,032 B    |   2,380,224 B    |   3,814,104 B
    64        |   8,257,536 B    |  21,422,016 B    |  34,326,936 B

At 64 processes the BN statistics move more than the keys: a ring all-reduce would cap them at
about twice their size (0.68 MB ResNet, 1.09 MB ViT per step), a change to ``pretrain/distributed.py``, not here.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup.augment.views import Views
from selfsup.data_info import DataInfo
from selfsup.pretrain.distributed import all_gather_grad, get_rank
from selfsup.pretrain.methods.base import COLLAPSE_LOG, Logs, Method
from selfsup.pretrain.methods.byol import ema_update, momentum_tau
from selfsup.pretrain.methods.registry import register_method
from selfsup.pretrain.methods.siamese import collapse_std, mlp
from selfsup.pretrain.models.vit import VisionTransformer

PAPER_TEMPERATURE = {"resnet": 1.0, "vit": 0.2}  # main_moco.py --moco-t default; CONFIG.md ViT runs
PAPER_PROJ_LAYERS = {"resnet": 2, "vit": 3}  # moco/builder.py MoCo_ResNet / MoCo_ViT


@dataclass
class MoCoV3Config:
    proj_hidden: int = 4096  # --moco-mlp-dim
    proj_out: int = 256  # --moco-dim
    pred_hidden: int = 4096  # the reference's predictor uses --moco-mlp-dim too
    proj_layers: int | None = None  # None: 2 (ResNet) / 3 (ViT), as moco/builder.py
    temperature: float | None = None  # None: 1.0 (ResNet) / 0.2 (ViT), the paper's values
    momentum: float = 0.99  # --moco-m: the EMA rate at the first step
    momentum_cosine: bool = True  # --moco-m-cos: cosine schedule from `momentum` to 1
    frozen_patch_proj: bool | None = None  # ViT: --stop-grad-conv1; None = on for a ViT
    zero_init_residual: bool = False  # ResNet: last BN of each block starts at 0 (main_moco.py)
    sync_head_bn: bool = True  # heads' BN over the global batch when there are several processes

    def check(self) -> None:
        for key in ("proj_hidden", "proj_out", "pred_hidden"):
            if getattr(self, key) < 1:
                raise ValueError(f"method.mocov3.{key} must be >= 1, got {getattr(self, key)}")
        if self.proj_layers is not None and self.proj_layers < 2:
            raise ValueError(f"method.mocov3.proj_layers must be >= 2 (its last BN follows a hidden "
                             f"layer) or null for the paper's value, got {self.proj_layers}")  # fmt: skip
        if self.temperature is not None and not self.temperature > 0:
            raise ValueError(f"method.mocov3.temperature must be > 0 (or null), got {self.temperature}")
        if not 0.0 <= self.momentum <= 1.0:
            raise ValueError(f"method.mocov3.momentum must be in [0, 1], got {self.momentum}")

    def check_backbone(self, kind: str) -> None:
        """The combinations that depend on the backbone kind (resnet | vit)."""
        if self.frozen_patch_proj and kind != "vit":
            raise ValueError("method.mocov3.frozen_patch_proj=true needs a ViT backbone "
                             "(a ResNet has no patch projection)")  # fmt: skip
        if self.zero_init_residual and kind != "resnet":
            raise ValueError("method.mocov3.zero_init_residual=true needs a ResNet backbone")


def gather_keys(k: Tensor) -> Tensor:
    """Every process's ``k`` concatenated in rank order, WITHOUT gradient (momentum-encoder keys)."""
    with torch.no_grad():
        return all_gather_grad(k.detach())


def key_labels(n: int, device: torch.device | None = None) -> Tensor:
    """Index of each local query's positive among the gathered keys: ``i + rank * n``."""
    return torch.arange(n, device=device) + get_rank() * n


def mocov3_loss(
    q1: Tensor,
    q2: Tensor,
    k1: Tensor,
    k2: Tensor,
    temperature: float,
    *,
    gather: Callable[[Tensor], Tensor] = gather_keys,
    labels: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """``(loss, acc)``: the symmetrised, ``2 tau``-scaled InfoNCE of the module docstring.

    ``q1, q2``: this process's queries ``[n, D]`` of views 1 and 2; ``k1, k2``: its momentum keys
    (detached here). Both views' keys go through ONE ``gather`` (concatenation over processes).
    ``labels``: positives' indices in the gathered keys (default ``key_labels``). ``acc``: the
    fraction of queries (both directions) whose most similar key is their positive.
    """
    if q1.ndim != 2 or not q1.shape == q2.shape == k1.shape == k2.shape:
        raise ValueError(f"mocov3_loss: q1, q2, k1, k2 must all be [n, D], got "
                         f"{[tuple(t.shape) for t in (q1, q2, k1, k2)]}")  # fmt: skip
    if not temperature > 0:
        raise ValueError(f"method.mocov3.temperature must be > 0, got {temperature}")
    n, d = q1.shape
    dtype = torch.promote_types(q1.dtype, torch.float32)
    with torch.autocast(q1.device.type, enabled=False):
        local = F.normalize(torch.cat([k1, k2]).detach().to(dtype), dim=1)  # [2n, D]
        keys = gather(local).reshape(-1, 2, n, d)  # [P, 2, n, D]: per rank, view 1 then view 2
        keys1, keys2 = keys[:, 0].reshape(-1, d), keys[:, 1].reshape(-1, d)  # [P n, D] each
        target = key_labels(n, q1.device) if labels is None else labels
        loss, correct = q1.new_zeros((), dtype=dtype), q1.new_zeros((), dtype=dtype)
        for q, k in ((q1, keys2), (q2, keys1)):
            logits = F.normalize(q.to(dtype), dim=1) @ k.T / temperature
            loss = loss + F.cross_entropy(logits, target) * (2 * temperature)
            with torch.no_grad():
                correct = correct + (logits.argmax(dim=1) == target).to(dtype).mean()
    return loss, correct / 2


def collective_bytes(global_batch: int, processes: int, dim: int, hidden: int, vit: bool,
                     itemsize: int = 4) -> dict[str, int]:  # fmt: skip
    """Bytes each process receives per step (the docstring's table): ``keys`` (one all-gather of
    ``[2n, D]``) and ``head_bn`` (the heads' ``AllReduceBatchNorm1d`` statistics)."""
    n, others = global_batch // processes, processes - 1
    proj = [hidden] * (PAPER_PROJ_LAYERS["vit" if vit else "resnet"] - 1) + [dim]
    pred = [hidden] + ([dim] if vit else [])
    # a BN of C channels gathers C + 1, then C numbers from each other process; per view:
    # forward through base and momentum projectors and the predictor, backward through base ones
    bn_proj, bn_pred = sum(2 * c + 1 for c in proj), sum(2 * c + 1 for c in pred)
    forward, backward = 2 * (2 * bn_proj + bn_pred), 2 * (bn_proj + bn_pred)
    return {"keys": others * 2 * n * dim * itemsize, "head_bn": others * (forward + backward) * itemsize}


@register_method("mocov3", MoCoV3Config)
class MoCoV3(Method):
    """MoCo v3: queries (predictor on the base encoder) against all processes' momentum-encoder keys."""

    exported: ClassVar[str] = (
        "the base (query) encoder's backbone (`backbone.*`), which Chen et al. 2021 evaluate; the "
        "momentum encoder stays in the checkpoint as `momentum_backbone.*`"
    )

    def __init__(self, cfg: MoCoV3Config, backbone: nn.Module, views: Views, info: DataInfo):
        super().__init__(cfg, backbone, views, info)
        cfg.check()
        kind = "vit" if isinstance(backbone, VisionTransformer) else "resnet"
        cfg.check_backbone(kind)
        self.kind = kind
        self.temperature = cfg.temperature if cfg.temperature is not None else PAPER_TEMPERATURE[kind]
        if kind == "vit" and cfg.frozen_patch_proj is not False:
            backbone.patch_embed.proj.requires_grad_(False)  # random, frozen (the paper's sec. 4.2)
        if cfg.zero_init_residual:
            for block in backbone.modules():  # torchvision's zero_init_residual
                if hasattr(block, "conv2"):  # a BasicBlock (last BN: bn2) or a Bottleneck (bn3)
                    nn.init.zeros_(getattr(block, "bn3", block.bn2).weight)
        layers = cfg.proj_layers or PAPER_PROJ_LAYERS[kind]
        sync = cfg.sync_head_bn
        self.projector = mlp(backbone.feature_dim, cfg.proj_hidden, cfg.proj_out, layers, last_bn=True,
                             last_bn_affine=False, last_bias=False, sync_bn=sync)  # fmt: skip
        self.predictor = mlp(cfg.proj_out, cfg.pred_hidden, cfg.proj_out, 2, last_bn=kind == "vit",
                             last_bn_affine=False, last_bias=False, sync_bn=sync)  # fmt: skip
        self.momentum_backbone = copy.deepcopy(backbone)
        self.momentum_projector = copy.deepcopy(self.projector)
        for p in self.momentum_parameters():
            p.requires_grad_(False)
        self.register_buffer("momentum", torch.tensor(float(cfg.momentum)))  # rate of the last update
        self.register_buffer("momentum_updates", torch.zeros((), dtype=torch.long))

    def base_parameters(self) -> Iterator[nn.Parameter]:
        return itertools.chain(self.backbone.parameters(), self.projector.parameters())

    def momentum_parameters(self) -> Iterator[nn.Parameter]:
        return itertools.chain(self.momentum_backbone.parameters(), self.momentum_projector.parameters())

    def no_weight_decay(self) -> set[str]:
        own = getattr(self.backbone, "no_weight_decay", None)
        return set(own()) if callable(own) else set()

    def rate(self, step: int, total_steps: int) -> float:
        """The EMA rate of the update after ``step`` optimiser steps of ``total_steps``."""
        return momentum_tau(step, total_steps, self.cfg.momentum) if self.cfg.momentum_cosine else self.cfg.momentum

    def embeddings(self, v1: Tensor, v2: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """``(q1, q2, k1, k2, z)``: queries, momentum keys (no graph), projections of both views."""
        z1, z2 = self.projector(self.backbone(v1)), self.projector(self.backbone(v2))
        q1, q2 = self.predictor(z1), self.predictor(z2)
        with torch.no_grad():
            k1 = self.momentum_projector(self.momentum_backbone(v1))
            k2 = self.momentum_projector(self.momentum_backbone(v2))
        return q1, q2, k1, k2, torch.cat([z1, z2])

    def loss_from_views(self, v1: Tensor, v2: Tensor) -> tuple[Tensor, Logs]:
        """Loss of two aligned batches of float views."""
        q1, q2, k1, k2, _ = self.embeddings(v1, v2)
        loss, acc = mocov3_loss(q1, q2, k1, k2, self.temperature)
        logs = {"loss": loss.detach(), "acc": acc, "momentum": self.momentum.detach().clone(),
                COLLAPSE_LOG: collapse_std(torch.cat([q1, q2]))}  # fmt: skip
        return loss, logs

    def forward(self, images: Tensor) -> tuple[Tensor, Logs]:
        return self.loss_from_views(*self.make_views(images))

    @torch.no_grad()
    def after_step(self, step: int, total_steps: int) -> None:
        """One EMA update of the momentum encoder, with the rate for ``step`` steps done."""
        pairs = [(t, o) for t, o in zip(self.momentum_parameters(), self.base_parameters(), strict=True)
                 if o.requires_grad]  # fmt: skip  (frozen parameters never move: copies stay equal)
        m = self.rate(step, total_steps)
        ema_update([t for t, _ in pairs], [o for _, o in pairs], m)
        self.momentum.fill_(m)
        self.momentum_updates.add_(1)
