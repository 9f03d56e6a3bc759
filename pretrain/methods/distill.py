"""Distillation: a student backbone learns a frozen teacher's features (lightly-train's
``distillation`` v2 idea: one view, student features through a learnt linear map, MSE or cosine
against the teacher's features of the same view, optionally on the feature maps as well).

Teacher: a backbone exported by this project (``selfsup export``), loaded by ``_load_teacher``
with its own architecture from the export's ``config.json``, then frozen: ``requires_grad_(False)``,
eval mode (BatchNorm uses its running statistics, which never move), run under
``torch.inference_mode()``, in fp32 or, with ``method.distill.teacher_precision=bf16``, under bf16
autocast. The teacher is NOT a submodule of the method (it is held outside the module tree), so the
optimiser, the DDP wrapper (gradient sync and buffer broadcast), ``model.train()``, BatchNorm
conversion and the state dict never see it; it is moved to the views' device on first use. Its
input is the student's view re-normalised with the teacher's own mean/std when they differ.
Student: the run's ``model.*`` backbone (any of the project's), exported as ``backbone.*``.

Views: ONE augmented view per image (``augment.*``, on the training device), seen by BOTH networks.
Distillation regresses the teacher's function at the student's input; a different view for the
teacher would make the target ``f_T(view b)`` for input ``view a``, which differs from
``f_T(view a)`` wherever the teacher is not invariant to the augmentation: noise the student cannot
fit. The augmentation still varies the inputs from step to step.

Loss, with ``s = h(g_S(v))`` the student's global embedding through its linear map ``h``
(``head``: ``auto`` = ``nn.Linear`` when the widths differ, identity when they are equal;
``linear``; ``none``) and ``t = g_T(v)`` the teacher's (ResNet: average-pooled last feature map;
ViT: the class token), ``B`` images, ``D`` the teacher's width:

    cosine:  L_g = 1/B sum_b (1 - <s_b, t_b> / (|s_b| |t_b|))
    mse:     L_g = 1/(B D) sum_b |s_b - t_b|^2

and with ``map_weight`` ``w > 0`` a dense term on the last feature maps (ResNet ``[B, C, h, w]``;
ViT patch tokens as a ``[B, D, g, g]`` grid): the student's map through a 1x1 linear map ``h_m`` to
the teacher's channels, both maps resampled to a common ``G x G`` grid (``map_grid``, 0 = the
teacher's grid; ``resample``: area average to shrink, bilinear to grow), the same loss per location
(``map_loss``), averaged over locations: ``L = L_g + w L_map``.

Across processes: every term is a per-sample function of the sample's own view (the teacher's BN
uses running statistics); no statistic crosses the batch, so N processes with DDP's gradient
average equal one process on the concatenated batch with no collective of the method's own
(tests/test_distill.py checks that nothing rank-dependent leaks in).

Checkpoints hold the student, its maps and ``teacher_sha256`` (the sha256 of the teacher's weights
file), not the teacher: it is re-loaded from ``method.distill.teacher`` (recorded in the run's
``config.yaml``), and loading a checkpoint whose digest differs from the file's is an error, so a
resume is bitwise (the teacher is a fixed function of its file) without copying it into every
checkpoint. The teacher is an export folder (it carries the architecture and normalisation a bare
torchvision/timm file lacks); a run directory is exported first (``pretrain/run`` imports the
methods, so reading a run here would be a cycle).
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup.augment.views import Views
from selfsup.data_info import DataInfo
from selfsup.pretrain.distributed import get_rank
from selfsup.pretrain.methods.base import COLLAPSE_LOG, Logs, Method
from selfsup.pretrain.methods.registry import register_method
from selfsup.pretrain.methods.siamese import collapse_std
from selfsup.pretrain.models.backbones import ModelConfig, build_backbone
from selfsup.pretrain.models.vit import VisionTransformer
from selfsup.pretrain.models.weights import load_into, read_export

LOSSES = ("cosine", "mse")
HEADS = ("auto", "linear", "none")
PRECISIONS = ("fp32", "bf16")


@dataclass
class DistillConfig:
    teacher: str = ""  # export folder (selfsup export), or a weights file as model.init reads one
    # for a weights file (torchvision/timm names): the teacher's architecture, as model.* says it
    teacher_backbone: str = ""  # e.g. resnet50, vit_small; empty: the teacher is an export folder
    teacher_stem: str = "imagenet"
    teacher_width: float = 1.0
    teacher_patch_size: int = 16
    teacher_mean: list[float] = field(default_factory=list)  # its normalisation; empty: ImageNet's
    teacher_std: list[float] = field(default_factory=list)  # (RGB) or the data's (other channels)
    loss: str = "cosine"  # cosine | mse, on the global embeddings
    head: str = "auto"  # auto (linear when the widths differ) | linear | none: the student's map
    map_weight: float = 0.0  # weight of the feature-map / patch-token term (0: off)
    map_grid: int = 0  # common grid side for that term (0: the teacher's grid)
    map_loss: str = "mse"  # cosine | mse, per location
    teacher_precision: str = "fp32"  # fp32 | bf16 (autocast for the teacher's forward only)

    def check(self) -> None:
        """Values only: every section is checked whatever method runs, so an empty or missing
        ``teacher`` is refused when the method is built (before any step)."""
        for key, allowed in (("loss", LOSSES), ("head", HEADS), ("map_loss", LOSSES),
                             ("teacher_precision", PRECISIONS)):  # fmt: skip
            if getattr(self, key) not in allowed:
                raise ValueError(f"method.distill.{key}: '{getattr(self, key)}' is not one of {', '.join(allowed)}")
        if not (self.map_weight >= 0 and math.isfinite(self.map_weight)):
            raise ValueError(f"method.distill.map_weight must be a finite number >= 0, got {self.map_weight}")
        if self.map_grid < 0:
            raise ValueError(f"method.distill.map_grid must be >= 0 (0: the teacher's grid), got {self.map_grid}")


@dataclass(frozen=True)
class Teacher:
    net: nn.Module
    info: DataInfo
    sha256: str
    weights: Path


IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def _load_teacher(cfg: DistillConfig, info: DataInfo, size: int) -> Teacher:
    """The teacher of ``method.distill.teacher``, frozen and in eval mode: an export folder of this
    project (its architecture and normalisation from its ``config.json``, weights loaded strictly),
    or a weights file ``model.init`` reads (torchvision/timm names, ``timm:<name>:<file>``) with
    the architecture of ``method.distill.teacher_*``, built for the data's channels and the views'
    size (an RGB stem adapted, a ViT grid resampled: ``pretrain/models/weights.py``)."""
    key, path = "method.distill.teacher", cfg.teacher
    if not path:
        raise ValueError(f"{key}: no teacher given; set it to an export folder (selfsup export "
                         "--run RUN --out FOLDER writes one) or a weights file")  # fmt: skip
    folder = Path(path)
    if cfg.teacher_backbone:
        arch = ModelConfig(cfg.teacher_backbone, cfg.teacher_stem, cfg.teacher_width, cfg.teacher_patch_size,
                           init=path)  # fmt: skip
        try:
            arch.check()
        except ValueError as e:
            raise ValueError(f"{key}_{str(e).removeprefix('model.')}") from e
        net = build_backbone(arch, info.channels, size)
        report = load_into(net, arch, key)
        mean, std = cfg.teacher_mean, cfg.teacher_std
        if not mean or not std:
            mean, std = IMAGENET if info.channels == 3 else (info.mean, info.std)
        t_info = DataInfo(info.channels, size, tuple(map(float, mean)), tuple(map(float, std)))
        if len(t_info.mean) != info.channels or len(t_info.std) != info.channels:
            raise ValueError(f"{key}_mean/_std: one value per channel ({info.channels}), got {list(mean)} / {list(std)}")
        if get_rank() == 0:
            print("\n".join(line.replace("model.init", key, 1) for line in report.lines()))
        net.requires_grad_(False)
        net.eval()
        return Teacher(net, t_info, report.sha256, Path(report.source))
    if not folder.is_dir():
        raise ValueError(f"{key}: {folder} is not a folder (give the teacher's export folder: selfsup export "
                         "--run RUN --out FOLDER writes one, selfsup demo writes runs/demo/export; or a weights "
                         "file with its architecture in method.distill.teacher_backbone)")  # fmt: skip
    src = read_export(folder, key)
    try:
        net = build_backbone(src.arch, src.info.channels, src.info.image_size)
        net.load_state_dict(src.state, strict=True)
    except (ValueError, RuntimeError) as e:
        raise ValueError(f"{key}: cannot load the teacher from {folder}: {e}") from e
    net.requires_grad_(False)
    net.eval()
    return Teacher(net, src.info, src.sha256, src.path)


def embed(net: nn.Module, x: Tensor) -> tuple[Tensor, Tensor | None]:
    """``(global [B, D], feature map [B, D, h, w] or None)`` of one forward pass: a ResNet's
    average-pooled last map and the map; a ViT's class token and its patch tokens on their grid."""
    if isinstance(net, VisionTransformer):
        tokens = net.forward_features(x)
        patches = tokens[:, 1:]
        side = math.isqrt(patches.shape[1])
        return tokens[:, 0], patches.transpose(1, 2).reshape(x.shape[0], -1, side, side)
    if hasattr(net, "forward_features"):
        fmap = net.forward_features(x)
        return torch.flatten(F.adaptive_avg_pool2d(fmap, 1), 1), fmap
    return net(x), None


