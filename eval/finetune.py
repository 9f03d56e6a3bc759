"""The ``finetune`` protocol: the backbone and a linear head trained end to end on the train labels.

Recipe (MAE, He et al. 2022, appendix A.2 and the reference code's ``main_finetune.py`` /
``util/lr_decay.py``; layer-wise decay from BEiT, Bao et al. 2022): AdamW (β = 0.9, 0.999, weight
decay 0.05; none on biases, norms, the class token and position table), a linear warm-up then a
cosine decay to zero inside the budget, cross-entropy with label smoothing 0.1, and for ViTs a
layer-wise learning-rate decay: with ``L = depth + 1``, the patch embedding and class token get
``lr·d^L``, block ``i`` gets ``lr·d^(L−1−i)``, the final norm and the head ``lr`` (``d`` =
``layer_decay``: MAE uses 0.65 for ViT-B and 0.75 for ViT-L/H; ResNets get no decay). The head is
initialised as timm's (normal, std 2e-5; zero bias). MAE's RandAugment, mixup, cutmix and drop path
are left out: the images get the run's own view recipe, one view per image per step, on the device.

The learning rate is chosen from ``lrs`` by top-1 on a stratified validation split carved from
the TRAIN set (``val_fraction``); each candidate trains on the rest. The chosen candidate is not
refit on the whole train set: its model is the one scored, once, on the test set. The backbone
passed in is deep-copied and never modified; a random-init backbone fine-tuned by the same function
is the baseline (``eval.run``).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.model_selection import train_test_split
from torch import nn

from selfsup.augment.views import Views

DEFAULT_LRS = (3e-3, 1e-3, 3e-4)
HEAD_INIT_STD = 2e-5  # timm / MAE: trunc_normal_(head.weight, std=2e-5)


@dataclass
class FinetuneOptions:
    epochs: int = 5
    lrs: Sequence[float] = DEFAULT_LRS
    layer_decay: float = 0.75  # ViTs only (MAE: 0.65 ViT-B, 0.75 ViT-L/H)
    weight_decay: float = 0.05
    batch_size: int = 256
    warmup_fraction: float = 0.1
    label_smoothing: float = 0.1
    val_fraction: float = 0.1
    max_train: int = 0  # > 0: fine-tune on a stratified subset of this many train images
    seed: int = 0

    def check(self) -> None:
        """Bad values are ValueErrors naming the command-line flag."""
        if self.epochs < 1:
            raise ValueError(f"--finetune-epochs must be >= 1, got {self.epochs}")
        if not self.lrs or min(self.lrs) <= 0:
            raise ValueError(f"--finetune-lrs: positive learning rates, got {list(self.lrs)}")
        if not 0.0 < self.layer_decay <= 1.0:
            raise ValueError(f"--finetune-layer-decay must be in (0, 1], got {self.layer_decay}")
        if self.weight_decay < 0:
            raise ValueError(f"--finetune-weight-decay must be >= 0, got {self.weight_decay}")
        if self.batch_size < 1:
            raise ValueError(f"--finetune-batch-size must be >= 1, got {self.batch_size}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"finetune val_fraction must be in (0, 1), got {self.val_fraction}")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ValueError(f"finetune warmup_fraction must be in [0, 1), got {self.warmup_fraction}")


class Classifier(nn.Module):
    """Backbone + linear head on its pooled features."""

    def __init__(self, backbone: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.feature_dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=HEAD_INIT_STD)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def is_vit(backbone: nn.Module) -> bool:
    return hasattr(backbone, "blocks") and hasattr(backbone, "patch_embed")


def layer_id(name: str, num_layers: int) -> int:
    """MAE's ``get_layer_id_for_vit`` on a backbone parameter name (timm names)."""
    if name in ("cls_token", "pos_embed") or name.startswith("patch_embed"):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return num_layers


def lr_scales(model: Classifier, layer_decay: float) -> dict[str, float]:
    """Learning-rate multiplier of every trainable parameter of ``model`` (full names):
    ``layer_decay ** (L − layer_id)`` for a ViT backbone (L = depth + 1, head at layer L), 1 else."""
    bb = model.backbone
    out = {}
    num_layers = len(bb.blocks) + 1 if is_vit(bb) else 0
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if num_layers and name.startswith("backbone."):
            out[name] = layer_decay ** (num_layers - layer_id(name[len("backbone."):], num_layers))
        else:
            out[name] = 1.0
    return out


