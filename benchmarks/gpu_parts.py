"""The five parts of benchmarks/gpu_check.py (see its --help for what each figure means).

Each part gets a ``Part`` (its deadline and a ``put`` that stores a result and rewrites the JSON)
and a ``Ctx`` (device, sizes, scratch folder). A part checks ``part.due(name, estimate)`` before
every measurement, so one that runs out of time stops with what it has.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import re
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from _common import (
    CLI,
    CONFIGS,
    DataInfo,
    Device,
    Part,
    SyncCounter,
    bf16_step,
    build_method,
    build_optimizer,
    build_views,
    catch_oom,
    device_env,
    info_nce,
    load_backbone,
    load_config,
    make_images,
    metrics_rows,
    run_streaming,
    write_image_shards,
)
from bench_augment import MEAN, STD, Decoded, PILViews, recipe, run_loader
from torch.utils.data import DataLoader


@dataclass(frozen=True)
class Model:
    """One training configuration of part 4 (and part 5 uses the first)."""

    name: str
    config: str  # recipe under configs/
    size: int  # view (and source image) side in pixels
    batch: int  # images per step (one GPU)
    shard_images: int  # synthetic training images: more than the measured steps need
    warmup: int  # steps of the first, ignored, metrics row of the `selfsup pretrain` run
    steps: int  # measured steps of that run (a multiple of warmup)
    overrides: tuple[str, ...] = ()


@dataclass(frozen=True)
class Sizes:
    demo_minutes: float
    view_sizes: tuple[int, ...]
    view_batch: int
    view_images: dict[int, int]  # source images per pipeline, by size
    view_reps: int
    infonce_n: tuple[int, ...]  # images per view
    infonce_dim: int
    infonce_chunk: int
    step_reps: int
    models: tuple[Model, ...]
    loop_models: int  # how many of them also get a `selfsup pretrain` run (1 s of GPU, 8 of CPU)
    compile_models: int  # and a torch.compile measurement
    compile_backend: str
    compile_estimate_s: dict[str, float]  # skip a compile unless this much time is left
    determinism_steps: int


R18, R50 = "simclr_resnet18_cifar.yaml", "simclr_resnet50_imagenet.yaml"
GPU = Sizes(
    demo_minutes=1.5, view_sizes=(32, 96, 224), view_batch=256,
    view_images={32: 8192, 96: 4096, 224: 2048}, view_reps=10,
    infonce_n=(8192, 32768, 65536), infonce_dim=128, infonce_chunk=2048, step_reps=10,
    # the measured steps stay inside the first epoch (DataLoader workers restart at its end)
    models=(Model("resnet18_32px", R18, 32, 512, 40960, 10, 60),
            Model("resnet50_224px", R50, 224, 256, 4096, 4, 12)),
    loop_models=2, compile_models=2, compile_backend="inductor", compile_estimate_s={"resnet18_32px": 40, "resnet50_224px": 75},
    determinism_steps=30,
)  # fmt: skip
TINY = ("model.backbone=resnet_small", "model.width=0.25", "method.simclr.proj_hidden=64",
        "data.batch_size=16", "data.workers=1")  # fmt: skip
DRY = Sizes(
    demo_minutes=0.05, view_sizes=(16, 32, 64), view_batch=8,
    view_images={16: 32, 32: 32, 64: 16}, view_reps=2,
    infonce_n=(256, 512, 1024), infonce_dim=32, infonce_chunk=128, step_reps=2,
    models=(Model("resnet18_32px", R18, 16, 16, 256, 2, 2, TINY),
            Model("resnet50_224px", R50, 32, 16, 128, 2, 2, TINY)),
    loop_models=1, compile_models=1, compile_backend="eager", compile_estimate_s={}, determinism_steps=3,
)  # fmt: skip


@dataclass
class Ctx:
    dev: Device
    sizes: Sizes
    tmp: Path
    cores: int
    echo: bool = True


# ---- 1. the demo --------------------------------------------------------------------------------
HEADER = re.compile(r"^=== \[(\d+)/(\d+)\] (.+)$")
DONE = re.compile(r"^=== (.+): done in (\d+) s$")
CALIBRATION = re.compile(r"(\d+) images/s -> (\d+) steps of (\d+) images")


def part_demo(part: Part, ctx: Ctx) -> None:
    out = ctx.tmp / "demo"
    # W&B off: one dependency less on a bare GPU node; its offline init costs ~0.5 s
    cmd = [*CLI, "demo", "--out", str(out), "--overwrite", "--processes", "1", "--wandb", "off",
           "--minutes", str(ctx.sizes.demo_minutes)]  # fmt: skip
    part.put("command", " ".join(["selfsup", *cmd[3:]]))
    proc = run_streaming(cmd, device_env(ctx.dev), part.deadline.left(), "  demo| " if ctx.echo else None)
    part.results.update(demo_figures(proc.lines, out))
    part.put("exit_code", proc.code)
    if proc.code is None:
        part.skipped.append("the rest of the demo (stopped at the part's time cap)")
    elif proc.code != 0:
        raise RuntimeError(f"selfsup demo exited with {proc.code}:\n{proc.tail()}")


def demo_figures(lines: list[tuple[float, str]], out: Path) -> dict:
    """Stage times from the demo's output; table and training figures from what it wrote."""
    stages, started = [], {}
    calibration = None
    for t, line in lines:
        if m := HEADER.match(line):
            started[m.group(3)] = round(t, 2)
        elif m := DONE.match(line):
            name = m.group(1)
            stages.append({"stage": name, "seconds": round(t - started.get(name, t), 2),
                           "printed_s": int(m.group(2))})  # fmt: skip
        elif m := CALIBRATION.search(line):
            calibration = {"img_per_s": int(m.group(1)), "steps": int(m.group(2)),
                           "batch": int(m.group(3))}  # fmt: skip
    table = [line for _, line in lines if line.startswith("|")]
    res: dict = {"stages": stages, "started_at_s": started, "calibration": calibration,
                 "table_md": "\n".join(table)}  # fmt: skip
    report = out / "run" / "eval" / "report.json"
    if report.is_file():
        import json

        res["table"] = json.loads(report.read_text()).get("models")
    rows = [r for r in metrics_rows(out / "run") if "img_per_s" in r]
    if rows:
        steady = rows[1:] or rows
        res["pretrain"] = {
            "steps": rows[-1]["step"], "final_loss": rows[-1]["loss"],
            "img_per_s_median": statistics.median(r["img_per_s"] for r in steady),
            "data_wait_mean": statistics.fmean(r["data_wait"] for r in steady),
        }  # fmt: skip
    return res


