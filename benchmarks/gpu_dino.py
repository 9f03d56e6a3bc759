"""gpu_check.py part 6, ``dino``: a DINO ViT-S/16 multi-crop step at 224 px in bf16 autocast, from
configs/dino_vit_small_imagenet.yaml (2 global crops at 224 px + 8 local crops at 96 px, head
2048 -> 256 -> 65536 prototypes), on one GPU, a batch already on it: views, student on all
views, teacher on the global ones, loss, backward, AdamW step and ``after_step`` (centre
all-reduce, EMA teacher). Then the same step with the DINOv2 options on (iBOT masked-patch loss
with the shared head, KoLeo). Figures: ms (CUDA events), img_s, peak_mib, loss (finite: the
bf16 path does not NaN). Dry run: vit_micro at 32 px, 2 local crops at 16 px, 256 prototypes."""

from __future__ import annotations

import math

import torch
from _common import ROOT, Part, bf16_step, catch_oom
from bench_augment import MEAN, STD

from selfsup.config import load_config
from selfsup.data_info import DataInfo
from selfsup.pretrain.build import build_method
from selfsup.pretrain.loop.optim import build_optimizer

RECIPE = ROOT / "configs" / "dino_vit_small_imagenet.yaml"
GPU_RUN = {"size": 224, "batch": 64, "reps": 10, "warmup": 2, "overrides": ()}  # DINOv2's batch_size_per_gpu 64
DRY_RUN = {"size": 32, "batch": 4, "reps": 1, "warmup": 1,
           "overrides": ("augment.size=32", "model.backbone=vit_micro", "model.patch_size=8", "method.dino.out_dim=256",
                         "method.dino.hidden_dim=64", "method.dino.bottleneck_dim=32", "method.dino.local_size=16", "method.dino.local_crops=2")}  # fmt: skip
DINOV2 = ("method.dino.ibot_weight=1.0", "method.dino.koleo_weight=0.1")


def dino_step(ctx, run: dict, extra: tuple[str, ...]) -> dict:
    dev = ctx.dev
    cfg = load_config(RECIPE, [f"data.batch_size={run['batch']}", *run["overrides"], *extra])
    info = DataInfo(3, run["size"], MEAN, STD)
    torch.manual_seed(0)
    method = build_method(cfg, info).to(dev.torch).train()
    opt = build_optimizer(cfg.optim, method, run["batch"], method.no_weight_decay(), method.param_groups_options())
    images = torch.randint(0, 256, (run["batch"], 3, run["size"], run["size"]), dtype=torch.uint8, device=dev.torch)
    losses: list[float] = []
    step = [0]

    def full() -> None:
        losses.append(bf16_step(method, opt, images, dev))
        step[0] += 1
        method.after_step(step[0], 1000)

    base = dev.mem_reset()
    t = dev.time_ms(full, run["reps"], warmup=run["warmup"])
    last = float(losses[-1])
    return {"batch": run["batch"], "size": run["size"], "global_crops": cfg.method.dino.global_crops,
            "local_crops": cfg.method.dino.local_crops, "local_size": method.local_views.size,
            "prototypes": cfg.method.dino.out_dim, "precision": "bf16 autocast", "ms": t["ms"],
            "img_s": 1000 * run["batch"] / t["ms"], "peak_mib": dev.mem_peak(), "resident_mib": base,
            "loss": last, "loss_finite": math.isfinite(last)}  # fmt: skip


def part_dino(part: Part, ctx) -> None:
    run = DRY_RUN if not ctx.dev.cuda else GPU_RUN
    for key, extra in (("vit_s16_224px", ()), ("vit_s16_224px_ibot_koleo", DINOV2)):
        if part.due(key):
            part.put(key, catch_oom(lambda e=extra: dino_step(ctx, run, e), ctx.dev))
            ctx.dev.free()