def param_groups(model: Classifier, lr: float, weight_decay: float,
                 layer_decay: float) -> list[dict[str, Any]]:
    """AdamW groups, one per (lr scale, decayed or not); each keeps its ``names`` and ``lr_scale``."""
    nwd = getattr(model.backbone, "no_weight_decay", lambda: set())()
    scales = lr_scales(model, layer_decay)
    groups: dict[tuple[float, bool], dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if name not in scales:
            continue
        short = name.split(".", 1)[1]
        decay = not (p.ndim <= 1 or short in nwd or name.split(".")[-1] in nwd)
        g = groups.setdefault((scales[name], decay), {
            "params": [], "names": [], "lr_scale": scales[name], "lr": lr * scales[name],
            "weight_decay": weight_decay if decay else 0.0})
        g["params"].append(p)
        g["names"].append(name)
    return list(groups.values())


def schedule(step: int, total: int, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then half a cosine to zero at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def train_classifier(model: Classifier, views: Views, images: torch.Tensor, labels: torch.Tensor,
                     lr: float, opts: FinetuneOptions, device: torch.device, seed: int) -> Classifier:
    """Fine-tune ``model`` in place for ``opts.epochs`` epochs of ``images`` (uint8, on the CPU)."""
    groups = param_groups(model, lr, opts.weight_decay, opts.layer_decay)
    opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999))
    base = [g["lr"] for g in opt.param_groups]
    n = images.shape[0]
    per_epoch = max(1, n // opts.batch_size)  # drop the last partial batch (BatchNorm)
    total = per_epoch * opts.epochs
    warmup = int(opts.warmup_fraction * total)
    gen = torch.Generator().manual_seed(seed)
    vgen = torch.Generator(device=device).manual_seed(seed)
    model.to(device).train()
    step = 0
    for _ in range(opts.epochs):
        order = torch.randperm(n, generator=gen)
        for i in range(per_epoch):
            idx = order[i * opts.batch_size : (i + 1) * opts.batch_size]
            x = views(images[idx].to(device, non_blocking=True), n_views=1, generator=vgen)[0]
            y = labels[idx].to(device)
            f = schedule(step, total, warmup)
            for g, b in zip(opt.param_groups, base, strict=True):
                g["lr"] = b * f
            with _autocast(device):
                logits = model(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=opts.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    return model.eval()


@torch.no_grad()
def accuracy(model: Classifier, plain: Views, images: torch.Tensor, labels: torch.Tensor,
             device: torch.device, batch_size: int = 512) -> tuple[float, float]:
    """Top-1 and top-5 accuracy (%) with the plain views (resize + normalise, no augmentation)."""
    model.eval()
    hit1 = hit5 = 0
    for i in range(0, images.shape[0], batch_size):
        x = plain(images[i : i + batch_size].to(device), n_views=1)[0]
        y = labels[i : i + batch_size].to(device)
        with _autocast(device):
            logits = model(x).float()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hit1 += int((top[:, 0] == y).sum())
        hit5 += int((top == y[:, None]).any(1).sum())
    n = images.shape[0]
    return 100.0 * hit1 / n, 100.0 * hit5 / n


def split_train(labels: np.ndarray, val_fraction: float, max_train: int,
                seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit rows, validation rows) of the train set, stratified; ``max_train`` caps the total."""
    rows = np.arange(len(labels))
    if 0 < max_train < len(rows):
        rows, _ = train_test_split(rows, train_size=max_train, stratify=labels, random_state=seed)
    fit, val = train_test_split(rows, test_size=val_fraction, stratify=labels[rows],
                                random_state=seed)
    return np.sort(fit), np.sort(val)


def finetune(backbone: nn.Module, views: Views, train_images: torch.Tensor,
             train_labels: torch.Tensor, test_images: torch.Tensor, test_labels: torch.Tensor,
             num_classes: int, opts: FinetuneOptions | None = None,
             device: str | torch.device | None = None) -> tuple[dict[str, float], dict[str, Any]]:
    """Fine-tune a copy of ``backbone`` for every learning rate, keep the best on validation,
    score it on test. Returns ``(metrics, details)``; ``details["model"]`` is the chosen model."""
    opts = opts or FinetuneOptions()
    opts.check()
    dev = torch.device(device or "cpu")
    y = train_labels.numpy().astype(np.int64)
    fit, val = split_train(y, opts.val_fraction, opts.max_train, opts.seed)
    fit_t, val_t = torch.as_tensor(fit), torch.as_tensor(val)
    views, plain = views.to(dev), views.plain().to(dev)
    best: tuple[float, float, Classifier | None] = (-1.0, 0.0, None)
    per_lr = {}
    for lr in opts.lrs:
        state = torch.random.get_rng_state()
        torch.manual_seed(opts.seed)  # the same head initialisation for every candidate
        model = Classifier(copy.deepcopy(backbone), num_classes)
        torch.random.set_rng_state(state)
        train_classifier(model, views, train_images[fit_t], train_labels[fit_t], lr, opts, dev,
                         opts.seed)
        val_top1, _ = accuracy(model, plain, train_images[val_t], train_labels[val_t], dev)
        per_lr[lr] = val_top1
        if val_top1 > best[0]:
            best = (val_top1, lr, model)
        else:
            del model
    val_top1, lr, model = best
    top1, top5 = accuracy(model, plain, test_images, test_labels, dev)
    metrics = {"finetune_top1": top1}
    if num_classes > 5:
        metrics["finetune_top5"] = top5
    metrics.update({"finetune_lr": lr, "finetune_val_top1": val_top1})
    details = {"val_top1_per_lr": {str(k): v for k, v in per_lr.items()}, "fit_rows": len(fit),
               "val_rows": len(val), "epochs": opts.epochs,
               "layer_decay": opts.layer_decay if is_vit(backbone) else None,
               "recipe": views.cfg.recipe, "model": model}
    return metrics, details


def note(opts: FinetuneOptions, recipe: str, source: str, vit: bool) -> str:
    decay = f"layer-wise lr decay {opts.layer_decay:g}" if vit else "no layer-wise decay (not a ViT)"
    return (f"Fine-tune: backbone + linear head, {opts.epochs} epoch(s), AdamW wd "
            f"{opts.weight_decay:g}, {decay}, batch {opts.batch_size}, warm-up "
            f"{opts.warmup_fraction:g} then cosine, label smoothing {opts.label_smoothing:g}; "
            f"views: the '{recipe}' recipe ({source}); lr from {list(opts.lrs)} by top-1 on a "
            f"{opts.val_fraction:g} stratified validation split of train (not refit); random_init "
            "is the same architecture fine-tuned the same way; raw pixels: not applicable.")


def finetune_views(where, info) -> tuple[Views, str]:
    """The run's own view recipe (``augment`` of its config), or resized crop + flip (MAE's
    recipe) for an export folder, which stores no recipe; and where it came from."""
    from selfsup.augment.views import AugmentConfig, build_views
    from selfsup.pretrain.run import rundir

    if where.run_dir is not None:
        return build_views(rundir.read_config(where.run_dir).augment, info), "the run's augment.*"
    return (build_views(AugmentConfig(recipe="mae"), info),
            "an export stores no recipe: resized crop + flip")


def run_finetune(where, info, backbones: dict[str, nn.Module | None], train, test,
                 num_classes: int, opts: FinetuneOptions,
                 device: str | None) -> dict[str, Any]:
    """The protocol for ``eval.run``: every backbone by column name (None: skipped) fine-tuned the
    same way. Returns ``{"metrics": {name: ...}, "details": {name: ...}, "note": str}``."""
    views, source = finetune_views(where, info)
    metrics, details = {}, {}
    for name, net in backbones.items():
        if net is None:
            continue
        metrics[name], d = finetune(net, views, train.images, train.labels, test.images,
                                    test.labels, num_classes, opts, device)
        d.pop("model")
        details[name] = d
    vit = is_vit(backbones["pretrained"])
    return {"metrics": metrics, "details": details,
            "note": note(opts, views.cfg.recipe, source, vit)}
