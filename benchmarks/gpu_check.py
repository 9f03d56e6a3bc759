"""One run on a lent GPU node that answers what GPU users ask; every figure goes to one JSON file.

    python benchmarks/gpu_check.py --out gpu.json          # one GPU; 8 min at most (the caps)
    python benchmarks/gpu_check.py --dry-run --out dry.json # same code, tiny sizes, CPU, < 1 min

Not yet run on a GPU: the caps (demo 180 s, views 30, infonce 25, train 200, determinism 45, dino 40, multicrop 40)
are sized from CPU measurements and H200 estimates; the JSON says what each part reached.

Parts (each has a time cap, checked between measurements: a part that reaches it stops and keeps
its partial results; an exception in one part is recorded with its traceback and the next part
runs; the JSON is rewritten after every measurement, so a killed run still leaves a file):

1 demo         `selfsup demo --minutes M --processes 1 --wandb off` (bf16 autocast on CUDA: the
               recipe's train.precision=auto). stages: wall seconds per stage (timed here, and
               as the demo printed them); started_at_s: when each stage began; calibration: the
               img/s the demo measured and the steps it chose; table: the eval report
               (pretrained vs raw pixels vs random init); pretrain: median img/s, data wait.
2 views        the SimCLR views at 32, 96 and 224 px, batch 256, 2 views per image.
               device_ms_per_batch: GPU time of one call on a batch already on the GPU (CUDA
               events); device_source_img_s = batch / that. loader_to_device_img_s: end to end,
               decode-only DataLoader workers -> pinned batch -> GPU -> views.
               pil_img_s: per-sample PIL views (the torchvision recipe, no torchvision) in one
               DataLoader worker per CPU core of this node; pil_worker_cpu_s_per_1k: CPU seconds
               they spend per 1000 images (how many cores a GPU would need fed that way).
               params_on_device: every random parameter tensor is created on the GPU.
               host_syncs_per_batch / host_syncs_in_sampling: synchronising CUDA calls in one
               call (torch.cuda.set_sync_debug_mode("warn")); sync_sites: the Python lines.
3 infonce      NT-Xent forward+backward over 2N embeddings (dim 128, fp32 logits), N = 8k, 32k,
               64k images per view: plain (the whole 2N x 2N logit matrix) vs chunked (2048
               rows at a time). ms (CUDA events), peak_mib (torch.cuda.max_memory_allocated),
               extra_peak_mib (peak minus what was allocated before), loss_rel_diff (chunked
               vs plain). Out of memory is a result: {"oom": true, "error": ...}.
4 train        ResNet-18 at 32 px (CIFAR recipe, batch 512) and ResNet-50 at 224 px (ImageNet
               recipe, batch 256 per GPU), bf16 autocast + channels_last, LARS, one GPU.
               "eager" / "torch.compile": in this process, on a batch already on the GPU.
               full_img_s: the whole SimCLR step (views, backbone, head, InfoNCE, backward,
               optimiser step); bare_img_s: backbone forward+backward alone on the same views;
               overhead_pct = 100 (full_ms / bare_ms - 1); views_ms, optimizer_ms: those phases
               alone; full_peak_mib / bare_peak_mib: peak GPU memory; resident_mib: allocated
               before a step (weights, optimiser state); host_syncs_per_step; compile_s: the
               first compiled step. "selfsup pretrain": the real command on synthetic shards
               (its DataLoader, its loop), steps inside one epoch: img_s and data_wait = the
               fraction of the loop's time spent waiting for the next batch (first metrics row
               ignored; the workers prefetch a few batches each, so a short window can hide a
               slow loader: rows_data_wait shows the trend).
5 determinism  two `selfsup pretrain` runs (ResNet-18 recipe, 32 px, same seed) side by side:
               loss and grad-norm difference per step, first step that differs, the largest
               difference of the final backbone weights; identical: both exactly 0.
6 dino         (benchmarks/gpu_dino.py) a DINO ViT-S/16 multi-crop step at 224 px, bf16 autocast
               (2 global + 8 local 96-px crops, 65536 prototypes, batch 64), and the same step
               with the DINOv2 options (iBOT + KoLeo): ms, img_s, peak_mib, loss_finite.
7 multicrop    (benchmarks/gpu_views.py) DINO's 224-px multi-crop views (2 x 224 + 8 x 96 px,
               batch 64): ms, img_s, params_on_device, host_syncs_per_batch; and per view op
               (crop_flip, jitter, blur, apply) eager_ms vs compiled_ms, speedup, compile_s.

--dry-run runs the same code on the CPU at tiny sizes (small backbones, batches, N, steps; the
"eager" torch.compile backend, i.e. Dynamo tracing without code generation; the demo stopped by
a 6-s cap; only the first model of part 4 gets the `selfsup pretrain` run and the compile), so
the script is tested where there is no GPU (tests/test_gpu_check.py). CUDA-only calls are
skipped there: host-sync counts are null, memory is the resident-set high-water mark.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import ROOT, Deadline, Device, Part, error_summary, write_json
from gpu_dino import part_dino
from gpu_parts import DRY, GPU, Ctx
from gpu_parts import PARTS as BASE_PARTS
from gpu_views import part_multicrop

PARTS = {**BASE_PARTS, "dino": part_dino, "multicrop": part_multicrop}
CAPS = {"demo": 180, "views": 30, "infonce": 25, "train": 200, "determinism": 45, "dino": 40, "multicrop": 40}  # 9.7 min at most
DRY_CAPS = {"demo": 6, "views": 15, "infonce": 10, "train": 40, "determinism": 30, "dino": 20, "multicrop": 15}


def environment(dev: Device) -> dict:
    env = {
        "host": socket.gethostname(), "python": platform.python_version(),
        "torch": torch.__version__, "cuda_build": torch.version.cuda,
        "cpu_cores": len(os.sched_getaffinity(0)), "device": dev.type,
    }  # fmt: skip
    try:  # a copied tree on a lent node may have no .git (or no git)
        env["git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                           capture_output=True, text=True).stdout.strip()
    except OSError:
        env["git_commit"] = ""
    if dev.cuda:
        props = torch.cuda.get_device_properties(0)
        env.update(
            gpu=props.name, gpu_count=torch.cuda.device_count(),
            gpu_memory_gib=props.total_memory / 2**30, capability=f"{props.major}.{props.minor}",
            cudnn=torch.backends.cudnn.version(), bf16_supported=torch.cuda.is_bf16_supported(),
            cudnn_benchmark=torch.backends.cudnn.benchmark,
            tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
        )  # fmt: skip
    return env


def parse_caps(items: list[str], caps: dict[str, float]) -> dict[str, float]:
    caps = dict(caps)
    for item in items:
        name, _, value = item.partition("=")
        if name not in caps or not value:
            raise SystemExit(f"--cap: expected PART=SECONDS with PART in {', '.join(caps)}, got {item!r}")
        caps[name] = float(value)
    return caps


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="gpu_check.json", help="JSON file (default: gpu_check.json)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    p.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU (tests the script)")
    p.add_argument("--cap", action="append", default=[], metavar="PART=SECONDS",
                   help=f"time cap of a part (defaults: {CAPS}; dry run: {DRY_CAPS})")
    p.add_argument("--demo-minutes", type=float, default=None,
                   help=f"pretraining budget of the demo (default {GPU.demo_minutes})")
    p.add_argument("--tmp", default=None, help="scratch folder (default: a temporary one, removed)")
    p.add_argument("--quiet", action="store_true", help="do not echo the demo's output")
    args = p.parse_args(argv)
    parts = [s.strip() for s in args.parts.split(",") if s.strip()]
    unknown = [s for s in parts if s not in PARTS]
    if unknown:
        p.error(f"--parts: unknown {unknown}; choose from {', '.join(PARTS)}")
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (torch.cuda.is_available() is False); "
              "run on a GPU node, or use --dry-run for the CPU check of the script", file=sys.stderr)
        return 2
    dev = Device(cuda=not args.dry_run)
    threads = torch.get_num_threads()
    if args.dry_run:  # on shared, busy cores OpenMP spin-waiting makes 2 threads ~50x slower
        torch.set_num_threads(1)
    try:
        return run_parts(args, parts, dev)
    finally:
        torch.set_num_threads(threads)


def run_parts(args: argparse.Namespace, parts: list[str], dev: Device) -> int:
    sizes = DRY if args.dry_run else GPU
    if args.demo_minutes is not None:
        sizes = dataclasses.replace(sizes, demo_minutes=args.demo_minutes)
    caps = parse_caps(args.cap, DRY_CAPS if args.dry_run else CAPS)
    out = Path(args.out)
    started = time.monotonic()
    data: dict = {"meta": {"args": vars(args), "environment": environment(dev),
                           "started": time.strftime("%Y-%m-%d %H:%M:%S %z"), "caps_s": caps},
                  "parts": {}}  # fmt: skip

    with tempfile.TemporaryDirectory(prefix="gpu_check-", dir=args.tmp) as tmp:
        ctx = Ctx(dev, sizes, Path(tmp), len(os.sched_getaffinity(0)), echo=not args.quiet)
        for name in parts:
            print(f"\n### gpu_check part {name} (cap {caps[name]:.0f} s)", flush=True)
            entry: dict = {"status": "running", "cap_s": caps[name]}
            data["parts"][name] = entry
            part = Part(name, Deadline(caps[name]), lambda: write_json(out, data))
            entry["results"], entry["skipped"] = part.results, part.skipped
            t0 = time.monotonic()
            try:
                PARTS[name](part, ctx)
                entry["status"] = "partial" if part.skipped else "ok"
            except Exception as e:  # recorded; the next part still runs
                entry["status"] = "failed"
                entry["error"] = error_summary(e)
                print(f"part {name} failed: {type(e).__name__}: {str(e)[:500]}", file=sys.stderr)
            finally:
                entry["seconds"] = round(time.monotonic() - t0, 1)
                data["meta"]["total_s"] = round(time.monotonic() - started, 1)
                write_json(out, data)
                dev.free()
            print(f"### {name}: {entry['status']} in {entry['seconds']} s"
                  + (f"; skipped: {', '.join(part.skipped)}" if part.skipped else ""), flush=True)
    print(f"\nwrote {out} ({data['meta']['total_s']:.0f} s): "
          + ", ".join(f"{k} {v['status']}" for k, v in data["parts"].items()))
    return 0 if all(v["status"] != "failed" for v in data["parts"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
