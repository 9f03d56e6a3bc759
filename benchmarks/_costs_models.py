"""The model parts of benchmarks/bench_costs.py: checkpoint size and write time, and the SimCLR step
cost vs batch and image size; plus the small real shard set its ``readers`` part streams."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from _common import CONFIGS, Device, bf16_step, make_images

from selfsup.config import load_config
from selfsup.data_info import DataInfo
from selfsup.pretrain.build import build_method
from selfsup.pretrain.data.datasets import Sample
from selfsup.pretrain.data.shards import ShardOptions, write_shards
from selfsup.pretrain.loop.optim import build_optimizer
from selfsup.pretrain.run.rundir import save_checkpoint

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

# (backbone, recipe, overrides): the project's recipes for these backbones at 224 px
CKPT_MODELS = {
    "resnet18": ("simclr_resnet50_imagenet.yaml", ["model.backbone=resnet18"]),
    "resnet50": ("simclr_resnet50_imagenet.yaml", []),
    "vit_small": ("dino_vit_small_imagenet.yaml", []),
    "vit_base": ("dino_vit_small_imagenet.yaml", ["model.backbone=vit_base"]),
}


def write_image_shards_per(out: Path, n: int, size: int, per_shard: int) -> Path:
    """``n`` synthetic RGB images of ``size`` px as raw shards of ``per_shard`` samples."""
    images = make_images(min(n, 512), size)

    def samples() -> Iterator[Sample]:
        for i in range(n):
            yield Sample(images[i % len(images)], i % 10, f"s-{i:08d}")

    opts = ShardOptions(name="train", samples_per_shard=per_shard, encoding="raw", progress=False)
    write_shards(samples(), out, [str(c) for c in range(10)], opts, total=n, source="bench_costs")
    return out


def _method(recipe: str, overrides: list[str], size: int, batch: int):
    cfg = load_config(CONFIGS / recipe, [*overrides, f"augment.size={size}"])
    method = build_method(cfg, DataInfo(3, size, MEAN, STD)).train()
    return cfg, method, build_optimizer(cfg.optim, method, batch)


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def ckpt_part(args, tmp: Path) -> dict:
    from bench_costs import table  # noqa: PLC0415 - a cycle at import time otherwise

    rows, out = [], []
    for name in args.models:
        recipe, overrides = CKPT_MODELS[name]
        cfg, method, opt = _method(recipe, overrides, 224, 1024)
        trainable = [p for p in method.parameters() if p.requires_grad]
        for p in trainable:  # one optimiser step on zero gradients: the optimiser state exists
            p.grad = torch.zeros_like(p)
        opt.step()
        opt.zero_grad(set_to_none=True)
        state = {"model": method.state_dict(), "optimizer": opt.state_dict(), "step": 1}
        times = []
        for rep in range(args.repeats):
            t = time.perf_counter()
            path = save_checkpoint(tmp / f"ckpt-{name}", rep + 1, state, keep=1)
            times.append(time.perf_counter() - t)
        size = path.stat().st_size
        r = {"model": name, "method": cfg.method.name, "optimizer": cfg.optim.name,
             "backbone_params": _params(method.backbone), "all_params": _params(method),
             "trainable_params": sum(p.numel() for p in trainable), "bytes": size,
             "write_s": float(np.median(times)), "write_mb_per_s": size / 1e6 / float(np.median(times))}
        out.append(r)
        rows.append([name, f"{cfg.method.name} / {cfg.optim.name}", f"{r['backbone_params'] / 1e6:.1f}",
                     f"{r['all_params'] / 1e6:.1f}", f"{size / 2**20:.0f}", f"{r['write_s']:.2f}",
                     f"{r['write_mb_per_s']:.0f}"])
        del state, method, opt
        for p in (tmp / f"ckpt-{name}").glob("step-*.pt"):
            p.unlink()
    print(table(f"Checkpoints at 224 px (real save_checkpoint: temp file + fsync + rename + latest; "
                f"median of {args.repeats} writes to the local disk)",
                ["model", "method / optimiser", "backbone M params", "all M params (heads, EMA)",
                 "checkpoint MiB", "write s", "MB/s"], rows))
    return {"rows": out}


def step_part(args, _tmp: Path) -> dict:
    from bench_costs import table  # noqa: PLC0415

    dev = Device(cuda=False)
    rows, out = [], []
    for size in args.step_sizes:
        stem = "cifar" if size <= 32 else "imagenet"
        for batch in args.step_batches:
            torch.manual_seed(0)
            _, method, opt = _method("simclr_resnet18_cifar.yaml", [f"model.stem={stem}"], size, batch)
            method = method.to(memory_format=torch.channels_last)
            images = torch.from_numpy(make_images(batch, size)).permute(0, 3, 1, 2).contiguous()
            bf16_step(method, opt, images, dev)  # warm-up
            times = []
            for _ in range(args.steps):
                t = time.perf_counter()
                bf16_step(method, opt, images, dev)
                times.append(time.perf_counter() - t)
            s = float(np.median(times))
            r = {"size": size, "stem": stem, "batch": batch, "step_s": s, "img_per_s": batch / s,
                 "ms_per_image": 1e3 * s / batch}
            out.append(r)
            rows.append([size, stem, batch, f"{s:.2f}", f"{r['ms_per_image']:.1f}", f"{batch / s:.1f}"])
    base = {(r["size"]): r["ms_per_image"] for r in out if r["batch"] == max(args.step_batches)}
    for row, r in zip(rows, out, strict=True):
        row.append(f"{r['ms_per_image'] / base[min(base)]:.1f}×" if r["batch"] == max(args.step_batches) else "")
    print(table(f"SimCLR ResNet-18 step on CPU (2 views, forward, backward, LARS; bf16 autocast, "
                f"channels_last; median of {args.steps} steps after 1 warm-up; "
                f"{torch.get_num_threads()} threads)",
                ["px", "stem", "batch", "step s", "ms/image", "img/s", "ms/image vs smallest px"], rows))
    return {"rows": out, "threads": torch.get_num_threads()}