def resample(x: Tensor, side: int) -> Tensor:
    """``[B, C, h, w]`` -> ``[B, C, side, side]``: area average to shrink, bilinear to grow."""
    if x.shape[-2:] == (side, side):
        return x
    if side <= min(x.shape[-2:]):
        return F.adaptive_avg_pool2d(x, side)
    return F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False)


def distill_loss(s: Tensor, t: Tensor, kind: str) -> Tensor:
    """``cosine``: mean over rows of ``1 - cos(s, t)`` along the last dim; ``mse``: mean of
    ``(s - t)^2`` over every element. ``t`` is a target (no gradient); computed in fp32 at least."""
    dtype = torch.promote_types(s.dtype, torch.float32)
    with torch.autocast(s.device.type, enabled=False):
        s, t = s.to(dtype), t.detach().to(dtype)
        if kind == "cosine":
            return (1 - F.cosine_similarity(s, t, dim=-1, eps=1e-8)).mean()
        if kind == "mse":
            return (s - t).pow(2).mean()
    raise ValueError(f"distill_loss: kind must be one of {LOSSES}, got {kind!r}")


def map_loss(s_map: Tensor, t_map: Tensor, side: int, kind: str) -> Tensor:
    """The dense term: both ``[B, C, h, w]`` maps on a ``side x side`` grid, ``distill_loss`` per
    location (channels last), averaged over images and locations."""
    s = resample(s_map, side).flatten(2).transpose(1, 2)  # [B, side^2, C]
    t = resample(t_map, side).flatten(2).transpose(1, 2)
    return distill_loss(s, t, kind)


