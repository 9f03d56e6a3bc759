"""DINOv2's pieces on DINO's ViT path (Oquab et al. 2023, "DINOv2: Learning Robust Visual Features
without Supervision"; code facebookresearch/dinov2: ``loss/ibot_patch_loss.py``,
``loss/koleo_loss.py``, ``train/ssl_meta_arch.py``, ``data/collate.py``). Switched on in
``method.dino`` by ``ibot_weight > 0`` and ``koleo_weight > 0``; both 0 is plain DINO.

iBOT masked-patch loss (Zhou et al. 2022). For each global view a fraction of the images
(``ibot_mask_prob``, 0.5) get a fraction of their patches masked, the ratio of the i-th masked
image drawn uniformly in the i-th of equal bins of ``ibot_mask_ratio`` (0.1-0.5), as DINOv2's
``collate_data_and_cast`` (random patches, not DINOv2's block-wise ``MaskingGenerator``). The
student sees the masked global views with its patch embedding replaced by a learned
``mask_token`` (before the position embedding is added); the teacher sees the unmasked views. At
each masked patch ``j`` of image ``b`` (``M_b`` masked patches in it, ``B`` images x views):

    L_ibot = 1 / B * sum_b 1 / M_b * sum_{j in mask_b} [ - sum_k sg(q_t(b, j))_k log q_s(b, j)_k ]

``q_s = log_softmax(h_s(z_s) / T_s)``, ``q_t = softmax((h_t(z_t) - c_p) / T_t)``, ``h`` the DINO
head (shared, DINOv2's default ``ibot.separate_head: false``) or a head of its own
(``ibot_separate_head``, ``ibot_out_dim`` prototypes, with its own EMA teacher copy), the same
temperatures as DINO. Images without a mask count in ``B`` with 0, as DINOv2's
``forward_masked`` (``/ masks.shape[0]``).

iBOT centre ``c_p``: ``c_p <- m c_p + (1 - m) mean(h_t(z_t))`` over the teacher's logits at the
masked patches of every micro-batch of the step on every rank, weighted by count: the sum and
the count are accumulated per micro-batch and all-reduced in the same ``after_step`` message as
the DINO centre, then divided. (DINOv2's ``reduce_center_update`` divides the summed sum by
``len(local tokens) * world_size``: with a varying number of masked patches per rank that is the
wrong count of dinov2 #546; tests/test_ibot_koleo.py keeps it as a planted variant that fails.)

KoLeo (Sablayrolles et al. 2019) on the student's L2-normalised class-token features ``x`` of
each global view, summed over the global views (DINOv2's ``ssl_meta_arch``):

    L_koleo = - 1 / n * sum_i log(|| x_i - x_{nn(i)} || + 1e-8),   nn(i) = argmax_{j != i} x_i . x_j

**Over which batch:** each forward pass's own images, i.e. each rank's micro-batch (DINOv2's
choice: each GPU's local batch), not the global batch and not DINOv3's groups. Why: the nearest
neighbour of the global batch would need an all-gather of every rank's features with a
gradient-carrying backward (``n x D`` values per rank per step, plus the ``N x N`` distance
matrix), and the regulariser's strength would change with the number of processes (nearest
neighbours get closer as the batch grows); per rank it depends only on ``data.batch_size`` per
process, which is what DINOv2 tuned its weight 0.1 for (64 per GPU). The cost: with ``P``
processes the logged/optimised KoLeo is the mean of ``P`` per-rank values, and
``train.accumulate`` makes the batch smaller still (tests/test_ibot_koleo.py shows the 2-process
value is the mean of the per-rank values and differs from the global-batch value).

Precision: softmaxes, the losses, KoLeo's distances and the centre in fp32 (fp64 for fp64
inputs) with autocast off.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup.pretrain.models.vit import VisionTransformer


def check_dinov2(cfg, vit: bool) -> None:
    """The DINOv2 options of ``method.dino`` (a ``DINOConfig``)."""
    for key in ("ibot_weight", "koleo_weight", "ibot_out_dim"):
        if getattr(cfg, key) < 0:
            raise ValueError(f"method.dino.{key} must be >= 0, got {getattr(cfg, key)}")
    if not 0.0 <= cfg.ibot_mask_prob <= 1.0:
        raise ValueError(f"method.dino.ibot_mask_prob must be in [0, 1], got {cfg.ibot_mask_prob}")
    lo, hi = cfg.ibot_mask_ratio
    if not 0.0 <= lo <= hi < 1.0:
        raise ValueError(f"method.dino.ibot_mask_ratio: need 0 <= min <= max < 1, got {(lo, hi)}")
    if cfg.ibot_weight > 0 and not vit:
        raise ValueError("method.dino.ibot_weight > 0 needs a ViT backbone (model.backbone=vit_*): "
                         "the masked-patch loss works on patch tokens")  # fmt: skip


def sample_masks(n: int, patches: int, prob: float, ratio: tuple[float, float], device: torch.device) -> Tensor:
    """``[n, patches]`` bool: ``int(n * prob)`` images (random rows) with masked patches, the
    i-th of them a ratio uniform in the i-th of ``int(n * prob)`` equal bins of ``ratio``."""
    k = int(n * prob)
    masks = torch.zeros(n, patches, dtype=torch.bool, device=device)
    if k == 0:
        return masks
    edges = torch.linspace(ratio[0], ratio[1], k + 1, device=device)
    r = edges[:-1] + (edges[1:] - edges[:-1]) * torch.rand(k, device=device)
    count = (r * patches).long()  # DINOv2: int(N * uniform(prob_min, prob_max))
    rank = torch.rand(k, patches, device=device).argsort(-1).argsort(-1)
    masks[:k] = rank < count[:, None]
    return masks[torch.randperm(n, device=device)]


def ibot_loss(student: Tensor, teacher: Tensor, masks: Tensor, center: Tensor, student_temp: float,
              teacher_temp: float | Tensor) -> tuple[Tensor, Tensor]:  # fmt: skip
    """``student``/``teacher``: ``[M, K]`` logits at the ``M = masks.sum()`` masked patches (in
    ``masks[masks]`` order) of ``masks`` ``[B, N]``; ``center`` ``[1, K]``. Returns ``L_ibot``
    (module docstring) and the teacher probabilities ``[M, K]`` (no gradient)."""
    dtype = torch.promote_types(student.dtype, torch.float32)
    with torch.autocast(student.device.type, enabled=False):
        p_t = F.softmax((teacher.detach().to(dtype) - center.to(dtype)) / teacher_temp, dim=-1)
        ce = -(p_t * F.log_softmax(student.to(dtype) / student_temp, dim=-1)).sum(-1)
        per_image = masks.sum(-1, keepdim=True).clamp(min=1).to(dtype).expand_as(masks)[masks]
        return (ce / per_image).sum() / masks.shape[0], p_t


def koleo_loss(x: Tensor, eps: float = 1e-8) -> Tensor:
    """Kozachenko-Leonenko entropy estimate's loss on the rows of ``x`` ``[n, D]`` (L2-normalised
    here): ``-mean_i log(||x_i - x_nn(i)|| + eps)``, fp32 at least, autocast off."""
    if x.shape[0] < 2:
        raise ValueError(f"method.dino.koleo_weight: KoLeo needs >= 2 images per forward pass, got {x.shape[0]} "
                         "(raise data.batch_size or lower train.accumulate)")  # fmt: skip
    dtype = torch.promote_types(x.dtype, torch.float32)
    with torch.autocast(x.device.type, enabled=False):
        x = F.normalize(x.to(dtype), p=2, dim=-1, eps=eps)
        with torch.no_grad():
            dots = x @ x.T
            dots.fill_diagonal_(-2.0)  # never its own neighbour (dots of unit vectors are >= -1)
            nn_idx = dots.argmax(1)
        dist = F.pairwise_distance(x, x[nn_idx], p=2, eps=eps)
        return -torch.log(dist + eps).mean()


class MaskedPatches(nn.Module):
    """The student's mask token, the iBOT centre and the step's accumulators of it."""

    def __init__(self, dim: int, prototypes: int) -> None:
        super().__init__()
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))  # DINOv2: zeros
        self.register_buffer("center", torch.zeros(1, prototypes))
        self.register_buffer("center_sum", torch.zeros(1, prototypes), persistent=False)
        self.register_buffer("center_count", torch.zeros(()), persistent=False)

    def student_tokens(self, vit: VisionTransformer, x: Tensor, masks: Tensor) -> Tensor:
        """All tokens ``[B, 1 + N, D]`` of images at the model's size with the masked patches'
        embeddings replaced by the mask token."""
        tokens = vit.patch_embed(x)
        tokens = torch.where(masks[..., None], self.mask_token.to(tokens.dtype), tokens)
        return vit.encode(tokens + vit.pos_embed[:, 1:, :])

    @torch.no_grad()
    def accumulate(self, teacher_logits: Tensor) -> None:
        self.center_sum += teacher_logits.to(self.center_sum.dtype).sum(0, keepdim=True)
        self.center_count += teacher_logits.shape[0]

    def stats(self) -> Tensor:
        return torch.cat([self.center_sum.flatten(), self.center_count.view(1)])

    @torch.no_grad()
    def update_center(self, summed: Tensor, momentum: float) -> None:
        """``summed``: ``stats()`` summed over processes; then the accumulators are emptied."""
        count = summed[-1]
        mean = (summed[:-1] / count.clamp(min=1)).view_as(self.center)
        self.center.copy_(torch.where(count > 0, momentum * self.center + (1 - momentum) * mean, self.center))
        self.center_sum.zero_()
        self.center_count.zero_()
