"""Pieces BYOL and SimSiam share: MLP heads with batch norm, the cosine losses, the collapse monitor.

Heads are ``Linear -> BN -> ReLU`` blocks followed by a last ``Linear`` (optionally with a BN of
its own); every BN is an ``AllReduceBatchNorm1d`` when ``sync_bn`` is set, so with several
processes the heads normalise with the statistics of the global batch (the papers' cross-replica
BN) and the result, value and gradient, is the one process's on the concatenated batch. The
backbone's own BatchNorm2d layers stay per process unless ``train.sync_bn=true`` converts every BN
layer of the model (SyncBatchNorm on CUDA, the all-reduce twins elsewhere).

Both methods embed each view in its own forward pass (BN statistics per view, as in the papers'
code: Grill et al.'s ``byol_experiment.py`` and Chen & He's ``simsiam/builder.py``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup.pretrain.distributed import AllReduceBatchNorm1d


def mlp(
    in_dim: int,
    hidden: int,
    out: int,
    layers: int = 2,
    *,
    last_bn: bool = False,
    last_bn_affine: bool = True,
    last_bias: bool = True,
    sync_bn: bool = True,
) -> nn.Sequential:
    """``layers - 1`` blocks of ``Linear(bias=False) -> BN -> ReLU``, then ``Linear -> [BN]``.

    A Linear followed by BN has no bias (BN's shift replaces it). ``last_bn_affine=False`` is
    SimSiam's projector output: standardised per dimension, no learnt scale or shift.
    """
    if layers < 1:
        raise ValueError(f"mlp: layers must be >= 1, got {layers}")
    bn = AllReduceBatchNorm1d if sync_bn else nn.BatchNorm1d
    mods: list[nn.Module] = []
    dim = in_dim
    for _ in range(layers - 1):
        mods += [nn.Linear(dim, hidden, bias=False), bn(hidden), nn.ReLU(inplace=True)]
        dim = hidden
    mods.append(nn.Linear(dim, out, bias=last_bias and not last_bn))
    if last_bn:
        mods.append(bn(out, affine=last_bn_affine))
    return nn.Sequential(*mods)


def _unit(x: Tensor) -> Tensor:
    """L2-normalised rows in fp32 at least (fp64 stays fp64), outside autocast."""
    return F.normalize(x.to(torch.promote_types(x.dtype, torch.float32)), dim=1)


def cosine(p: Tensor, z: Tensor) -> Tensor:
    """Per-row cosine similarity ``[B]`` of ``p`` and ``z`` (computed in fp32 at least)."""
    with torch.autocast(p.device.type, enabled=False):
        return (_unit(p) * _unit(z)).sum(1)


@torch.no_grad()
def collapse_std(z: Tensor) -> Tensor:
    """Per-dimension std over the batch of the L2-normalised rows of ``z`` ``[B, d]``, averaged
    over dimensions, times sqrt(d): about 1 for outputs spread over the sphere, 0 when every row
    is the same vector (Chen & He 2021, fig. 2 plot the std without the sqrt(d))."""
    if z.ndim != 2 or z.shape[0] < 2:
        raise ValueError(f"collapse_std: expected [B >= 2, d], got {tuple(z.shape)}")
    with torch.autocast(z.device.type, enabled=False):
        return _unit(z.detach()).std(dim=0).mean() * math.sqrt(z.shape[1])