@register_method("distill", DistillConfig)
class Distill(Method):
    """Distillation: the student backbone regresses a frozen teacher's features of the same view."""

    exported: ClassVar[str] = (
        "the student backbone (`backbone.*`); the frozen teacher is not in the checkpoint (its "
        "folder is `method.distill.teacher` of config.yaml, its weights' sha256 `teacher_sha256`)"
    )
    needs: ClassVar[str] = "a teacher export (method.distill.teacher; make demo writes runs/demo/export)"

    def __init__(self, cfg: DistillConfig, backbone: nn.Module, views: Views, info: DataInfo):
        super().__init__(cfg, backbone, views, info)
        cfg.check()
        teacher = _load_teacher(cfg, info, views.size)
        t = teacher.info
        if t.channels != info.channels:
            raise ValueError(f"method.distill.teacher: {cfg.teacher} takes {t.channels}-channel images, "
                             f"the data (data.train) has {info.channels} channel(s)")  # fmt: skip
        if t.image_size != views.size:
            raise ValueError(f"method.distill.teacher: {cfg.teacher} takes {t.image_size} px images, the "
                             f"views are {views.size} px (augment.size / the shards' size)")  # fmt: skip
        object.__setattr__(self, "teacher", teacher.net)  # outside the module tree: see the docstring
        self.teacher_info, self.teacher_path = t, teacher.weights
        self.renormalise = (tuple(views.mean), tuple(views.std)) != (t.mean, t.std)
        with torch.no_grad():  # the teacher is in eval mode: a probe forward changes nothing
            _, mt = embed(teacher.net, torch.zeros(2, info.channels, views.size, views.size))
        # a ResNet's map and a ViT's patch tokens have feature_dim channels, as the pooled output
        widths = (int(backbone.feature_dim), int(teacher.net.feature_dim))
        self.head = self._map(cfg.head, *widths, "head")
        self.map_head: nn.Module | None = None
        self.grid = 0
        if cfg.map_weight > 0:
            if mt is None or not hasattr(backbone, "forward_features"):
                raise ValueError("method.distill.map_weight > 0 needs feature maps from both backbones "
                                 "(a ResNet or a ViT)")  # fmt: skip
            self.map_head = self._map(cfg.head, *widths, "feature map")
            self.grid = cfg.map_grid or mt.shape[-1]
        self.register_buffer("teacher_sha256", torch.tensor(list(bytes.fromhex(teacher.sha256)), dtype=torch.uint8))
        if get_rank() == 0:
            print(f"distill: teacher {teacher.weights} (sha256 {teacher.sha256}), width {widths[1]}; "
                  f"student width {widths[0]}; head {type(self.head).__name__}")  # fmt: skip

    @staticmethod
    def _map(kind: str, student: int, teacher: int, what: str) -> nn.Module:
        if kind == "none" and student != teacher:
            raise ValueError(f"method.distill.head=none needs equal widths, but the student's {what} "
                             f"gives {student} and the teacher's {teacher}: use head=auto or linear")  # fmt: skip
        if kind == "linear" or student != teacher:
            return nn.Linear(student, teacher)
        return nn.Identity()

    def _teacher_precision(self, device: torch.device) -> AbstractContextManager:
        bf16 = self.cfg.teacher_precision == "bf16"
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

    @torch.no_grad()
    def teacher_features(self, v: Tensor) -> tuple[Tensor, Tensor | None]:
        """The frozen teacher's global embedding and map of the (student-normalised) views, as
        ordinary tensors of at least fp32 (inference-mode outputs cloned so autograd may save them)."""
        teacher, p = self.teacher, next(self.teacher.parameters())
        if (p.device, p.dtype) != (v.device, v.dtype):  # views are fp32 (fp64 in the exactness tests)
            teacher.to(v.device, v.dtype)
        if self.renormalise:
            v = (self.views.to_unit(v) - _col(self.teacher_info.mean, v)) / _col(self.teacher_info.std, v)
        with torch.inference_mode(), self._teacher_precision(v.device):
            g, m = embed(teacher, v)
        up = torch.promote_types(g.dtype, torch.float32)  # bf16 -> fp32; fp64 stays
        return g.to(up).clone(), None if m is None or self.map_head is None else m.to(up).clone()

    def loss_from_view(self, v: Tensor) -> tuple[Tensor, Logs]:
        """Loss of one batch of float views (the same views for teacher and student)."""
        gt, mt = self.teacher_features(v)
        gs, ms = embed(self.backbone, v)
        s = self.head(gs)
        loss_g = distill_loss(s, gt, self.cfg.loss)
        logs = {"loss_global": loss_g.detach(), COLLAPSE_LOG: collapse_std(s)}
        with torch.no_grad():
            logs["cos"] = F.cosine_similarity(s.detach().float(), gt, dim=-1).mean()
        loss = loss_g
        if self.map_head is not None:
            s_map = self.map_head(ms.movedim(1, -1)).movedim(-1, 1)  # 1x1 linear map over channels
            loss_m = map_loss(s_map, mt, self.grid, self.cfg.map_loss)
            loss = loss + self.cfg.map_weight * loss_m
            logs["loss_map"] = loss_m.detach()
        logs["loss"] = loss.detach()
        return loss, logs

    def forward(self, images: Tensor) -> tuple[Tensor, Logs]:
        with torch.no_grad():
            (v,) = self.views(images, n_views=1)
        return self.loss_from_view(v)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """A checkpoint trained against another teacher file is refused (named by digest)."""
        theirs = state_dict.get("teacher_sha256")
        if theirs is not None and not torch.equal(theirs.cpu(), self.teacher_sha256.cpu()):
            raise ValueError(f"method.distill.teacher: the checkpoint was trained with a teacher of sha256 "
                             f"{bytes(theirs.tolist()).hex()}, but {self.teacher_path} has "
                             f"{bytes(self.teacher_sha256.tolist()).hex()}")  # fmt: skip
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


def _col(values: tuple[float, ...], like: Tensor) -> Tensor:
    return torch.tensor(values, device=like.device, dtype=like.dtype).view(1, -1, 1, 1)
