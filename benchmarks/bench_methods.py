"""Training-step speed of SimCLR, BYOL, SimSiam, MoCo v3, VICReg, Barlow Twins and DINO: same batch, same backbone.

Each method is built from its demo recipe (``configs/<method>_demo.yaml``: small ResNet, 28x28
Fashion-MNIST images, CPU-sized heads) and timed on the same uint8 batch of the embedded data, in
this process, without a DataLoader: views on the device, forward, backward, optimiser step and
the method's ``after_step`` (BYOL's EMA update), under the recipe's precision (bf16 autocast on
CPU) and channels_last, as the training loop runs them. ``--warmup`` steps are not timed; the
figure is images / second over ``--steps`` steps (median of ``--repeats`` runs, methods
interleaved so that a busy machine slows them alike).

What to expect: BYOL runs the backbone four times per step (two views through the online network
with gradients, two through the target without), SimCLR and SimSiam twice, so BYOL costs about
one extra forward pass (~1/3 of a forward+backward); SimSiam's and BYOL's per-view forward passes
are two half-size calls where SimCLR makes one call on both views. DINO (its demo: 2 global crops
at 28 px + 4 local crops at 12 px) runs the student on all six views with gradients and the teacher
on the two global ones; the local crops cost (12/28)^2 ~ 0.18 of a global one each.

    .venv/bin/python benchmarks/bench_methods.py                     # ~1-2 min on 2 busy cores
    .venv/bin/python benchmarks/bench_methods.py --batch 128 --steps 10 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from selfsup.config import load_config
from selfsup.data_info import DataInfo
from selfsup.pretrain.build import build_method
from selfsup.pretrain.data.datasets import embedded
from selfsup.pretrain.loop.optim import build_optimizer

ROOT = Path(__file__).resolve().parent.parent
METHODS = ("simclr", "byol", "simsiam", "mocov3", "vicreg", "barlow_twins", "dino")


def build(name: str, batch: int, info: DataInfo, overrides: list[str]):
    cfg = load_config(ROOT / "configs" / f"{name}_demo.yaml", [f"data.batch_size={batch}", *overrides])
    torch.manual_seed(0)
    model = build_method(cfg, info)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = build_optimizer(cfg.optim, model, batch, model.no_weight_decay(), model.param_groups_options())
    bf16 = cfg.train.precision in ("auto", "bf16")
    return model.train(), opt, bf16


def time_steps(model, opt, bf16: bool, images: torch.Tensor, steps: int, start: int) -> float:
    """Seconds for ``steps`` full training steps."""
    t0 = time.perf_counter()
    for i in range(steps):
        with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext():
            loss, _ = model(images)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.after_step(start + i + 1, 10_000)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=256, help="images per step (default: the demos' 256)")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per repeat")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats; the median is shown")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: default)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("overrides", nargs="*", help="config overrides for every method, e.g. train.precision=fp32")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    src = embedded("train")
    images = torch.from_numpy(src.images[: args.batch]).permute(0, 3, 1, 2).contiguous()  # uint8 [B,1,28,28]
    info = DataInfo(1, images.shape[-1], (0.2860,), (0.3530,))
    built = {m: build(m, args.batch, info, args.overrides) for m in args.methods}
    for model, opt, bf16 in built.values():
        time_steps(model, opt, bf16, images, args.warmup, 0)
    seconds: dict[str, list[float]] = {m: [] for m in built}
    for r in range(args.repeats):
        for m, (model, opt, bf16) in built.items():
            seconds[m].append(time_steps(model, opt, bf16, images, args.steps, args.warmup + r * args.steps))
    print(f"batch {args.batch}, {args.steps} steps x {args.repeats} repeats, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, overrides {args.overrides or 'none'}")  # fmt: skip
    print(f"{'method':12s} {'params':>9s} {'img/s':>8s} {'ms/step':>8s} {'vs simclr':>9s}")
    base = None
    for m, (model, _, _) in built.items():
        s = statistics.median(seconds[m]) / args.steps
        ips = args.batch / s
        base = base or (ips if m == "simclr" else None)
        n = sum(p.numel() for p in model.parameters() if p.requires_grad)
        ratio = f"{ips / base:.2f}x" if base else "-"
        print(f"{m:12s} {n:9d} {ips:8.0f} {1000 * s:8.0f} {ratio:>9s}")


if __name__ == "__main__":
    main()
