"""DINO (Caron et al. 2021, "Emerging Properties in Self-Supervised Vision Transformers"):
self-distillation with no labels. A student network matches the softmax output of a teacher
network, the exponential moving average of the student, across multi-crop views.

Views (on the device, ``augment/views.py``): ``global_crops`` (2) crops of ``global_scale``
(0.4-1) at the model's size and ``local_crops`` crops of ``local_scale`` (0.05-0.4) at
``local_size`` (96/224 of it by default), with DINO's asymmetry: global view 1 always blurred,
global view 2 blurred with p 0.1 and solarised with p 0.2, local views blurred with p 0.5 (blur and
solarisation exist only in the colour recipes ``simclr`` / ``byol``). The student sees every view,
the teacher only the global ones. Both networks are ``backbone -> DINOHead`` (``dino_parts.py``):
a 3-layer GELU MLP (hidden 2048) to a 256-d bottleneck, L2-normalised, then a weight-normalised
layer of ``K = out_dim`` prototypes (65536).

Loss, with student log-probabilities ``log p_s(v) = log_softmax(s_v / T_s)`` of view ``v`` (of
``V`` views) and teacher probabilities ``p_t(g) = softmax((t_g - c) / T_t)`` of global view ``g``
(of ``G``), ``c`` the centre, ``sg`` stop-gradient:

    L = 1 / (G (V - 1)) * sum_g sum_{v != g} mean_b [ - sum_k sg(p_t(g))_k log p_s(v)_k ]

(``DINOLoss`` of main_dino.py: every (teacher global, student view) pair except the same view).

Centre: ``c <- m c + (1 - m) mean(t)``, ``m = center_momentum`` (0.9), the mean over the raw teacher
outputs of every global view of every image of the optimiser step: forward adds the sum and the
count of its micro-batch to two accumulator buffers, ``after_step`` (once per optimiser step, never
per micro-batch) all-reduces them over processes, divides and updates ``c`` — after every loss of
the step used the old centre, as in the paper. So N processes x A micro-batches give the centre one
process gives on the whole batch (checked in tests/test_dino.py), whatever the split.

Bytes moved per step (the centre all-reduce; fp32; ring all-reduce: each process sends and
receives ``2 (P - 1)/P`` x the tensor; once per optimiser step, whatever the batch or
``train.accumulate``): the sum ``[K]`` and count ``[1]``, ``(K + 1) 4 = 262,148 B`` at K = 65536;
with iBOT on, its patch centre's ``[K_p + 1]`` travels in the same message (``524,296 B``);
KoLeo moves nothing (ibot.py):

    processes |  DINO centre  | DINO + iBOT centres
    2         |    262,148 B  |    524,296 B
    8         |    458,759 B  |    917,518 B
    64        |    516,104 B  |  1,032,208 B

For scale: DDP's gradient all-reduce of ViT-S/16 + DINO head (~44 M parameters, 168 MiB) moves
``2 (P - 1)/P`` x 168 MiB per process per step: the centres are ~0.3 % of it.

Teacher: ``teacher <- tau_k teacher + (1 - tau_k) student`` after step ``k`` (0-based) with BYOL's
cosine rate from ``tau_base`` (0.996) to 1 (``byol.momentum_tau``; DINO's ``momentum_schedule``).
Teacher temperature: ``warmup_teacher_temp`` (0.04) rising linearly to ``teacher_temp`` (0.07)
over the first ``teacher_temp_warmup`` of the run's steps (0.3 = DINO's 30 of 100 epochs), then
constant; the student's ``student_temp`` is 0.1. The last layer of the student head gets zero
gradient during the first ``freeze_last_layer`` of the steps (0.01 = DINO's 1 of 100 epochs): a
tensor hook, so DDP's all-reduce is untouched; DINO drops the gradient instead (``p.grad = None``),
which under AdamW differs only in that our optimiser state counts those steps. Schedules are
fractions of the steps ``after_step`` is told the run has, and every value is a function of the
step alone, kept in buffers, so a resumed run repeats them exactly.

Exported: ``backbone.*`` of the checkpoint is the network ``export`` names (``teacher``, the
default: DINO evaluates the teacher; or ``student``); both stay in the checkpoint as
``teacher_backbone.*`` / ``student_backbone.*`` (``selfsup export --network student_backbone``).

Collapse watch (the two failure modes of the paper's section 5.3): logged ``teacher_entropy`` (mean
entropy of ``p_t`` over log K: 1 = uniform), ``teacher_prototypes`` (exp of the entropy of the batch
mean of ``p_t``: how many prototypes the batch uses; 1 = one prototype for every image) and
``kl`` (KL(p_t || p_s) averaged over the loss's pairs). Every ``watch_every`` steps rank 0 reads
them (one host sync) and warns once per mode when two checks in a row find it
(``DINOCollapseWarning``).

DINOv2 options (ViT): ``ibot_weight`` (iBOT masked-patch loss, own centre), ``koleo_weight``
(KoLeo, over each rank's forward-pass batch): formulas, centre and batch choice in ``ibot.py``.

Precision: the centre, the softmaxes and the loss run in fp32 (fp64 for fp64 models) with
autocast off; the networks run under whatever autocast the loop sets.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup.augment.views import Views, build_views
from selfsup.data_info import DataInfo
from selfsup.pretrain.distributed import get_rank, get_world_size
from selfsup.pretrain.methods.base import COLLAPSE_LOG, Logs, Method
from selfsup.pretrain.methods.byol import ema_update, momentum_tau
from selfsup.pretrain.methods.dino_parts import DINOHead, cls_attention, features, ramp, steps_of
from selfsup.pretrain.methods.ibot import MaskedPatches, check_dinov2, ibot_loss, sample_masks
from selfsup.pretrain.methods.ibot import koleo_loss as koleo_loss
from selfsup.pretrain.methods.registry import register_method
from selfsup.pretrain.methods.siamese import collapse_std
from selfsup.pretrain.models.vit import VisionTransformer


@dataclass
class DINOConfig:
    # head (main_dino.py: --out_dim 65536, DINOHead defaults hidden 2048, bottleneck 256, 3 layers)
    out_dim: int = 65536
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    head_layers: int = 3
    norm_last_layer: bool = True  # --norm_last_layer (README: false is better for ViT-S, less stable)
    freeze_last_layer: float = 0.01  # fraction of steps (--freeze_last_layer 1 epoch of --epochs 100)
    # temperatures (paper section 3.1 / appendix: student 0.1, teacher 0.04 -> 0.07 over 30 epochs)
    student_temp: float = 0.1
    warmup_teacher_temp: float = 0.04
    teacher_temp: float = 0.07
    teacher_temp_warmup: float = 0.3  # fraction of steps (30 of 100 epochs)
    center_momentum: float = 0.9  # DINOLoss center_momentum
    tau_base: float = 0.996  # --momentum_teacher, cosine schedule to 1
    # multi-crop (main_dino.py: --global_crops_scale 0.4 1, --local_crops_number 8, --local_crops_scale 0.05 0.4)
    global_crops: int = 2
    local_crops: int = 8
    global_scale: tuple[float, float] = (0.4, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.4)
    local_size: int = 0  # side of the local crops in px; 0 = 96/224 of the model's size (a multiple of the ViT patch)
    # DataAugmentationDINO: GaussianBlur(1.0) / GaussianBlur(0.1) + Solarization(0.2) / GaussianBlur(0.5)
    global_blur_p: tuple[float, ...] = (1.0, 0.1)  # per global view, cycled
    global_solarize_p: tuple[float, ...] = (0.0, 0.2)
    local_blur_p: float = 0.5
    local_solarize_p: float = 0.0
    export: str = "teacher"  # teacher | student: the network `backbone.*` is (evaluated, exported)
    watch_every: int = 100  # steps between collapse checks (one host sync each); 0 = never
    # DINOv2 (ibot.py; dinov2 ssl_default_config.yaml): 0 = off, i.e. plain DINO
    ibot_weight: float = 0.0  # ibot.loss_weight 1.0: the masked-patch loss (ViT only)
    ibot_mask_prob: float = 0.5  # ibot.mask_sample_probability
    ibot_mask_ratio: tuple[float, float] = (0.1, 0.5)  # ibot.mask_ratio_min_max
    ibot_separate_head: bool = False  # ibot.separate_head (false: the DINO head on patch tokens)
    ibot_out_dim: int = 0  # prototypes of the separate head; 0 = out_dim (ibot.head_n_prototypes)
    koleo_weight: float = 0.0  # dino.koleo_loss_weight 0.1

    def check(self) -> None:
        for key in ("out_dim", "hidden_dim", "bottleneck_dim", "head_layers"):
            if getattr(self, key) < 1:
                raise ValueError(f"method.dino.{key} must be >= 1, got {getattr(self, key)}")
        if self.global_crops < 2:
            raise ValueError(f"method.dino.global_crops must be >= 2 (the teacher's views are the global "
                             f"crops; each is compared with the other views), got {self.global_crops}")  # fmt: skip
        for key in ("local_crops", "local_size", "watch_every"):
            if getattr(self, key) < 0:
                raise ValueError(f"method.dino.{key} must be >= 0, got {getattr(self, key)}")
        for key in ("student_temp", "warmup_teacher_temp", "teacher_temp"):
            if getattr(self, key) <= 0:
                raise ValueError(f"method.dino.{key} must be > 0, got {getattr(self, key)}")
        for key in ("freeze_last_layer", "teacher_temp_warmup", "center_momentum", "tau_base",
                    "local_blur_p", "local_solarize_p"):  # fmt: skip
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ValueError(f"method.dino.{key} must be in [0, 1], got {getattr(self, key)}")
        for key in ("global_blur_p", "global_solarize_p"):
            vals = list(getattr(self, key))
            if not vals or not all(0.0 <= p <= 1.0 for p in vals):
                raise ValueError(f"method.dino.{key}: one or more probabilities in [0, 1], got {vals}")
        for key in ("global_scale", "local_scale"):
            lo, hi = getattr(self, key)
            if not 0.0 < lo <= hi <= 1.0:
                raise ValueError(f"method.dino.{key}: need 0 < min <= max <= 1, got {(lo, hi)}")
        if self.export not in ("teacher", "student"):
            raise ValueError(f"method.dino.export must be teacher or student, got {self.export!r}")


class DINOCollapseWarning(UserWarning):
    """The teacher's output is going uniform or one-hot (DINO's two collapse modes)."""


def dino_loss(student: list[Tensor], teacher: list[Tensor], center: Tensor, student_temp: float,
              teacher_temp: float | Tensor) -> tuple[Tensor, Tensor]:  # fmt: skip
    """The DINO loss and the teacher probabilities.

    ``student``: ``V`` tensors ``[n, K]`` of student logits, the first ``G`` of them the global
    views; ``teacher``: ``G`` tensors ``[n, K]`` of teacher logits of the same global views;
    ``center`` ``[1, K]``. Returns the loss (mean over the ``G (V - 1)`` pairs of different views
    of the batch-mean cross-entropy) and ``p_t`` ``[G, n, K]`` (no gradient). Computed in fp32 at
    least, autocast off.
    """
    g, v = len(teacher), len(student)
    if g < 2 or v < g:
        raise ValueError(f"dino_loss: need >= 2 teacher views and at least as many student views, got {g} and {v}")
    dtype = torch.promote_types(student[0].dtype, torch.float32)
    with torch.autocast(student[0].device.type, enabled=False):
        t = torch.stack([x.detach().to(dtype) for x in teacher])
        p_t = F.softmax((t - center.to(dtype)) / teacher_temp, dim=-1)
        log_p_s = [F.log_softmax(s.to(dtype) / student_temp, dim=-1) for s in student]
        terms = [-(p_t[i] * log_p_s[j]).sum(-1).mean() for i in range(g) for j in range(v) if j != i]
        return torch.stack(terms).mean(), p_t


@register_method("dino", DINOConfig)
class DINO(Method):
    """DINO: a student matches its EMA teacher's centred, sharpened softmax across multi-crop views."""

    exported: ClassVar[str] = (
        "the network `method.dino.export` names: by default the EMA teacher, which Caron et al. 2021 "
        "evaluate; both stay in the checkpoint as `teacher_backbone.*` and `student_backbone.*`"
    )

    def __init__(self, cfg: DINOConfig, backbone: nn.Module, views: Views, info: DataInfo):
        super().__init__(cfg, backbone, views, info)
        cfg.check()
        self.is_vit = isinstance(backbone, VisionTransformer)
        check_dinov2(cfg, self.is_vit)
        size = views.size
        local = cfg.local_size or max(1, round(size * 96 / 224))
        if self.is_vit and not cfg.local_size:
            local = max(1, round(local / backbone.patch_size)) * backbone.patch_size
        if self.is_vit and local % backbone.patch_size:
            raise ValueError(f"method.dino.local_size={local} is not a multiple of model.patch_size={backbone.patch_size}")
        aug = views.cfg
        self.global_views = build_views(dataclasses.replace(
            aug, scale=tuple(cfg.global_scale), view_blur_p=list(cfg.global_blur_p),
            view_solarize_p=list(cfg.global_solarize_p)), info)  # fmt: skip
        self.local_views = build_views(dataclasses.replace(
            aug, scale=tuple(cfg.local_scale), size=local, view_blur_p=[cfg.local_blur_p],
            view_solarize_p=[cfg.local_solarize_p]), info)  # fmt: skip

        self.student_backbone = backbone
        self.student_head = DINOHead(backbone.feature_dim, cfg.out_dim, cfg.hidden_dim, cfg.bottleneck_dim,
                                     cfg.head_layers, cfg.norm_last_layer)  # fmt: skip
        self.teacher_backbone = copy.deepcopy(backbone)
        self.teacher_head = copy.deepcopy(self.student_head)
        self.ibot: MaskedPatches | None = None
        self.student_ibot_head = self.teacher_ibot_head = None
        if cfg.ibot_weight > 0:
            k_patch = cfg.ibot_out_dim or cfg.out_dim
            self.ibot = MaskedPatches(backbone.feature_dim, cfg.out_dim if not cfg.ibot_separate_head else k_patch)
            if cfg.ibot_separate_head:
                self.student_ibot_head = DINOHead(backbone.feature_dim, k_patch, cfg.hidden_dim, cfg.bottleneck_dim,
                                                  cfg.head_layers, cfg.norm_last_layer)  # fmt: skip
                self.teacher_ibot_head = copy.deepcopy(self.student_ibot_head)
        for p in self.teacher_parameters():
            p.requires_grad_(False)
        # `backbone.*` is what eval, periodic kNN and export read: the network `export` names
        self.backbone = self.teacher_backbone if cfg.export == "teacher" else self.student_backbone

        k = cfg.out_dim
        self.register_buffer("center", torch.zeros(1, k))
        # this step's sum and count of teacher outputs, over its micro-batches; zero between steps
        self.register_buffer("center_sum", torch.zeros(1, k), persistent=False)
        self.register_buffer("center_count", torch.zeros(()), persistent=False)
        # DDP would broadcast rank 0's accumulators over the others' (they are per process by design)
        self._ddp_params_and_buffers_to_ignore = ["center_sum", "center_count", "ibot.center_sum", "ibot.center_count"]
        # what the next optimiser step uses (set from the step alone in after_step)
        self.register_buffer("teacher_temp", torch.tensor(ramp(0, steps_of(cfg.teacher_temp_warmup, 1),
                                                               cfg.warmup_teacher_temp, cfg.teacher_temp)))  # fmt: skip
        self.register_buffer("tau", torch.tensor(float(cfg.tau_base)))
        self.register_buffer("last_layer_frozen", torch.tensor(1.0 if cfg.freeze_last_layer > 0 else 0.0))
        for p in self.student_head.last_layer.parameters():
            if p.requires_grad:
                p.register_hook(self._freeze_grad)
        self._watch: Tensor | None = None
        self._warned: set[str] = set()
        self._bad_checks: dict[str, int] = {}

    def _freeze_grad(self, grad: Tensor) -> Tensor:
        return grad * (1.0 - self.last_layer_frozen).to(grad.dtype)

    def student_parameters(self) -> Iterable[nn.Parameter]:
        extra = self.student_ibot_head.parameters() if self.student_ibot_head is not None else ()
        return itertools.chain(self.student_backbone.parameters(), self.student_head.parameters(), extra)

    def teacher_parameters(self) -> Iterable[nn.Parameter]:
        extra = self.teacher_ibot_head.parameters() if self.teacher_ibot_head is not None else ()
        return itertools.chain(self.teacher_backbone.parameters(), self.teacher_head.parameters(), extra)

    def no_weight_decay(self) -> set[str]:
        nwd = getattr(self.student_backbone, "no_weight_decay", None)
        return set(nwd()) if callable(nwd) else set()

    def multi_crop(self, images: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """The global and local float views of a uint8 batch (no graph)."""
        with torch.no_grad():
            g = self.global_views(images, n_views=self.cfg.global_crops)
            loc = self.local_views(images, n_views=self.cfg.local_crops) if self.cfg.local_crops else []
        return g, loc

    def forward(self, images: Tensor) -> tuple[Tensor, Logs]:
        return self.loss_from_views(*self.multi_crop(images))

    def loss_from_views(self, global_views: list[Tensor], local_views: list[Tensor],
                        masks: Tensor | None = None) -> tuple[Tensor, Logs]:  # fmt: skip
        """Loss of aligned batches of float views; adds the teacher outputs to the step's centre
        sums. ``masks``: iBOT's ``[G * n, patches]`` bool (global views stacked); drawn if None."""
        n, g, cfg = global_views[0].shape[0], len(global_views), self.cfg
        if g < 2:
            raise ValueError(f"method.dino.global_crops: the loss needs >= 2 global views, got {g}")
        glob = torch.cat(global_views)
        if self.ibot is not None:
            if masks is None:
                masks = sample_masks(g * n, self.student_backbone.num_patches, cfg.ibot_mask_prob,
                                     tuple(cfg.ibot_mask_ratio), glob.device)  # fmt: skip
            s_tokens = self.ibot.student_tokens(self.student_backbone, glob, masks)
            feats = [s_tokens[:, 0]]
        else:
            feats = [features(self.student_backbone, glob)]
        cls_global = feats[0]
        if local_views:
            feats.append(features(self.student_backbone, torch.cat(local_views)))
        student = self.student_head(torch.cat(feats)).split(n)
        with torch.no_grad():
            t_tokens = self.teacher_backbone.forward_features(glob) if self.ibot is not None else None
            t_feat = t_tokens[:, 0] if t_tokens is not None else self.teacher_backbone(glob)
            teacher = self.teacher_head(t_feat)
        loss, p_t = dino_loss(list(student), list(teacher.split(n)), self.center, cfg.student_temp, self.teacher_temp)
        logs: Logs = {}
        if self.ibot is not None:
            s_head, t_head = self.student_ibot_head or self.student_head, self.teacher_ibot_head or self.teacher_head
            with torch.no_grad():
                t_patch = t_head(t_tokens[:, 1:][masks])
            l_ibot, _ = ibot_loss(s_head(s_tokens[:, 1:][masks]), t_patch, masks, self.ibot.center,
                                  cfg.student_temp, self.teacher_temp)  # fmt: skip
            loss, logs["ibot"] = loss + cfg.ibot_weight * l_ibot, l_ibot.detach()
            if self.training:
                self.ibot.accumulate(t_patch)
        if cfg.koleo_weight > 0:  # over this forward pass's images, per global view (ibot.py)
            l_koleo = sum(koleo_loss(c) for c in cls_global.split(n))
            loss, logs["koleo"] = loss + cfg.koleo_weight * l_koleo, l_koleo.detach()
        with torch.no_grad():
            if self.training:  # the centre moves in after_step, from every micro-batch of every rank
                self.center_sum += teacher.to(self.center_sum.dtype).sum(0, keepdim=True)
                self.center_count += teacher.shape[0]
            logs.update(self._watch_logs(loss.detach(), p_t))
            logs[COLLAPSE_LOG] = collapse_std(t_feat)
        return loss, logs

    def _watch_logs(self, loss: Tensor, p_t: Tensor) -> Logs:
        log_k = math.log(p_t.shape[-1])
        ent = -(p_t * p_t.clamp_min(1e-30).log()).sum(-1)  # [G, n]
        mean_p = p_t.flatten(0, 1).mean(0)
        usage = (-(mean_p * mean_p.clamp_min(1e-30).log()).sum()).exp()
        # the mean over pairs of CE(p_t(g), p_s(v)) - H(p_t(g)): each teacher view is in V - 1 pairs
        logs = {"loss": loss, "teacher_entropy": ent.mean() / log_k, "teacher_prototypes": usage,
                "kl": loss - ent.mean(), "teacher_temp": self.teacher_temp.clone(), "tau": self.tau.clone()}  # fmt: skip
        self._watch = torch.stack([logs["teacher_entropy"], usage])
        return logs

    @torch.no_grad()
    def after_step(self, step: int, total_steps: int) -> None:
        """Centre from the whole step's teacher outputs, then the EMA teacher, then the schedules."""
        cfg = self.cfg
        own = torch.cat([self.center_sum.flatten(), self.center_count.view(1)])
        stats = self.reduce_over_processes(torch.cat([own, self.ibot.stats()]) if self.ibot is not None else own)
        if self.ibot is not None:  # one message for both centres
            self.ibot.update_center(stats[own.numel():], cfg.center_momentum)
            stats = stats[: own.numel()]
        count = stats[-1]
        batch_center = (stats[:-1] / count.clamp(min=1)).view_as(self.center)
        m = cfg.center_momentum
        self.center.copy_(torch.where(count > 0, m * self.center + (1 - m) * batch_center, self.center))
        self.center_sum.zero_()
        self.center_count.zero_()
        ema_update(self.teacher_parameters(), self.student_parameters(), momentum_tau(step - 1, total_steps, cfg.tau_base))
        self.tau.fill_(momentum_tau(step, total_steps, cfg.tau_base))
        warm = steps_of(cfg.teacher_temp_warmup, total_steps)
        self.teacher_temp.fill_(ramp(step, warm, cfg.warmup_teacher_temp, cfg.teacher_temp))
        self.last_layer_frozen.fill_(float(step < steps_of(cfg.freeze_last_layer, total_steps)))
        if cfg.watch_every and self._watch is not None and (step % cfg.watch_every == 0 or step == total_steps):
            self._check_collapse(step)

    @staticmethod
    def reduce_over_processes(stats: Tensor) -> Tensor:
        """Sum over processes of the step's centre sum and count (no gradient: outside the loss)."""
        if get_world_size() > 1:
            dist.all_reduce(stats)
        return stats

    def _check_collapse(self, step: int) -> None:
        if get_rank() != 0:
            return
        entropy, usage = self._watch.tolist()
        modes = {"uniform": entropy > 0.98, "one-hot": usage < 1.5}
        for mode, bad in modes.items():
            self._bad_checks[mode] = self._bad_checks.get(mode, 0) + 1 if bad else 0
            # two checks in a row: a fresh teacher maps every image alike until the centre adapts
            if self._bad_checks[mode] >= 2 and mode not in self._warned:
                self._warned.add(mode)
                warnings.warn(
                    f"step {step}: DINO teacher output is going {mode} (teacher_entropy={entropy:.3f} of log K, "
                    f"teacher_prototypes={usage:.2f} in use): a collapse. Uniform: sharpen more (lower "
                    f"method.dino.teacher_temp); one-hot: centre more (method.dino.center_momentum) or lower "
                    f"optim.base_lr.", DINOCollapseWarning, stacklevel=2)  # fmt: skip

    @torch.no_grad()
    def pictures(self, images: Tensor, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """ViT: ``attention``: each image, then the exported network's last-layer class-token
        attention of every head (rows: images; each map scaled to [0, 1])."""
        if not isinstance(self.backbone, VisionTransformer):
            return {}
        x = self.views.plain()(images[:6])[0]
        att = cls_attention(self.backbone, x)  # [B, heads, g, g]
        att = att / att.flatten(2).amax(-1).clamp_min(1e-12)[..., None, None]
        side = x.shape[-1]
        maps = F.interpolate(att, size=(side, side), mode="nearest")  # [B, heads, H, W]
        maps = maps.unsqueeze(2).expand(-1, -1, x.shape[1], -1, -1)
        return {"attention": torch.cat([self.to_unit(x).unsqueeze(1), maps.float()], dim=1)}
