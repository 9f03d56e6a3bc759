"""The training loop: one loop for every method, read top to bottom.

The process group comes from the environment (``accelerate launch``, ``torchrun``, ``srun``) via
Accelerate. Each optimiser step consumes ``data.batch_size`` images in total: every process takes
``batch_size / world`` of them, split further into ``train.accumulate`` micro-batches. The method
(SimCLR, MAE, DAE, ...) receives a uint8 batch on the device and returns ``(loss, logs)``; the
loop knows nothing else about it.

The loop calls only the method contract (``pretrain/methods/base.py``) and the hooks the
command hands in (``pretrain/hooks.py``); it imports nothing from eval.

Non-finite values: every micro-batch's loss and the step's gradient norm are checked on the
device, and the step's single host sync (the cross-rank agreement on "finite?" and "stop?")
decides; a bad step updates nothing (weights, optimiser, BatchNorm statistics all stay as before).

Stopping and resuming: SIGUSR1/SIGTERM (what SLURM sends before preemption or the time limit)
set a flag; at the end of the current step every rank agrees to stop, a checkpoint is written,
and the process exits with code 0. ``resume="auto"`` continues from ``checkpoints/latest`` with
the model, optimiser, scheduler, scaler, data position and every rank's RNG states restored, so
on CPU a resumed run ends bitwise equal to an uninterrupted one.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Sequence
from contextlib import nullcontext
from datetime import timedelta
from itertools import islice
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, gather_object, set_seed

from selfsup.config import Config, ConfigError
from selfsup.pretrain.build import build_method, data_info
from selfsup.pretrain.data.stream import ShardLoader, ShardSet, ShardStream
from selfsup.pretrain.hooks import HookContext, TrainHook
from selfsup.pretrain.methods import StepContext
from selfsup.pretrain.optim import build_optimizer, build_scheduler
from selfsup.pretrain.rundir import (
    CheckpointError,
    checkpoint_dir,
    latest_checkpoint,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
    write_run_files,
)
from selfsup.pretrain.runlog import RunLog


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, incompatible resume, ...); the message says why."""


class StopFlag:
    """Set by SIGUSR1/SIGTERM; checked (and agreed on by all ranks) once per step."""

    def __init__(self) -> None:
        self.signal: str | None = None
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame) -> None:
        self.signal = signal.Signals(signum).name


def make_accelerator(cfg: Config) -> Accelerator:
    """Mixed precision per ``train.precision``; ``auto`` = bf16 where the device supports it."""
    precision = cfg.train.precision
    if precision == "auto":
        cuda = torch.cuda.is_available()
        precision = "bf16" if (not cuda or torch.cuda.is_bf16_supported()) else "fp16"
    timeout = InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.train.dist_timeout_s))
    return Accelerator(mixed_precision="no" if precision == "fp32" else precision, kwargs_handlers=[timeout])


