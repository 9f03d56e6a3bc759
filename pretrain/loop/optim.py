"""Optimisers and the learning-rate schedule shared by every method.

Learning rate = ``base_lr * global_batch / 256`` (Goyal et al. 2017 linear scaling). Parameters
with at most one dimension (biases, BatchNorm/LayerNorm scales and shifts) and those a model lists
in ``no_weight_decay()`` (timm's convention: position embeddings, class token) get no weight decay
and, under LARS, no trust-ratio adaptation: scaling them by ``||w|| / ||g||`` destabilises
training (You et al. 2017; SimCLR excludes them the same way). A method can put parameters in
groups of their own (``param_groups_options()``, e.g. SimSiam's predictor with ``fixed_lr``: the
schedule leaves that group at its initial learning rate, as Chen & He 2021 recommend).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

OPTIMIZERS = ("lars", "adamw", "sgd")


@dataclass
class OptimConfig:
    name: str = "lars"  # lars | adamw | sgd
    base_lr: float = 0.3  # learning rate = base_lr * global_batch / 256
    weight_decay: float = 1e-6
    momentum: float = 0.9  # lars / sgd
    betas: tuple[float, float] = (0.9, 0.95)  # adamw
    lars_eta: float = 0.001  # LARS trust coefficient
    warmup: float = 0.05  # fraction of all optimiser steps spent in linear warmup
    min_lr_ratio: float = 0.0  # cosine ends at base lr * this

    def check(self) -> None:
        if self.name not in OPTIMIZERS:
            raise ValueError(f"optim.name: '{self.name}' is not one of {', '.join(OPTIMIZERS)}")
        if self.base_lr < 0 or self.weight_decay < 0:
            raise ValueError("optim.base_lr and optim.weight_decay must be >= 0")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"optim.momentum: must be in [0, 1), got {self.momentum}")
        if not 0.0 <= self.warmup < 1.0:
            raise ValueError(f"optim.warmup: a fraction in [0, 1), got {self.warmup}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"optim.min_lr_ratio: a fraction in [0, 1], got {self.min_lr_ratio}")


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise trust ratio ``eta * ||w|| / ||g + wd w||``.

    A group with ``lars_exclude=True`` is plain momentum SGD (its weight decay should be 0).
    Update: ``g' = g + wd w``; ``g' *= trust`` (not excluded, both norms > 0);
    ``buf = momentum * buf + g'``; ``w -= lr * buf``.
    """

    def __init__(
        self,
        params,
        lr: float,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        eta: float = 0.001,
    ):
        if lr < 0 or weight_decay < 0 or not 0 <= momentum < 1 or eta <= 0:
            raise ValueError(
                f"LARS: bad hyper-parameters lr={lr} weight_decay={weight_decay} "
                f"momentum={momentum} eta={eta}"
            )
        defaults = dict(
            lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta, lars_exclude=False
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if not group["lars_exclude"]:
                    d = d.add(p, alpha=group["weight_decay"])
                    w_norm, d_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(d)
                    one = torch.ones_like(w_norm)
                    trust = torch.where(
                        (w_norm > 0) & (d_norm > 0), group["eta"] * w_norm / d_norm, one
                    )
                    d = d.mul(trust)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.clone(d).detach()
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(d)
                p.add_(state["momentum_buffer"], alpha=-group["lr"])
        return loss


def split_decay(
    model: nn.Module, no_decay_names: Iterable[str] = ()
) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(parameters with weight decay, parameters without), trainable ones only. Parameters with
    at most one dimension, and those named (fully or by last component) in ``no_decay_names``
    (a method's ``no_weight_decay()``), get none."""
    skip = set(no_decay_names)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        excluded = p.ndim <= 1 or name in skip or name.split(".")[-1] in skip
        (no_decay if excluded else decay).append(p)
    return decay, no_decay


def scaled_lr(base_lr: float, global_batch: int) -> float:
    if global_batch <= 0:
        raise ValueError(f"global batch must be > 0, got {global_batch}")
    return base_lr * global_batch / 256


GROUP_OPTIONS = ("fixed_lr",)  # what a method's ``param_groups_options()`` may set per group


def param_groups(
    model: nn.Module,
    weight_decay: float,
    no_decay_names: Iterable[str] = (),
    group_options: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Trainable parameters in groups: (decayed, undecayed) for the parameters no option prefix
    covers, then the same pair for each prefix of ``group_options`` (a method's
    ``param_groups_options()``; the longest matching prefix wins) with its options copied into
    the group. Each group has ``decay`` (False: weight decay 0, no LARS adaptation)."""
    options = {str(k): dict(v) for k, v in (group_options or {}).items()}
    for prefix, opts in options.items():
        bad = sorted(set(opts) - set(GROUP_OPTIONS))
        if bad:
            raise ValueError(f"param_groups_options: '{prefix}' sets unknown option(s) {bad} "
                             f"(known: {', '.join(GROUP_OPTIONS)})")  # fmt: skip
    skip = set(no_decay_names)
    buckets: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = not (p.ndim <= 1 or name in skip or name.split(".")[-1] in skip)
        prefix = max((k for k in options if name.startswith(k)), key=len, default="")
        buckets.setdefault((prefix, decay), []).append(p)
    unused = sorted(k for k in options if not any(pre == k for pre, _ in buckets))
    if unused:
        raise ValueError(f"param_groups_options: no trainable parameter starts with {unused}")
    groups = []
    for prefix in ["", *sorted(options)]:  # the scheduled default groups first (logged lr)
        for decay in (True, False):
            params = buckets.get((prefix, decay))
            if params:
                groups.append({"params": params, "weight_decay": weight_decay if decay else 0.0,
                               "decay": decay, **options.get(prefix, {})})  # fmt: skip
    return groups


def build_optimizer(
    optim_cfg: OptimConfig,
    model: nn.Module,
    global_batch: int,
    no_decay_names: Iterable[str] = (),
    group_options: Mapping[str, Mapping[str, Any]] | None = None,
):
    """``optim_cfg.name`` (lars | adamw | sgd) over ``model``'s trainable parameters, lr linearly
    scaled; ``group_options`` as in ``param_groups``."""
    lr = scaled_lr(optim_cfg.base_lr, global_batch)
    groups = param_groups(model, optim_cfg.weight_decay, no_decay_names, group_options)
    if not groups:
        raise ValueError("build_optimizer: the model has no trainable parameters")
    name = optim_cfg.name
    if name == "lars":
        for g in groups:
            g["lars_exclude"] = not g["decay"]
        return LARS(groups, lr=lr, momentum=optim_cfg.momentum, eta=optim_cfg.lars_eta)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(optim_cfg.betas))
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=optim_cfg.momentum)
    raise ValueError(f"optim.name: unknown optimiser '{name}' (known: {', '.join(OPTIMIZERS)})")


@dataclass
class WarmupCosine:
    """LR factor at optimiser step ``t``: linear warmup to 1 over ``warmup_steps``, then a cosine
    to ``min_ratio`` reached just after the last of ``total_steps`` steps. A plain-data callable,
    so ``LambdaLR.state_dict()`` stores its fields (numbers) and loads with ``weights_only``."""

    warmup_steps: int
    total_steps: int
    min_ratio: float = 0.0

    def __call__(self, t: int) -> float:
        if t < self.warmup_steps:
            return (t + 1) / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (t - self.warmup_steps) / span)
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass
class Constant:
    """LR factor 1 at every step: a ``fixed_lr`` group keeps its initial learning rate."""

    def __call__(self, t: int) -> float:
        return 1.0


def build_scheduler(optimizer: torch.optim.Optimizer, optim_cfg: OptimConfig, total_steps: int):
    """Per-iteration warmup + cosine (``scheduler.step()`` after every optimiser step); groups
    with ``fixed_lr`` stay at their initial learning rate."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be > 0, got {total_steps}")
    warmup = int(round(optim_cfg.warmup * total_steps))
    fn = WarmupCosine(warmup, total_steps, optim_cfg.min_lr_ratio)
    # one factor per group: LambdaLR with a single function would scale the fixed-lr groups too
    fns = [Constant() if g.get("fixed_lr") else fn for g in optimizer.param_groups]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fns)
