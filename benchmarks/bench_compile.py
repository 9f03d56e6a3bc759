"""train.compile on CPU: eager vs ``compile_parts`` (what ``train.compile=true`` does) for one
training step (views, forward, loss, backward, optimiser step) on a synthetic uint8 batch.

Rows: SimCLR ResNet-18 at 96 px and MoCo v3 ViT-S/16 at 224 px (the recipes' models, small
batches). first_step_s: the first compiled step (Dynamo + Inductor code generation) against the
first eager step; step_ms: median of the next ``--steps`` steps; ratio = eager / compiled.

    .venv/bin/python benchmarks/bench_compile.py --steps 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from selfsup.config import load_config
from selfsup.data_info import DataInfo
from selfsup.pretrain.build import build_method
from selfsup.pretrain.loop.optim import build_optimizer
from selfsup.pretrain.loop.setup import compile_parts

ROWS = {
    "resnet18_96px": ("configs/simclr_resnet18_cifar.yaml", 96, 32, ("augment.size=96",)),
    "vit_s16_224px": ("configs/mocov3_vit_small_imagenet.yaml", 224, 8, ("augment.size=224",)),
}


def timed_steps(config: str, size: int, batch: int, extra, compiled: bool, steps: int) -> dict:
    cfg = load_config(config, [f"data.batch_size={batch}", *extra])
    torch.manual_seed(0)
    method = build_method(cfg, DataInfo(3, size, (0.5,) * 3, (0.25,) * 3)).train()
    if compiled:
        compile_parts(method)
    opt = build_optimizer(cfg.optim, method, batch, method.no_weight_decay(), method.param_groups_options())
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8)
    times = []
    for _ in range(steps + 1):
        t = time.perf_counter()
        loss, _ = method(images)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    return {"first_step_s": times[0], "step_ms": 1000 * statistics.median(times[1:])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rows", nargs="+", default=list(ROWS))
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print("| model | batch | eager first step s | compiled first step s | eager step ms | compiled step ms | eager / compiled |")
    print("|---|---|---|---|---|---|---|")
    for name in args.rows:
        config, size, batch, extra = ROWS[name]
        e = timed_steps(config, size, batch, extra, False, args.steps)
        c = timed_steps(config, size, batch, extra, True, args.steps)
        print(f"| {name} | {batch} | {e['first_step_s']:.1f} | {c['first_step_s']:.1f} | {e['step_ms']:.0f} "
              f"| {c['step_ms']:.0f} | {e['step_ms'] / c['step_ms']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