def train(cfg: Config, resume: str | None = None, hooks: Sequence[TrainHook] = ()) -> Path:
    """Pretrain per ``cfg``; ``resume`` is None (fresh; refuses a run dir that has checkpoints),
    ``"auto"`` (latest checkpoint if any) or a checkpoint path. ``hooks`` are called after each
    epoch and at the end (``pretrain/hooks.py``). Returns the run directory."""
    stop = StopFlag()  # first: a signal during start-up must not kill the process
    accelerator = make_accelerator(cfg)
    rank, world, main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    run_dir = Path(cfg.run_dir)
    tc = cfg.train

    # ---- data: every rank reads its own slice; every rank runs the same number of steps
    micro_div = world * tc.accumulate
    if cfg.data.batch_size % micro_div:
        raise ConfigError(
            f"data.batch_size={cfg.data.batch_size} must be divisible by processes x train.accumulate "
            f"= {world} x {tc.accumulate}"
        )
    shards = ShardSet.open(cfg.data.train)
    info = data_info(cfg, shards.channels, shards.image_size, shards.mean, shards.std)
    stream = ShardStream(
        shards, cfg.data.batch_size // micro_div, rank, world, cfg.data.workers, seed=tc.seed,
        shuffle_buffer=cfg.data.shuffle_buffer, max_corrupt_fraction=cfg.data.max_corrupt_fraction,
    )  # fmt: skip
    loader = ShardLoader(stream, pin_memory=accelerator.device.type == "cuda")
    steps_per_epoch = len(loader) // tc.accumulate
    if steps_per_epoch == 0:
        raise ConfigError(
            f"data.batch_size={cfg.data.batch_size} is larger than the {shards.num_samples} samples of "
            f"{cfg.data.train}: not one step per epoch"
        )
    total_steps = tc.max_steps or tc.epochs * steps_per_epoch

    # ---- model, optimiser, schedule
    set_seed(tc.seed)  # same initial weights on every rank
    model = build_method(cfg, info)  # a ValueError while building is a ConfigError
    if tc.sync_bn and accelerator.device.type != "cuda":
        raise ConfigError("train.sync_bn=true needs CUDA devices (SyncBatchNorm has no CPU kernel)")
    if tc.sync_bn and world > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if tc.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(cfg.optim, model, cfg.data.batch_size, model.no_weight_decay(),
                                model.param_groups_options())  # trainable parameters only
    scheduler = build_scheduler(optimizer, cfg.optim, total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    method = accelerator.unwrap_model(model)

    # ---- resume or start
    ckpt_dir = checkpoint_dir(run_dir)
    step = epoch = batch_in_epoch = 0
    wandb_id = None
    found = _find_resume(ckpt_dir, resume)
    if found is not None:
        state = load_checkpoint(found)
        _check_compatible(state, world, cfg)
        method.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if accelerator.scaler is not None and state.get("scaler"):
            accelerator.scaler.load_state_dict(state["scaler"])
        step, epoch, batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        wandb_id = state.get("wandb_id")
        set_rng_state(state["rng"][rank])
        accelerator.print(f"resumed from {found} at step {step} (epoch {epoch}, batch {batch_in_epoch})")
    else:
        set_seed(tc.seed + rank, device_specific=False)  # different augmentations per rank
    if main:
        write_run_files(run_dir, cfg, info)
    log = RunLog(run_dir, cfg, main, total_steps, step, wandb_id)
    step_ctx = StepContext(forward=model, backward=accelerator.backward,
                           no_sync=lambda: accelerator.no_sync(model))  # fmt: skip

    def hook_context() -> HookContext:
        return HookContext(method, step, epoch, total_steps, accelerator.device, main, run_dir, log)

    def checkpoint(reason: str) -> Path | None:
        rngs = gather_object([rng_state()]) if world > 1 else [rng_state()]
        path = None
        if main:
            state = {
                "model": method.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else {},
                "step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch,
                "world_size": world, "workers": cfg.data.workers,
                "global_batch": cfg.data.batch_size, "accumulate": tc.accumulate,
                "rng": rngs, "wandb_id": log.wandb_id, "reason": reason,
            }  # fmt: skip
            path = save_checkpoint(ckpt_dir, step, state, keep=tc.keep_checkpoints)
        accelerator.wait_for_everyone()
        return path

    # ---- the loop
    nan_skips = 0
    model.train()
    t_last = time.perf_counter()
    wait = busy = 0.0
    images_seen = 0
    max_norm = tc.grad_clip if tc.grad_clip > 0 else float("inf")
    while step < total_steps:
        loader.set_epoch(epoch, batch_in_epoch * tc.accumulate)
        remaining = (steps_per_epoch - batch_in_epoch) * tc.accumulate  # whole steps only
        micro = 0
        t_fetch = time.perf_counter()
        for batch in islice(loader, remaining):
            images = batch["images"].to(accelerator.device, non_blocking=True)
            t_got = time.perf_counter()
            wait += t_got - t_fetch
            micro += 1
            last_micro = micro == tc.accumulate
            if micro == 1:  # BatchNorm statistics before this step, to undo a non-finite forward
                buffers = [b.detach().clone() for b in method.buffers()]
                bad_loss = torch.zeros((), device=accelerator.device)
            if method.owns_backward:
                with nullcontext() if last_micro else accelerator.no_sync(model):
                    loss, logs = method.train_step(images, step_ctx)
            else:
                with nullcontext() if last_micro else accelerator.no_sync(model):
                    loss, logs = model(images)
                    accelerator.backward(loss / tc.accumulate)
            bad_loss += (~torch.isfinite(loss.detach())).float()  # every micro-batch, on the device
            images_seen += images.shape[0] * world
            if not last_micro:
                t_fetch = time.perf_counter()
                continue
            micro = 0

            grad_norm_t = accelerator.clip_grad_norm_(model.parameters(), max_norm)
            bad_grad = (~torch.isfinite(grad_norm_t)).float().to(bad_loss.device)
            signalled = torch.tensor(float(stop.signal is not None), device=bad_loss.device)
            # the step's one host sync: is everything finite on every rank, did anyone get a signal
            flags = torch.stack([bad_loss, bad_grad, signalled])
            flags = (accelerator.reduce(flags, "sum") if world > 1 else flags).cpu()
            finite = flags[0] == 0 and flags[1] == 0
            if finite:
                optimizer.step()
            else:
                optimizer.zero_grad(set_to_none=True)
                with torch.no_grad():
                    for b, saved in zip(method.buffers(), buffers, strict=True):
                        b.copy_(saved)
                if tc.nan_policy == "stop":
                    what = "loss" if flags[0] > 0 else "gradient norm"
                    path = checkpoint(f"non-finite {what}")
                    raise TrainingError(
                        f"non-finite {what} at step {step} (epoch {epoch}, batch "
                        f"{batch_in_epoch}) on at least one rank; stopped before updating. Checkpoint "
                        f"of the state before this step: {path or ckpt_dir}. Lower optim.base_lr, set "
                        f"train.grad_clip, or use train.nan_policy=skip."
                    )
                nan_skips += 1
                if nan_skips > tc.max_nan_skips:
                    raise TrainingError(f"{nan_skips} steps with non-finite loss (> train.max_nan_skips)")
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            step += 1
            batch_in_epoch += 1
            if finite:
                method.after_step(step, total_steps)
            now = time.perf_counter()
            busy += now - t_got
            log.advance()

            if step % tc.log_every == 0 or step == total_steps:
                # the method's numbers are per process: average them over all processes
                names = sorted({**logs, "loss": None})
                values = torch.stack([
                    torch.as_tensor(loss if k == "loss" else logs[k], device=accelerator.device)
                    .detach().float().reshape(()) for k in names
                ])  # fmt: skip
                if world > 1:
                    values = accelerator.reduce(values, "mean")
                row = dict(zip(names, values.cpu().tolist(), strict=True))
                row.update(
                    lr=scheduler.get_last_lr()[0], epoch=epoch,
                    img_per_s=images_seen / max(now - t_last, 1e-9), data_wait=wait / max(wait + busy, 1e-9),
                    grad_norm=float(grad_norm_t) if finite else float("nan"),
                    corrupt=loader.corrupt, padded=loader.padded, nan_skips=nan_skips,
                )  # fmt: skip
                log.log(step, row)
                t_last, wait, busy, images_seen = now, 0.0, 0.0, 0

            if flags[2] > 0:
                path = checkpoint(f"signal {stop.signal or 'on another rank'}")
                accelerator.print(f"stopping on signal at step {step}; checkpoint {path or ckpt_dir}")
                log.close()
                return run_dir
            if tc.checkpoint_every and step % tc.checkpoint_every == 0 and step < total_steps:
                checkpoint("periodic")
            if step >= total_steps:
                break
            t_fetch = time.perf_counter()
        if batch_in_epoch == steps_per_epoch:
            epoch += 1
            batch_in_epoch = 0
            for hook in hooks:
                hook.on_epoch_end(hook_context())
            if hooks:
                accelerator.wait_for_everyone()

    path = checkpoint("end")
    for hook in hooks:
        hook.on_end(hook_context())
    accelerator.print(f"done: {step} steps; checkpoint {path or ckpt_dir}")
    log.close()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return run_dir


def _find_resume(ckpt_dir: Path, resume: str | None) -> Path | None:
    if resume is None:
        if latest_checkpoint(ckpt_dir) is not None:
            raise CheckpointError(
                f"{ckpt_dir} already has checkpoints: pass --resume auto to continue, or choose a new run_dir"
            )
        return None
    if resume == "auto":
        return latest_checkpoint(ckpt_dir)
    return Path(resume)


def _check_compatible(state: dict, world: int, cfg: Config) -> None:
    """The data position only means the same thing with the same world size, workers and batch."""
    want = {"world_size": world, "workers": cfg.data.workers, "global_batch": cfg.data.batch_size,
            "accumulate": cfg.train.accumulate}  # fmt: skip
    diff = {k: (state.get(k), v) for k, v in want.items() if state.get(k) != v}
    if diff:
        desc = ", ".join(f"{k}: checkpoint {a}, now {b}" for k, (a, b) in diff.items())
        raise TrainingError(f"cannot resume exactly with a different setup ({desc})")
