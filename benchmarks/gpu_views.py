"""gpu_check.py part 7, ``multicrop``: DINO's multi-crop views at 224 px on the device, from
configs/dino_vit_small_imagenet.yaml (2 global crops at 224 px + 8 local crops at 96 px, batch 64
uint8 images already on the GPU), and which view ops ``torch.compile`` helps.

Figures: ``views``: ms per batch (CUDA events), source img_s, crops_per_image, params_on_device
(every random parameter tensor of one ``sample`` call is on the GPU), host_syncs_per_batch (the
whole multi-crop call, torch.cuda.set_sync_debug_mode("warn"); the first call, which copies the
views' constants to the device once, is excluded) and sync_sites. ``compile``: for each op of one
224-px global-crop chunk (crop_flip: the resized crop + flip warp; jitter: brightness, contrast,
saturation, hue; blur: the per-sample Gaussian; apply: the whole chain with ``torch.where``
selection), eager_ms, compiled_ms, speedup and compile_s (first call), one op at a time
(``fullgraph=False``), skipped when the cap is near. Kornia's ``RandomResizedCrop`` module is not
used (it compiles pathologically slowly, kornia #4647); the warp here is kornia's functional
``crop_by_transform_mat`` on a batch of matrices. Dry run: vit_micro, 32/16 px, batch 4,
the "eager" compile backend."""

from __future__ import annotations

import dataclasses

import torch
from _common import ROOT, Part, SyncCounter
from bench_augment import MEAN, STD

from selfsup.augment.ops import colour_jitter, gaussian_blur
from selfsup.config import load_config
from selfsup.data_info import DataInfo
from selfsup.pretrain.build import build_method

RECIPE = ROOT / "configs" / "dino_vit_small_imagenet.yaml"
GPU_RUN = {"size": 224, "batch": 64, "reps": 10, "overrides": (), "backend": "inductor", "compile_estimate_s": 60}
DRY_RUN = {"size": 32, "batch": 4, "reps": 2, "backend": "eager", "compile_estimate_s": 1,
           "overrides": ("augment.size=32", "model.backbone=vit_micro", "model.patch_size=8", "method.dino.out_dim=256",
                         "method.dino.hidden_dim=64", "method.dino.bottleneck_dim=32", "method.dino.local_size=16")}  # fmt: skip


def view_ops(views, x8: torch.Tensor):
    """The ops of one views chunk, each a function of the uint8 batch, with fixed parameters."""
    n = len(x8)
    p = views.sample(1, n, x8.shape[2], x8.shape[3], x8.device)
    p.jitter_on.fill_(True), p.blur.fill_(True)  # every op on every row: the GPU path's cost
    x01 = views._crop_flip(x8.float() / 255, p)
    return {
        "crop_flip": lambda: views._crop_flip(x8.float() / 255, p),
        "jitter": lambda: colour_jitter(x01, p.jitter),
        "blur": lambda: gaussian_blur(x01, p.sigma, views.blur_kernel),
        "apply": lambda: views.apply(x8, p),
    }


def part_multicrop(part: Part, ctx) -> None:
    dev = ctx.dev
    run = GPU_RUN if dev.cuda else DRY_RUN
    cfg = load_config(RECIPE, [f"data.batch_size={run['batch']}", *run["overrides"]])
    method = build_method(cfg, DataInfo(3, run["size"], MEAN, STD)).to(dev.torch)
    images = torch.randint(0, 256, (run["batch"], 3, run["size"], run["size"]), dtype=torch.uint8, device=dev.torch)
    if part.due("views", 2.0):
        method.multi_crop(images)  # first call: constants to the device
        t = dev.time_ms(lambda: method.multi_crop(images), run["reps"])
        with SyncCounter(dev) as syncs:
            method.multi_crop(images)
        p = method.global_views.sample(2, run["batch"], run["size"], run["size"], dev.torch)
        on_device = all(getattr(p, f.name).device.type == dev.type for f in dataclasses.fields(p))
        part.put("views", {
            "batch": run["batch"], "global_size": method.global_views.size, "local_size": method.local_views.size,
            "crops_per_image": cfg.method.dino.global_crops + cfg.method.dino.local_crops, "ms": t["ms"],
            "img_s": 1000 * run["batch"] / t["ms"], "params_on_device": on_device,
            "host_syncs_per_batch": syncs.count, "sync_sites": syncs.where})  # fmt: skip
    res: dict = {"backend": run["backend"]}
    for name, fn in view_ops(method.global_views, images).items():
        if not part.due(f"compile_{name}", run["compile_estimate_s"]):
            continue
        eager = dev.time_ms(fn, run["reps"])["ms"]
        torch._dynamo.reset()
        compiled = torch.compile(fn, backend=run["backend"])
        first = dev.time_ms(compiled, 1, warmup=0)["wall_ms"] / 1000
        ms = dev.time_ms(compiled, run["reps"])["ms"]
        res[name] = {"eager_ms": eager, "compiled_ms": ms, "speedup": eager / ms, "compile_s": first}
        part.put("compile", res)
