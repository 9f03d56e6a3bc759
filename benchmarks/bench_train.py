"""SimCLR training speed on the embedded data: 1 vs 2 processes, bf16 vs fp32, channels_last.

Every row is a real ``selfsup pretrain`` run (the demo recipe, ``configs/simclr_demo.yaml``:
small ResNet, 28x28 Fashion-MNIST subset, global batch 256) on the same raw shards, launched the
way a user would: ``python -m selfsup.launch.cli pretrain`` for one process,
``torchrun --standalone --nproc_per_node 2`` with ``ACCELERATE_USE_CPU=1`` for two. The global
batch is the same in every row. Threads matter as much as processes on a small shared machine:
one process uses one intra-op thread per core by default, torchrun sets ``OMP_NUM_THREADS=1``
per process, and the ``-1t`` rows run one process with ``OMP_NUM_THREADS=1`` to separate the two
effects. Precision and channels_last are compared at one thread (rows ``1p-1t-*``), where the
comparison is not drowned by the thread-scheduling noise of a busy machine; ``1p-fp32`` and
``1p-no-cl`` run them at the default thread count.

The figures come from the run's own ``metrics.jsonl``: ``--warmup`` steps form the first logged
row, which is ignored (start-up, first DataLoader batch, allocator warm-up); the next ``--steps``
steps are the measurement. ``img/s`` = images / seconds over those rows (each row covers the
same number of steps, so this is the harmonic mean of the rows' ``img_per_s``); ``data wait`` =
the fraction of that time the loop waited for the next batch (rows weighted by their duration).
An epoch of the embedded set is 39 steps, so the window includes one epoch boundary (DataLoader
workers restart there), as in real training.

``--profile`` adds a breakdown of one step in this process (same recipe and batch, 1 process,
bf16 autocast + channels_last as in the recipe, at each ``--profile-threads`` count):
augmentation, forward through backbone and head, InfoNCE loss, backward, optimiser step, each
timed over several steps; plus the top operators of ``torch.profiler`` for one step.

    .venv/bin/python benchmarks/bench_train.py                  # ~5-8 min on 2 busy cores
    .venv/bin/python benchmarks/bench_train.py --variants 1p 2p --steps 20 --profile
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from selfsup.pretrain.data.datasets import embedded
from selfsup.pretrain.data.shards import ShardOptions, shuffled, write_shards

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Variant:
    procs: int
    overrides: tuple[str, ...] = ()
    threads: int = 0  # OMP_NUM_THREADS per process; 0 = the launcher's default
    ref: str = ""  # the variant this one's ratio is taken against


# torch's default for one process is one intra-op thread per core; torchrun sets 1 per process
VARIANTS = {
    "1p": Variant(1),
    "2p": Variant(2, ref="1p"),
    "1p-1t": Variant(1, threads=1, ref="1p"),
    "1p-1t-fp32": Variant(1, ("train.precision=fp32",), 1, ref="1p-1t"),
    "1p-1t-no-cl": Variant(1, ("train.channels_last=false",), 1, ref="1p-1t"),
    "1p-1t-fp32-no-cl": Variant(1, ("train.precision=fp32", "train.channels_last=false"), 1, ref="1p-1t"),
    "1p-fp32": Variant(1, ("train.precision=fp32",), ref="1p"),
    "1p-no-cl": Variant(1, ("train.channels_last=false",), ref="1p"),
}
DEFAULT_VARIANTS = ["1p", "2p", "1p-1t", "1p-1t-fp32", "1p-1t-no-cl"]


def run_variant(
    name: str, config: str, shards: Path, run_dir: Path, steps: int, warmup: int, extra: list[str]
) -> dict:
    """One ``selfsup pretrain`` run; returns its figures over the measured rows."""
    v = VARIANTS[name]
    procs = v.procs
    args = [
        "pretrain", "--config", config, f"data.train={shards}", "data.test=", f"run_dir={run_dir}",
        f"train.max_steps={warmup + steps}", f"train.log_every={warmup}", "train.checkpoint_every=0",
        "train.nan_policy=skip", f"train.max_nan_skips={warmup + steps}",
        "log.wandb=off", "log.progress=false", *v.overrides, *extra,
    ]  # fmt: skip
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "WANDB_SILENT": "true"}
    if v.threads:
        env["OMP_NUM_THREADS"] = str(v.threads)
    threads = env.get("OMP_NUM_THREADS", str(os.cpu_count() if procs == 1 else 1))
    if procs == 1:
        cmd = [sys.executable, "-m", "selfsup.launch.cli", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={procs}", "-m", "selfsup.launch.cli", *args]  # fmt: skip
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    rows = [json.loads(r) for r in (run_dir / "metrics.jsonl").read_text().splitlines() if r.strip()]
    rows = [r for r in rows if "img_per_s" in r][1:]  # the first row is the warm-up
    if not rows:
        raise RuntimeError(f"{name}: no logged rows after the warm-up in {run_dir}/metrics.jsonl")
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    images = resolved["data"]["batch_size"] * resolved["train"]["log_every"]  # global, per row
    seconds = [images / r["img_per_s"] for r in rows]
    return {
        "name": name,
        "procs": procs,
        "threads": threads,
        "batch": resolved["data"]["batch_size"],
        "img_s": images * len(rows) / sum(seconds),
        "wait": sum(r["data_wait"] * s for r, s in zip(rows, seconds, strict=True)) / sum(seconds),
        "rows": [round(r["img_per_s"]) for r in rows],
        "steps": warmup * len(rows),
        "wall": wall,
        "load": load,
        "nan_skips": rows[-1].get("nan_skips", 0),
        "cmd": (f"OMP_NUM_THREADS={v.threads} " if v.threads else "") + shlex.join(["python", *cmd[1:]]),
    }


def profile_step(config: str, shards: Path, repeats: int, threads: int) -> None:
    """Where one training step's time goes, timed phase by phase in this process."""
    torch.set_num_threads(threads)
    from selfsup.config import load_config
    from selfsup.pretrain.build import build_method, data_info
    from selfsup.pretrain.data.stream import ShardSet, load_arrays
    from selfsup.pretrain.loop.optim import build_optimizer

    cfg = load_config(config, [f"data.train={shards}", "data.test="])
    ss = ShardSet.open(shards)
    images = load_arrays(ss)[0][: cfg.data.batch_size]
    torch.manual_seed(0)
    info = data_info(cfg, ss.channels, ss.image_size, ss.mean, ss.std)
    method = build_method(cfg, info).to(memory_format=torch.channels_last)
    method.train()
    opt = build_optimizer(cfg.optim, method, cfg.data.batch_size)
    bf16 = cfg.train.precision in ("auto", "bf16")
    phases = ("augmentation", "forward", "loss", "backward", "optimizer")
    spent = dict.fromkeys(phases, 0.0)

    def step(record: bool) -> None:
        marks = [time.perf_counter()]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            v1, v2 = method.make_views(images)
            marks.append(time.perf_counter())
            z1, z2 = method.embed(torch.cat([v1, v2])).chunk(2)
            marks.append(time.perf_counter())
            loss, _ = method._loss(z1, z2)
            marks.append(time.perf_counter())
        loss.backward()
        marks.append(time.perf_counter())
        opt.step()
        opt.zero_grad(set_to_none=True)
        marks.append(time.perf_counter())
        if record:
            for ph, a, b in zip(phases, marks, marks[1:], strict=False):
                spent[ph] += b - a

    for _ in range(2):
        step(False)
    for _ in range(repeats):
        step(True)
    total = sum(spent.values())
    print(f"\none step, batch {len(images)}, {'bf16' if bf16 else 'fp32'} + channels_last, "
          f"{torch.get_num_threads()} threads, mean of {repeats} steps "
          f"({len(images) * repeats / total:,.0f} img/s without data loading):")
    for ph in phases:
        print(f"  {ph:<14}{1000 * spent[ph] / repeats:>8.1f} ms  {100 * spent[ph] / total:>5.1f} %")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step(False)
    print(f"\ntorch.profiler, one step, {threads} threads, top operators by self CPU time:")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8, max_name_column_width=40))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/simclr_demo.yaml")
    p.add_argument("--steps", type=int, default=40, help="measured steps per run (multiple of --warmup)")
    p.add_argument("--warmup", type=int, default=5, help="steps in the first (ignored) logged row")
    p.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=list(VARIANTS))
    p.add_argument("--profile", action="store_true", help="also time the phases of one step")
    p.add_argument("--profile-steps", type=int, default=4)
    p.add_argument("--profile-threads", type=int, nargs="+", default=[os.cpu_count() or 1, 1],
                   help="intra-op thread counts to profile with (default: all cores, then 1)")
    p.add_argument("--tmp", default=None, help="scratch folder (default: a fresh temporary one)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="extra config overrides for every run")
    args = p.parse_args()
    if args.steps % args.warmup:
        p.error(f"--steps {args.steps} must be a multiple of --warmup {args.warmup} (one logged row each)")

    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} cores; "
          f"recipe {args.config}; {args.steps} measured steps after {args.warmup} warm-up steps")
    results = []
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmpdir:
        tmp = Path(tmpdir)
        src = embedded("train")
        shards = tmp / "shards"
        write_shards(shuffled(src, 0), shards, src.classes, ShardOptions(progress=False), total=len(src))
        for name in args.variants:
            r = run_variant(name, args.config, shards, tmp / name, args.steps, args.warmup, args.overrides)
            results.append(r)
            print(f"  {name:<18}{r['img_s']:>8,.0f} img/s  data wait {100 * r['wait']:4.1f} %  "
                  f"rows {r['rows']}  wall {r['wall']:.0f} s  load {r['load']:.1f}", flush=True)
        if args.profile:
            for threads in args.profile_threads:
                profile_step(args.config, shards, args.profile_steps, threads)

    by_name = {r["name"]: r for r in results}
    print(f"\nSimCLR pretrain, {args.config}, global batch {results[0]['batch']}, {args.steps} steps "
          f"after warm-up; threads = intra-op threads per process")
    head = (f"{'variant':<18}{'procs':>6}{'threads':>8}{'img/s':>9}{'ratio':>18}{'data wait':>11}"
            f"{'run wall s':>12}{'load1':>7}")
    print(head)
    print("-" * len(head))
    for r in results:
        ref = by_name.get(VARIANTS[r["name"]].ref)
        ratio = f"{r['img_s'] / ref['img_s']:.2f}x vs {ref['name']}" if ref else ""
        print(f"{r['name']:<18}{r['procs']:>6}{r['threads']:>8}{r['img_s']:>9,.0f}{ratio:>18}"
              f"{100 * r['wait']:>10.1f}%{r['wall']:>12.0f}{r['load']:>7.1f}")
    print("\ncommands (from the repository root; the shard and run folders were temporary):")
    for r in results:
        print(f"  {r['name']}: {r['cmd']}")
    print(f"\nload average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