# ---- 2. views on the device vs PIL in DataLoader workers ---------------------------------------
def part_views(part: Part, ctx: Ctx) -> None:
    dev, sz = ctx.dev, ctx.sizes
    for size in sz.view_sizes:
        if not part.due(f"{size}px", 3.0):
            continue
        images = make_images(sz.view_images[size], size)
        batch = sz.view_batch
        views = build_views(recipe(size), DataInfo(3, size, MEAN, STD))
        x = torch.from_numpy(images[:batch]).permute(0, 3, 1, 2).contiguous().to(dev.torch)
        t = dev.time_ms(lambda x=x, views=views: views(x, 2), sz.view_reps)
        with SyncCounter(dev) as syncs:
            views(x, 2)
        with SyncCounter(dev) as sample_syncs:
            params = views.sample(2, batch, size, size, dev.torch)
        on_device = all(getattr(params, f.name).device.type == dev.type
                        for f in dataclasses.fields(params))  # fmt: skip
        res = {
            "batch": batch, "views_per_image": 2,
            "device_ms_per_batch": t["ms"], "device_source_img_s": 1000 * batch / t["ms"],
            "params_on_device": on_device, "host_syncs_per_batch": syncs.count,
            "host_syncs_in_sampling": sample_syncs.count, "sync_sites": syncs.where,
        }  # fmt: skip
        workers = min(4, ctx.cores)
        res["loader_to_device_img_s"], res["loader_workers"] = device_pipeline(images, views, batch, workers, dev), workers
        # a worker makes whole batches: smaller ones keep every core busy (4+ batches each)
        pil_batch = max(8, min(batch, len(images) // (4 * ctx.cores)))
        pil = DataLoader(PILViews(images, recipe(size)), batch_size=pil_batch,
                         num_workers=ctx.cores, shuffle=True)  # fmt: skip
        rate, worker_cpu, _ = run_loader(pil, lambda b: None)
        res.update(pil_workers=ctx.cores, pil_batch=pil_batch, pil_img_s=rate,
                   pil_worker_cpu_s_per_1k=worker_cpu,
                   device_vs_pil=res["loader_to_device_img_s"] / rate)  # fmt: skip
        part.put(f"{size}px", res)


def device_pipeline(images, views, batch: int, workers: int, dev: Device) -> float:
    """Source images/s: decode-only workers -> pinned uint8 batch -> device -> 2 views there."""
    loader = DataLoader(Decoded(images), batch_size=batch, num_workers=workers, shuffle=True,
                        pin_memory=dev.cuda, drop_last=True)  # fmt: skip
    t0, n = time.perf_counter(), 0
    for b in loader:
        views(b.to(dev.torch, non_blocking=True), 2)
        n += len(b)
    dev.sync()
    return n / (time.perf_counter() - t0)


# ---- 3. InfoNCE: chunked vs plain ----------------------------------------------------------------
def part_infonce(part: Part, ctx: Ctx) -> None:
    sz, dev = ctx.sizes, ctx.dev
    part.put("setup", {"dim": sz.infonce_dim, "chunk_rows": sz.infonce_chunk, "dtype": "fp32",
                       "logits": "2N x 2N", "temperature": 0.1})  # fmt: skip
    for n in sz.infonce_n:
        row = {}
        for mode, chunk in (("chunked", sz.infonce_chunk), ("plain", 0)):
            if not part.due(f"N={n} {mode}", 2.0):
                continue
            row[mode] = catch_oom(lambda n=n, chunk=chunk: infonce_once(n, chunk, ctx), dev)
        if all("loss" in row.get(m, {}) for m in ("chunked", "plain")):
            a, b = row["chunked"]["loss"], row["plain"]["loss"]
            row["loss_rel_diff"] = abs(a - b) / abs(b)
        part.put(f"N={n}", row)


def infonce_once(n: int, chunk: int, ctx: Ctx) -> dict:
    dev, d = ctx.dev, ctx.sizes.infonce_dim
    g = torch.Generator(device=dev.torch).manual_seed(0)
    z1 = torch.randn(n, d, device=dev.torch, generator=g).requires_grad_(True)
    z2 = torch.randn(n, d, device=dev.torch, generator=g).requires_grad_(True)
    out = {}

    def step() -> None:
        z1.grad = z2.grad = None
        loss = info_nce(z1, z2, 0.1, chunk=chunk).loss
        loss.backward()
        out["loss"] = loss

    base = dev.mem_reset()
    t = dev.time_ms(step, reps=1 if n >= 32768 else 3)
    peak = dev.mem_peak()
    return {"ms": t["ms"], "peak_mib": peak, "extra_peak_mib": peak - base,
            "loss": float(out["loss"].detach())}  # fmt: skip


# ---- 4. training step: full SimCLR vs bare backbone; the real loop's data wait --------------------
def part_train(part: Part, ctx: Ctx) -> None:
    sz = ctx.sizes
    for i, m in enumerate(sz.models):
        if part.due(f"{m.name} eager", 5.0):
            part.put(f"{m.name} eager", catch_oom(lambda m=m: step_figures(m, ctx, None), ctx.dev))
            ctx.dev.free()
        if i < sz.loop_models and part.due(f"{m.name} selfsup pretrain", 15.0):
            part.put(f"{m.name} selfsup pretrain", loop_figures(m, ctx, part))
    for m in sz.models[: sz.compile_models]:
        key = f"{m.name} torch.compile({sz.compile_backend})"
        if part.due(key, sz.compile_estimate_s.get(m.name, 0.0)):
            part.put(key, catch_oom(lambda m=m: step_figures(m, ctx, sz.compile_backend), ctx.dev))
            torch._dynamo.reset()
            ctx.dev.free()


def model_config(m: Model, shards: str = "", run_dir: str = "", extra: tuple[str, ...] = ()):
    overrides = [f"data.train={shards}", "data.test=", f"run_dir={run_dir or 'unused'}",
                 f"augment.size={m.size}", f"data.batch_size={m.batch}", "train.sync_bn=false",
                 "eval.every_epochs=0", "log.wandb=off", "log.progress=false",
                 "train.checkpoint_every=0", *m.overrides, *extra]  # fmt: skip
    return CONFIGS / m.config, overrides


def step_figures(m: Model, ctx: Ctx, backend: str | None) -> dict:
    """In this process, one GPU, a batch already on it: full SimCLR step (views, backbone, head,
    InfoNCE, backward, optimiser) vs the bare backbone forward+backward on the same views."""
    dev, reps = ctx.dev, ctx.sizes.step_reps
    path, overrides = model_config(m)
    cfg = load_config(path, overrides)
    info = DataInfo(3, m.size, MEAN, STD)
    torch.manual_seed(0)
    method = build_method(cfg, info).to(dev.torch, memory_format=torch.channels_last).train()
    opt = build_optimizer(cfg.optim, method, m.batch)
    images = torch.from_numpy(make_images(m.batch, m.size)).permute(0, 3, 1, 2).contiguous()
    images = images.to(dev.torch)
    with torch.no_grad():
        x = torch.cat(build_views(cfg.augment, info)(images, 2))  # the full step's view shapes
    res: dict = {"batch": m.batch, "size": m.size, "backbone": cfg.model.backbone,
                 "optimizer": cfg.optim.name, "precision": "bf16 autocast", "channels_last": True}
    if backend:
        method.backbone = torch.compile(method.backbone, backend=backend)
    backbone = method.backbone

    def full() -> None:
        bf16_step(method, opt, images, dev)

    def bare() -> None:
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            f = backbone(x)
        f.float().mean().backward()
        method.zero_grad(set_to_none=True)

    if backend:
        t0 = time.perf_counter()
        full()
        bare()
        dev.sync()
        res["compile_s"] = time.perf_counter() - t0
    base = dev.mem_reset()
    t_full = dev.time_ms(full, reps, warmup=2)
    res.update(full_ms=t_full["ms"], full_wall_ms=t_full["wall_ms"], full_peak_mib=dev.mem_peak(),
               resident_mib=base)  # fmt: skip
    dev.mem_reset()
    t_bare = dev.time_ms(bare, reps, warmup=2)
    res.update(bare_ms=t_bare["ms"], bare_peak_mib=dev.mem_peak())
    res["full_img_s"] = 1000 * m.batch / t_full["ms"]
    res["bare_img_s"] = 1000 * m.batch / t_bare["ms"]
    res["overhead_pct"] = 100 * (t_full["ms"] / t_bare["ms"] - 1)
    if not backend:  # where the eager step's time goes, and its host syncs
        views = build_views(cfg.augment, info)
        with torch.no_grad():
            res["views_ms"] = dev.time_ms(lambda: views(images, 2), reps)["ms"]
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            loss, _ = method(images)
        loss.backward()
        res["optimizer_ms"] = dev.time_ms(opt.step, reps)["ms"]
        opt.zero_grad(set_to_none=True)
        with SyncCounter(dev) as syncs:
            full()
        res["host_syncs_per_step"], res["sync_sites"] = syncs.count, syncs.where
    return res


def loop_figures(m: Model, ctx: Ctx, part: Part) -> dict:
    """A real `selfsup pretrain` run (its DataLoader, its loop) on synthetic shards: img/s and the
    fraction of time waiting for data, from its metrics.jsonl (first row = warm-up, ignored)."""
    shards = write_image_shards(ctx.tmp / f"shards-{m.size}px", m.shard_images, m.size)
    run_dir = ctx.tmp / f"run-{m.name}"
    path, overrides = model_config(m, str(shards), str(run_dir), (
        f"train.max_steps={m.warmup + m.steps}", f"train.log_every={m.warmup}"))
    cmd = [*CLI, "pretrain", "--config", str(path), *overrides]
    proc = run_streaming(cmd, device_env(ctx.dev), part.deadline.left())
    if proc.code != 0:
        raise RuntimeError(f"{m.name}: selfsup pretrain exited with {proc.code}:\n{proc.tail()}")
    rows = [r for r in metrics_rows(run_dir) if "img_per_s" in r][1:]
    if not rows:
        raise RuntimeError(f"{m.name}: no metrics rows after the warm-up in {run_dir}")
    images = m.batch * m.warmup  # per row
    seconds = [images / r["img_per_s"] for r in rows]
    return {
        "img_s": images * len(rows) / sum(seconds),
        "data_wait": sum(r["data_wait"] * s for r, s in zip(rows, seconds, strict=True)) / sum(seconds),
        "rows_img_s": [r["img_per_s"] for r in rows], "rows_data_wait": [r["data_wait"] for r in rows],
        "measured_steps": m.steps, "run_wall_s": proc.seconds, "batch": m.batch,
        "workers": load_config(path, overrides).data.workers,
        "command": " ".join(["selfsup", *cmd[3:]]),
    }  # fmt: skip


# ---- 5. determinism ----------------------------------------------------------------------------
def part_determinism(part: Part, ctx: Ctx) -> None:
    m, steps = ctx.sizes.models[0], ctx.sizes.determinism_steps
    shards = write_image_shards(ctx.tmp / f"shards-{m.size}px", m.shard_images, m.size)
    runs = [ctx.tmp / f"seed0-run{i}" for i in (1, 2)]

    def one(run_dir: Path):
        path, overrides = model_config(m, str(shards), str(run_dir),
                                       (f"train.max_steps={steps}", "train.log_every=1", "train.seed=0"))
        return run_streaming([*CLI, "pretrain", "--config", str(path), *overrides],
                             device_env(ctx.dev), part.deadline.left())

    with concurrent.futures.ThreadPoolExecutor(2) as pool:  # side by side: half the wall time
        procs = list(pool.map(one, runs))
    for p in procs:
        if p.code != 0:
            raise RuntimeError(f"selfsup pretrain exited with {p.code}:\n{p.tail()}")
    curves = [[r for r in metrics_rows(d) if "loss" in r] for d in runs]
    res: dict = {"model": m.name, "steps": steps, "batch": m.batch, "seed": 0}
    for key in ("loss", "grad_norm"):
        diff = [abs(a[key] - b[key]) for a, b in zip(*curves, strict=True)]
        res[f"{key}_abs_diff_per_step"] = diff
        res[f"{key}_max_abs_diff"] = max(diff)
        res[f"{key}_first_differing_step"] = next((i + 1 for i, d in enumerate(diff) if d), None)
    res["loss_run1"] = [r["loss"] for r in curves[0]]
    w1, w2 = (load_backbone(d).state_dict() for d in runs)
    res["final_backbone_max_abs_diff"] = max((w1[k].double() - w2[k].double()).abs().max().item()
                                             for k in w1 if w1[k].is_floating_point())  # fmt: skip
    res["identical"] = res["loss_max_abs_diff"] == 0 and res["final_backbone_max_abs_diff"] == 0
    part.put("two runs", res)


PARTS = {"demo": part_demo, "views": part_views, "infonce": part_infonce, "train": part_train,
         "determinism": part_determinism}  # fmt: skip
