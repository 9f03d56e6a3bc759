"""The training loop: one loop for every method, read top to bottom.

The process group comes from the environment (``accelerate launch``, ``torchrun``, ``srun``) via
Accelerate. Each optimiser step consumes ``data.batch_size`` images in total: every process takes
``batch_size / world`` of them, split further into ``train.accumulate`` micro-batches. The method
(SimCLR, MAE, DAE, ...) receives a uint8 batch on the device and returns ``(loss, logs)``; the
loop knows nothing else about it.

The loop calls only the method contract (``pretrain/methods/base.py``) and the hooks the
command hands in (``pretrain/hooks/base.py``); it imports nothing from eval.

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
from selfsup.pretrain.distributed import convert_allreduce_batchnorm
from selfsup.pretrain.hooks.base import HookContext, TrainHook
from selfsup.pretrain.loop.guard import FiniteGuard
from selfsup.pretrain.loop.optim import build_optimizer, build_scheduler
from selfsup.pretrain.loop.runlog import RunLog
from selfsup.pretrain.methods import StepContext
from selfsup.pretrain.run.rundir import (
    checkpoint_dir,
    resume_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
    write_run_files,
)


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
    epoch and at the end (``pretrain/hooks/base.py``). Returns the run directory."""
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
    shards = ShardSet.open(cfg.data.train, on_bad_shard=cfg.data.on_bad_shard)
    if cfg.eval.every_epochs and cfg.data.test and not shards.labelled:
        raise ConfigError(
            f"eval.every_epochs={cfg.eval.every_epochs} runs kNN with data.train as the labelled "
            f"database, but {cfg.data.train} is unlabelled: set eval.every_epochs=0 and evaluate "
            "afterwards with selfsup eval on labelled shards"
        )
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
    if tc.sync_bn and world > 1:  # torch's SyncBatchNorm needs CUDA; elsewhere our all-reduce twin
        cuda = accelerator.device.type == "cuda"
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model) if cuda else convert_allreduce_batchnorm(model)
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
    found, state = resume_state(ckpt_dir, resume)  # newest that loads; loud fallback if latest is damaged
    if found is not None:
        _check_compatible(state, world, cfg)
        method.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if accelerator.scaler is not None and state.get("scaler"):
            accelerator.scaler.load_state_dict(state["scaler"])
        step, epoch, batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        wandb_id = state.get("wandb_id")
        set_rng_state(state["rng"][rank])
        if "loader" in state:  # corrupt/padded counters (checkpoints before they existed lack it)
            loader.load_state_dict(state["loader"][rank])
        accelerator.print(f"resumed from {found} at step {step} (epoch {epoch}, batch {batch_in_epoch})")
    else:
        set_seed(tc.seed + rank, device_specific=False)  # different augmentations per rank
    if main:
        write_run_files(run_dir, cfg, info)
    log = RunLog(run_dir, cfg, main, total_steps, step, wandb_id, state.get("metrics_rows") if found else None)
    step_ctx = StepContext(forward=model, backward=accelerator.backward,
                           no_sync=lambda: accelerator.no_sync(model))  # fmt: skip

    def hook_context() -> HookContext:
        return HookContext(method, step, epoch, total_steps, accelerator.device, main, run_dir, log)

    def checkpoint(reason: str) -> Path | None:
        rngs = gather_object([rng_state()]) if world > 1 else [rng_state()]
        loaders = gather_object([loader.state_dict()]) if world > 1 else [loader.state_dict()]
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
                "rng": rngs, "loader": loaders, "wandb_id": log.wandb_id, "reason": reason, "metrics_rows": log.rows,
            }  # fmt: skip
            path = save_checkpoint(ckpt_dir, step, state, keep=tc.keep_checkpoints)
        accelerator.wait_for_everyone()
        return path

    # ---- the loop
    nan_skips = 0
    guard = FiniteGuard(accelerator.device, check_grads=accelerator.scaler is None)  # fp16: the scaler's job
    model.train()
    t_last = time.perf_counter()
    wait = busy = 0.0
    images_seen = 0
    max_norm = tc.grad_clip if tc.grad_clip > 0 else float("inf")
    grad_norm = float("nan")
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
            if micro == 1:  # what the step changes besides the weights, to undo a non-finite step
                guard.begin(method, loader)
            if method.owns_backward:
                with nullcontext() if last_micro else accelerator.no_sync(model):
                    loss, logs = method.train_step(images, step_ctx)
            else:
                with nullcontext() if last_micro else accelerator.no_sync(model):
                    loss, logs = model(images)
                    accelerator.backward(loss / tc.accumulate)
            guard.loss(loss)  # every micro-batch; a device flag, no sync
            images_seen += images.shape[0] * world
            if not last_micro:
                t_fetch = time.perf_counter()
                continue
            micro = 0

            # every rank agrees on: all losses and the gradient norm finite everywhere, a stop signal anywhere
            norm = accelerator.clip_grad_norm_(model.parameters(), max_norm)
            finite, stopping = guard.agree(norm, stop.signal is not None, world, accelerator.reduce)
            if not finite:
                guard.undo(method, loader, everything=tc.nan_policy == "stop")
            if finite:
                grad_norm = float(norm)
                optimizer.step()
            elif tc.nan_policy == "stop":
                optimizer.zero_grad(set_to_none=True)
                path = checkpoint("non-finite loss")
                raise TrainingError(
                    f"non-finite loss at step {step} (epoch {epoch}, batch {batch_in_epoch}) on at least one "
                    f"rank (a micro-batch's loss or the gradient norm); stopped before updating. Checkpoint of "
                    f"the state before this step: {path or ckpt_dir}. "
                    f"Lower optim.base_lr, set train.grad_clip, or use train.nan_policy=skip."
                )
            else:
                nan_skips += 1
                grad_norm = float("nan")
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
                    grad_norm=grad_norm, **loader.counters(), nan_skips=nan_skips,
                )  # fmt: skip
                log.log(step, row)
                t_last, wait, busy, images_seen = now, 0.0, 0.0, 0

            if stopping:
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


def _check_compatible(state: dict, world: int, cfg: Config) -> None:
    """The data position only means the same thing with the same world size, workers and batch."""
    want = {"world_size": world, "workers": cfg.data.workers, "global_batch": cfg.data.batch_size,
            "accumulate": cfg.train.accumulate}  # fmt: skip
    diff = {k: (state.get(k), v) for k, v in want.items() if state.get(k) != v}
    if diff:
        desc = ", ".join(f"{k}: checkpoint {a}, now {b}" for k, (a, b) in diff.items())
        raise TrainingError(f"cannot resume exactly with a different setup ({desc})")
