"""SimCLR (Chen et al. 2020): two augmented views, an MLP projection head, NT-Xent over all processes.

Negatives come from every process. Each process embeds its local batch of ``n`` images (``2n``
views), gathers the ``2N`` embeddings of all processes with a gather that carries gradients back
(``selfsup.pretrain.distributed.all_gather_grad``), and scores its ``2n`` local anchors against all
``2N`` keys: the positive of a view is the other view of the same image, found at a rank-offset
index in the gathered keys; the anchor's own key is masked. The loss is the mean over local
anchors. DDP averages the per-process gradients, and each process's gradient also holds the terms
the other processes' losses send back through the gather, so the update equals that of one process
holding the whole global batch (checked to 1e-10 in fp64 by tests/test_simclr.py). Batch-norm
statistics stay per process (per GradCache sub-batch in that mode), as in any DDP model, unless
``train.sync_bn=true`` (every BN over the global batch: SyncBatchNorm on CUDA, the all-reduce twins
of ``pretrain/distributed.py`` on CPU/gloo).

Memory, with global batch ``N`` over ``P`` processes (``n = N / P``), embedding dim ``D``, ``a``
bytes of backbone+head activations per view, fp32 logits (4 bytes):

- plain loss (``loss_chunk = 0``): ``2n * a`` activations + about ``3 * 4 * (2n) * (2N)`` bytes
  for the logits, their log-softmax (kept for backward) and its gradient: O(n N).
- chunked loss (``loss_chunk = c``): ``2n * a`` + ``4 * c * (2N)`` bytes for one block of rows,
  reused in place (its gradient is formed in the forward pass) +
  ``4 * 2 * (2N + 2n) * D`` for the keys and their gradients: O(c N + N D).
- GradCache (``grad_cache_chunk = g``): ``2g * a`` activations (one sub-batch at a time) +
  ``2 * 4 * 2n * D`` for the cached embeddings and their gradients + the loss term above. The
  number of negatives is then bounded by the O(N D) terms, not by activation memory; the price is
  one extra forward pass (about +1/3 compute), and batch-norm running statistics are updated
  twice per sub-batch (by the embedding pass and by the re-forward).

Gradient accumulation does NOT add negatives (each micro-batch only sees its own keys); GradCache
does, at the same peak activation memory.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup.augment.views import Views, build_views
from selfsup.data_info import DataInfo
from selfsup.pretrain.distributed import all_gather_grad, get_rank, get_world_size
from selfsup.pretrain.methods.base import Logs, Method, StepContext
from selfsup.pretrain.methods.registry import register_method


@dataclass
class SimCLRConfig:
    temperature: float = 0.2
    proj_hidden: int = 512
    proj_out: int = 128
    proj_layers: int = 2  # Linear layers in the head; all but the last are followed by BN + ReLU
    loss_chunk: int = 0  # rows of the logit matrix per chunk; 0 = whole matrix at once
    grad_cache_chunk: int = 0  # >0: GradCache mode, embed sub-batches of this many images
    # multi-crop (Caron et al. 2020): this many extra small views per image, every view of an
    # image a positive of every other (multi_crop_info_nce); 0 = the two-view NT-Xent
    small_crops: int = 0
    small_size: int = 0  # side of the small views in pixels; 0 = half the views' size
    small_scale: tuple[float, float] = (0.05, 0.3)  # area fraction of the source per small view

    def check(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"method.simclr.temperature must be > 0, got {self.temperature}")
        for key in ("proj_hidden", "proj_out", "proj_layers"):
            if getattr(self, key) < 1:
                raise ValueError(f"method.simclr.{key} must be >= 1, got {getattr(self, key)}")
        lo, hi = self.small_scale
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"method.simclr.small_scale: need 0 < min <= max <= 1, got {tuple(self.small_scale)}")
        if self.small_crops and (self.grad_cache_chunk or self.loss_chunk):
            raise ValueError("method.simclr.small_crops needs grad_cache_chunk=0 and loss_chunk=0")
        for key in ("loss_chunk", "grad_cache_chunk", "small_crops", "small_size"):
            if getattr(self, key) < 0:
                raise ValueError(f"method.simclr.{key} must be >= 0, got {getattr(self, key)}")


class ProjectionHead(nn.Module):
    """``Linear -> BN -> ReLU`` repeated, then a final ``Linear`` (SimCLR's nonlinear head)."""

    def __init__(self, in_dim: int, hidden: int, out: int, layers: int):
        super().__init__()
        if layers < 1:
            raise ValueError(f"method.simclr.proj_layers must be >= 1, got {layers}")
        mods: list[nn.Module] = []
        dim = in_dim
        for _ in range(layers - 1):
            mods += [nn.Linear(dim, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(True)]
            dim = hidden
        mods.append(nn.Linear(dim, out))
        self.net = nn.Sequential(*mods)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class InfoNCEResult(NamedTuple):
    loss: Tensor  # scalar, mean over local anchors, differentiable
    acc: Tensor  # fraction of local anchors whose top-1 key (self excluded) is the positive


class _ChunkedInfoNCE(torch.autograd.Function):
    """Cross-entropy of ``anchors @ keys.T`` over row blocks, never holding the whole matrix.

    The loss is a scalar at the end of the graph, so its gradient w.r.t. each block of logits,
    ``softmax - onehot``, is known in the forward pass: each block's contribution to the anchor
    and key gradients is accumulated there and the block freed. Backward only scales the stored
    gradients by the incoming scalar (no recomputation). Not twice differentiable.
    """

    @staticmethod
    def forward(ctx, anchors, keys, self_idx, pos_idx, chunk: int, want_grad: bool):
        m = anchors.shape[0]
        total = anchors.new_zeros(())
        correct = torch.zeros((), dtype=torch.long, device=anchors.device)
        grad_a = torch.empty_like(anchors) if want_grad else None
        grad_k = torch.zeros_like(keys) if want_grad else None
        # one block buffer, reused: every step below works in place on it
        buf = anchors.new_empty((min(chunk, m), keys.shape[0]))
        for s in range(0, m, chunk):
            e = min(s + chunk, m)
            a = anchors[s:e]
            rows = torch.arange(e - s, device=anchors.device)
            pos = pos_idx[s:e]
            logits = torch.mm(a, keys.T, out=buf[: e - s])
            logits[rows, self_idx[s:e]] = float("-inf")
            pos_logit = logits[rows, pos]
            rowmax, top = logits.max(dim=1)
            correct += (top == pos).sum()
            p = logits.sub_(rowmax[:, None]).exp_()  # the masked self entry becomes 0
            denom = p.sum(dim=1)
            total += (denom.log() + rowmax - pos_logit).sum()  # logsumexp - positive logit
            if want_grad:
                p.div_(denom[:, None])  # softmax
                p[rows, pos] -= 1.0
                torch.mm(p, keys, out=grad_a[s:e])
                grad_k.addmm_(p.T, a)
        if want_grad:
            ctx.save_for_backward(grad_a / m, grad_k / m)
        acc = correct.to(anchors.dtype) / m
        ctx.mark_non_differentiable(acc)
        return total / m, acc

    @staticmethod
    def backward(ctx, grad_loss, _grad_acc):
        grad_a, grad_k = ctx.saved_tensors
        return grad_a * grad_loss, grad_k * grad_loss, None, None, None, None


def info_nce(
    z1: Tensor,
    z2: Tensor,
    temperature: float,
    *,
    chunk: int = 0,
    gather: Callable[[Tensor], Tensor] = all_gather_grad,
) -> InfoNCEResult:
    """NT-Xent for two views: local anchors against the keys of every process.

    ``z1``, ``z2``: this process's embeddings ``[n, D]`` of view 1 and 2 (same ``n`` on every
    process), not necessarily normalised. ``gather`` concatenates a tensor over processes in rank
    order (identity with one process). Logits are computed in fp32 (fp64 if the input is fp64),
    outside autocast. ``chunk > 0`` processes that many anchor rows at a time (same value and
    gradient, O(chunk * N) memory instead of O(n * N)).
    """
    if z1.ndim != 2 or z1.shape != z2.shape:
        raise ValueError(
            f"info_nce: z1 and z2 must both be [n, D], got {tuple(z1.shape)} and {tuple(z2.shape)}"
        )
    if temperature <= 0:
        raise ValueError(f"method.simclr.temperature must be > 0, got {temperature}")
    if chunk < 0:
        raise ValueError(f"method.simclr.loss_chunk must be >= 0, got {chunk}")
    n = z1.shape[0]
    dtype = torch.promote_types(z1.dtype, torch.float32)
    with torch.autocast(z1.device.type, enabled=False):
        local = F.normalize(torch.cat([z1, z2]).to(dtype), dim=1)  # [2n, D]: view 1 then view 2
        keys = gather(local)  # [2N, D], rank-major: rank r holds rows r*2n .. r*2n + 2n - 1
        offset = get_rank() * 2 * n
        idx = torch.arange(2 * n, device=local.device)
        self_idx = offset + idx
        pos_idx = offset + (idx + n) % (2 * n)
        anchors = local / temperature
        if chunk == 0:
            logits = anchors @ keys.T
            logits[idx, self_idx] = float("-inf")
            loss = F.cross_entropy(logits, pos_idx)
            with torch.no_grad():
                acc = (logits.argmax(dim=1) == pos_idx).to(dtype).mean()
            return InfoNCEResult(loss, acc)
        want_grad = torch.is_grad_enabled() and (anchors.requires_grad or keys.requires_grad)
        loss, acc = _ChunkedInfoNCE.apply(anchors, keys, self_idx, pos_idx, chunk, want_grad)
        return InfoNCEResult(loss, acc)


def multi_crop_info_nce(
    z: list[Tensor], temperature: float, *, gather: Callable[[Tensor], Tensor] = all_gather_grad
) -> InfoNCEResult:
    """InfoNCE over ``V >= 2`` views per image, every other view of an image a positive.

    ``z``: ``V`` tensors ``[n, D]`` (this process's embeddings of view ``v`` of its ``n`` images).
    Each anchor's loss is the mean over its ``V - 1`` positives ``p`` of
    ``-log(exp(s_p) / (exp(s_p) + sum_k exp(s_k)))``, ``k`` over the views of every other image of
    every process (solo-learn's multi-crop SimCLR loss); with ``V = 2`` that is ``info_nce``.
    ``acc``: fraction of anchors whose most similar key (self excluded) is one of their positives.
    """
    n, views = z[0].shape[0], len(z)
    dtype = torch.promote_types(z[0].dtype, torch.float32)
    with torch.autocast(z[0].device.type, enabled=False):
        local = F.normalize(torch.cat(z).to(dtype), dim=1)  # [V n, D], view-major
        keys = gather(local)  # [P V n, D], rank-major
        rows = torch.arange(views * n, device=local.device)
        key_rows = torch.arange(keys.shape[0], device=local.device)
        image_of_key = (key_rows // (views * n)) * n + key_rows % n  # global image index
        image_of_row = get_rank() * n + rows % n
        logits = local @ keys.T / temperature
        same = image_of_row[:, None] == image_of_key[None, :]
        is_self = key_rows[None, :] == (get_rank() * views * n + rows)[:, None]
        neg = torch.logsumexp(logits.masked_fill(same, float("-inf")), dim=1, keepdim=True)
        per_pair = torch.logaddexp(logits, neg) - logits  # -log(e^s_p / (e^s_p + negatives))
        positive = same & ~is_self
        loss = (per_pair * positive).sum(1).div(views - 1).mean()
        with torch.no_grad():
            top = logits.masked_fill(is_self, float("-inf")).argmax(dim=1)
            acc = positive.gather(1, top[:, None]).to(dtype).mean()
    return InfoNCEResult(loss, acc)


class _RngReplay:
    """Captures the RNG state before a forward pass so the re-forward draws the same numbers
    (dropout / drop-path in a backbone would otherwise differ between GradCache's two passes)."""

    def __init__(self, device: torch.device):
        self.devices = [device] if device.type == "cuda" else []
        self.cpu = torch.get_rng_state()
        self.cuda = [torch.cuda.get_rng_state(d) for d in self.devices]

    def __enter__(self) -> None:
        self._fork = torch.random.fork_rng(devices=self.devices)
        self._fork.__enter__()
        torch.set_rng_state(self.cpu)
        for d, state in zip(self.devices, self.cuda, strict=True):
            torch.cuda.set_rng_state(state, d)

    def __exit__(self, *exc: Any) -> None:
        self._fork.__exit__(*exc)


@register_method("simclr", SimCLRConfig)
class SimCLR(Method):
    """SimCLR: backbone + projection head, NT-Xent over two views and every process's keys.

    With ``grad_cache_chunk > 0`` the method owns its backward (``train_step``): the loss over
    the whole batch is computed from embeddings made without a graph, and the backbone is then
    re-run one sub-batch at a time with the cached embedding gradients.
    """

    def __init__(self, cfg: SimCLRConfig, backbone: nn.Module, views: Views, info: DataInfo):
        super().__init__(cfg, backbone, views, info)
        cfg.check()
        self.head = ProjectionHead(
            self.backbone.feature_dim, cfg.proj_hidden, cfg.proj_out, cfg.proj_layers
        )
        self.owns_backward = cfg.grad_cache_chunk > 0
        self.small_views = None
        if cfg.small_crops:
            small = dataclasses.replace(views.cfg, scale=tuple(cfg.small_scale), size=cfg.small_size or views.size // 2)
            self.small_views = build_views(small, info)

    def embed(self, x: Tensor) -> Tensor:
        """Projection ``[B, proj_out]`` of normalised float images (before L2 normalisation)."""
        return self.head(self.backbone(x))

    def loss_from_views(self, v1: Tensor, v2: Tensor) -> tuple[Tensor, Logs]:
        """Loss of two aligned batches of views (one forward pass over both)."""
        z1, z2 = self.embed(torch.cat([v1, v2])).chunk(2)
        return self._loss(z1, z2)

    def multi_crop_loss(self, images: Tensor) -> tuple[Tensor, Logs]:
        """Two full-size views and ``small_crops`` small ones per image (two forward passes)."""
        v1, v2 = self.make_views(images)
        with torch.no_grad():
            small = self.small_views(images, n_views=self.cfg.small_crops)
        z = [*self.embed(torch.cat([v1, v2])).chunk(2), *self.embed(torch.cat(small)).chunk(len(small))]
        out = multi_crop_info_nce(z, self.cfg.temperature)
        logs = {"loss": out.loss.detach(), "acc": out.acc.detach()}
        with torch.no_grad():
            logs["pos_sim"] = F.cosine_similarity(z[0].float(), z[1].float(), dim=1).mean()
        return out.loss, logs

    def _loss(self, z1: Tensor, z2: Tensor) -> tuple[Tensor, Logs]:
        out = info_nce(z1, z2, self.cfg.temperature, chunk=self.cfg.loss_chunk)
        with torch.no_grad():
            pos_sim = F.cosine_similarity(z1.float(), z2.float(), dim=1).mean()
        logs = {"loss": out.loss.detach(), "acc": out.acc.detach(), "pos_sim": pos_sim}
        # InfoNCE bound on I(view1; view2) in nats: log(candidates per anchor) - loss, 2N - 1 keys
        logs["infonce_mi_bound"] = math.log(2 * z1.shape[0] * get_world_size() - 1) - out.loss.detach()
        return out.loss, logs

    def forward(self, images: Tensor, *, embed_only: bool = False) -> tuple[Tensor, Logs] | Tensor:
        """``(loss, logs)`` for a uint8 batch; with ``embed_only`` the projections of float
        views (the entry point GradCache uses, so its passes run through the DDP wrapper)."""
        if embed_only:
            return self.embed(images)
        if self.small_views is not None:
            return self.multi_crop_loss(images)
        return self.loss_from_views(*self.make_views(images))

    def train_step(self, images: Tensor, ctx: StepContext) -> tuple[Tensor, Logs]:
        """GradCache step: forward, loss and backward over the whole batch; no optimizer step.

        ``ctx.forward(x, embed_only=True)`` is this module's ``embed`` through the DDP wrapper.
        Gradients are synchronised on the last sub-batch's backward only.
        """
        return grad_cache_step(self, *self.make_views(images), ctx)


def grad_cache_step(
    method: SimCLR, v1: Tensor, v2: Tensor, ctx: StepContext
) -> tuple[Tensor, Logs]:
    """GradCache (Gao et al. 2021) on given views: see ``SimCLR.train_step``."""
    g = method.cfg.grad_cache_chunk
    n = v1.shape[0]
    bounds = [(s, min(s + g, n)) for s in range(0, n, g)]
    inputs = [torch.cat([v1[s:e], v2[s:e]]) for s, e in bounds]
    rngs = []
    with torch.no_grad():
        parts = []
        for x in inputs:
            rngs.append(_RngReplay(x.device))
            parts.append(ctx.forward(x, embed_only=True))
    z1 = torch.cat([p[: e - s] for p, (s, e) in zip(parts, bounds, strict=True)]).detach()
    z2 = torch.cat([p[e - s :] for p, (s, e) in zip(parts, bounds, strict=True)]).detach()
    z1.requires_grad_(True)
    z2.requires_grad_(True)
    loss, logs = method._loss(z1, z2)
    loss.backward()  # only to the cached embeddings: no parameter is in this graph
    for i, ((s, e), x, rng) in enumerate(zip(bounds, inputs, rngs, strict=True)):
        cached = torch.cat([z1.grad[s:e], z2.grad[s:e]])
        last = i == len(inputs) - 1
        with nullcontext() if last else ctx.no_sync(), rng:
            z = ctx.forward(x, embed_only=True)
            # d/dθ of <z(θ), cached> is exactly the chain rule through the cached gradient;
            # going through the loop's backward keeps loss scaling and accumulation intact
            ctx.backward((z.to(cached.dtype) * cached).sum())
    return loss.detach(), logs
