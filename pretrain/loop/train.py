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
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import timedelta
from itertools import islice
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, broadcast_object_list, gather_object

from selfsup.config import Config
from selfsup.pretrain.hooks.base import HookContext, TrainHook
from selfsup.pretrain.loop.guard import FiniteGuard
from selfsup.pretrain.loop.runlog import RunLog
from selfsup.pretrain.loop.setup import (
    TrainingError,
    build_data,
    build_parts,
    checkpoint_state,
    restore,
    starts_fresh,
)
from selfsup.pretrain.methods import StepContext
from selfsup.pretrain.run.lock import RunLock, RunLockError
from selfsup.pretrain.run.rundir import (
    checkpoint_dir,
    rng_state,
    save_checkpoint,
    write_init_report,
    write_run_files,
)

__all__ = ["RunLockError", "TrainingError", "train"]


def train(cfg: Config, resume: str | None = None, hooks: Sequence[TrainHook] = (), break_lock: bool = False) -> Path:
    """Pretrain per ``cfg``; ``resume`` is None (fresh; refuses a run dir that has checkpoints),
    ``"auto"`` (latest checkpoint if any) or a checkpoint path. ``hooks`` are called after each
    epoch and at the end (``pretrain/hooks/base.py``). A run directory has one writer: a second one
    is a RunLockError (``break_lock``: take the lock whatever it says). Returns the run directory."""
    stop = StopFlag()  # first: a signal during start-up must not kill the process
    accelerator = make_accelerator(cfg)
    lock = hold_run_dir(cfg.run_dir, accelerator, break_lock)  # before anything is written there
    try:
        run = Trainer(cfg, resume, hooks, stop, accelerator)
        while run.pos.step < run.data.total_steps:
            batches = run.epoch_batches()
            while (result := run.optimiser_step(batches)) is not None:
                run.log_step(result)
                if result.stopping:
                    return run.stop_on_signal()
                run.periodic_checkpoint()
                if run.pos.step >= run.data.total_steps:
                    break
            run.end_epoch()
        return run.finish()
    finally:
        if lock is not None:
            lock.release()


def hold_run_dir(run_dir: str, accelerator: Accelerator, break_lock: bool) -> RunLock | None:
    """Rank 0 takes the run directory's lock (``pretrain/run/lock.py``); every rank learns whether
    it got it, so that a refused run stops on all ranks at once (RunLockError) instead of leaving
    the others waiting in their first collective."""
    lock, problem = None, None
    if accelerator.is_main_process:
        try:
            lock = RunLock.acquire(run_dir, break_lock=break_lock)
        except RunLockError as e:
            problem = str(e)
    if accelerator.num_processes > 1:
        problem = broadcast_object_list([problem], from_process=0)[0]
    if problem is not None:
        raise RunLockError(problem)
    return lock


class StopFlag:
    """Set by SIGUSR1/SIGTERM; checked (and agreed on by all ranks) once per step."""

    def __init__(self) -> None:
        self.signal: str | None = None
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame) -> None:
        self.signal = signal.Signals(signum).name


def cpu_runs_bf16() -> bool:
    """Whether oneDNN has bf16 kernels for this CPU (AVX-512 and up). Without them bf16 autocast
    is emulated: a SimCLR demo step took 24x as long as in fp32 on an AVX2-only AMD EPYC."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return False


def auto_precision(cuda: bool, cpu_bf16: bool) -> tuple[str, str]:
    """``train.precision=auto``: the precision and why."""
    if cuda:
        if torch.cuda.is_bf16_supported():
            return "bf16", "the GPU supports bf16"
        return "fp16", "the GPU has no bf16"
    if cpu_bf16:
        return "bf16", "this CPU has bf16 kernels (oneDNN)"
    return "fp32", "this CPU has no bf16 kernels (oneDNN needs AVX-512): bf16 would be emulated, ~24x slower"


def make_accelerator(cfg: Config) -> Accelerator:
    """Mixed precision per ``train.precision``; ``auto`` = bf16 where the device runs it natively."""
    precision, why = cfg.train.precision, ""
    if precision == "auto":
        precision, why = auto_precision(torch.cuda.is_available(), cpu_runs_bf16())
    timeout = InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.train.dist_timeout_s))
    accelerator = Accelerator(mixed_precision="no" if precision == "fp32" else precision, kwargs_handlers=[timeout])
    if why:
        accelerator.print(f"train.precision=auto: {precision} ({why})")
    return accelerator


@dataclass
class StepResult:
    """One optimiser step's outcome: the last micro-batch's loss and logs, whether every rank
    agreed to stop, and the time it ended."""

    loss: torch.Tensor
    logs: dict[str, torch.Tensor]
    stopping: bool
    ended: float


class Trainer:
    """The loop's state and its named steps; ``train()`` above is the order they run in."""

    def __init__(self, cfg: Config, resume: str | None, hooks: Sequence[TrainHook], stop: StopFlag,
                 accelerator: Accelerator):
        self.cfg, self.tc, self.hooks, self.stop = cfg, cfg.train, hooks, stop
        self.accelerator = acc = accelerator
        self.world, self.main = acc.num_processes, acc.is_main_process
        self.run_dir = Path(cfg.run_dir)
        self.data = build_data(cfg, acc)
        self.ckpt_dir = checkpoint_dir(self.run_dir)
        self.parts = build_parts(cfg, acc, self.data, fresh=starts_fresh(self.ckpt_dir, resume))
        self.method, self.model = self.parts.method, self.parts.model
        self.pos, state = restore(cfg, acc, self.parts, self.data, self.ckpt_dir, resume)
        if self.main:
            write_run_files(self.run_dir, cfg, self.data.info)
        self.log = RunLog(self.run_dir, cfg, self.main, self.data.total_steps, self.pos.step,
                          state.get("wandb_id") if state else None, state.get("metrics_rows") if state else None)
        if self.main and self.method.init_report is not None:  # the key report: init.json and W&B
            write_init_report(self.run_dir, self.method.init_report, self.log)
        self.step_ctx = StepContext(forward=self.model, backward=acc.backward,
                                    no_sync=lambda: acc.no_sync(self.model))  # fmt: skip
        self.guard = FiniteGuard(acc.device, check_grads=acc.scaler is None)  # fp16: the scaler's job
        self.max_norm = self.tc.grad_clip if self.tc.grad_clip > 0 else float("inf")
        self.nan_skips, self.grad_norm, self.epoch_short = 0, float("nan"), False
        self.t_last, self.wait, self.busy, self.images_seen = time.perf_counter(), 0.0, 0.0, 0
        self.model.train()

    # ---- the data of one epoch, from where the run stands in it
    def epoch_batches(self) -> Iterator[dict]:
        acc = self.tc.accumulate
        self.data.loader.set_epoch(self.pos.epoch, self.pos.batch_in_epoch * acc)
        remaining = (self.data.steps_per_epoch - self.pos.batch_in_epoch) * acc  # whole steps only
        # after an elastic resume the epoch's rest, re-split, may hold a step less than planned
        left = (len(self.data.loader) - self.data.loader.stream.start_batch) // acc * acc
        self.epoch_short = left < remaining
        return islice(self.data.loader, min(remaining, left))

    # ---- one optimiser step: train.accumulate micro-batches, then the update every rank agrees on
    def optimiser_step(self, batches: Iterator[dict]) -> StepResult | None:
        """None when the epoch has no whole step left."""
        acc, device = self.accelerator, self.accelerator.device
        for micro in range(1, self.tc.accumulate + 1):
            t_fetch = time.perf_counter()
            batch = next(batches, None)
            if batch is None:
                return None
            images = batch["images"].to(device, non_blocking=True)
            t_got = time.perf_counter()
            self.wait += t_got - t_fetch
            if micro == 1:  # what the step changes besides the weights, to undo a non-finite step
                self.guard.begin(self.method, self.data.loader)
            with nullcontext() if micro == self.tc.accumulate else acc.no_sync(self.model):
                if self.method.owns_backward:
                    loss, logs = self.method.train_step(images, self.step_ctx)
                else:
                    loss, logs = self.model(images)
                    acc.backward(loss / self.tc.accumulate)
            self.guard.loss(loss)  # every micro-batch; a device flag, no sync
            self.images_seen += images.shape[0] * self.world
        # every rank agrees on: all losses and the gradient norm finite everywhere, a stop signal anywhere
        norm = acc.clip_grad_norm_(self.model.parameters(), self.max_norm)
        finite, stopping = self.guard.agree(norm, self.stop.signal is not None, self.world, acc.reduce)
        self.update(finite, norm)
        now = time.perf_counter()
        self.busy += now - t_got
        self.log.advance()
        return StepResult(loss, logs, stopping, now)

    def update(self, finite: bool, norm: torch.Tensor) -> None:
        """The optimiser step when every loss and the gradient norm were finite; otherwise undo the
        step's side effects and stop or skip per ``train.nan_policy``. The schedule always moves."""
        tc, parts, pos = self.tc, self.parts, self.pos
        if not finite:
            self.guard.undo(self.method, self.data.loader, everything=tc.nan_policy == "stop")
        if finite:
            self.grad_norm = float(norm)
            parts.optimizer.step()
        elif tc.nan_policy == "stop":
            parts.optimizer.zero_grad(set_to_none=True)
            path = self.checkpoint("non-finite loss")
            raise TrainingError(
                f"non-finite loss at step {pos.step} (epoch {pos.epoch}, batch {pos.batch_in_epoch}) on at least "
                f"one rank (a micro-batch's loss or the gradient norm); stopped before updating. Checkpoint of "
                f"the state before this step: {path or self.ckpt_dir}. "
                f"Lower optim.base_lr, set train.grad_clip, or use train.nan_policy=skip."
            )
        else:
            self.nan_skips += 1
            self.grad_norm = float("nan")
            if self.nan_skips > tc.max_nan_skips:
                raise TrainingError(f"{self.nan_skips} steps with non-finite loss (> train.max_nan_skips)")
        parts.optimizer.zero_grad(set_to_none=True)
        parts.scheduler.step()
        pos.step += 1
        pos.batch_in_epoch += 1
        if finite:
            self.method.after_step(pos.step, self.data.total_steps)

    # ---- logging: every train.log_every steps, the method's numbers averaged over processes
    def log_step(self, r: StepResult) -> None:
        step = self.pos.step
        if step % self.tc.log_every and step != self.data.total_steps:
            return
        names = sorted({**r.logs, "loss": None})
        values = torch.stack([
            torch.as_tensor(r.loss if k == "loss" else r.logs[k], device=self.accelerator.device)
            .detach().float().reshape(()) for k in names
        ])  # fmt: skip
        if self.world > 1:
            values = self.accelerator.reduce(values, "mean")
        row = dict(zip(names, values.cpu().tolist(), strict=True))
        row.update(
            lr=self.parts.scheduler.get_last_lr()[0], epoch=self.pos.epoch,
            img_per_s=self.images_seen / max(r.ended - self.t_last, 1e-9),
            data_wait=self.wait / max(self.wait + self.busy, 1e-9),
            grad_norm=self.grad_norm, **self.data.loader.counters(), nan_skips=self.nan_skips,
        )  # fmt: skip
        self.log.log(step, row)
        self.t_last, self.wait, self.busy, self.images_seen = r.ended, 0.0, 0.0, 0

    # ---- checkpoints: every rank's RNG and loader states, written by rank 0
    def checkpoint(self, reason: str) -> Path | None:
        loader = self.data.loader
        rngs = gather_object([rng_state()]) if self.world > 1 else [rng_state()]
        loaders = gather_object([loader.state_dict()]) if self.world > 1 else [loader.state_dict()]
        path = None
        if self.main:
            state = checkpoint_state(self.cfg, self.accelerator, self.parts, self.pos, rngs, loaders,
                                     wandb_id=self.log.wandb_id, reason=reason, metrics_rows=self.log.rows)
            path = save_checkpoint(self.ckpt_dir, self.pos.step, state, keep=self.tc.keep_checkpoints)
        self.accelerator.wait_for_everyone()
        return path

    def periodic_checkpoint(self) -> None:
        every, step = self.tc.checkpoint_every, self.pos.step
        if every and step % every == 0 and step < self.data.total_steps:
            self.checkpoint("periodic")

    def stop_on_signal(self) -> Path:
        path = self.checkpoint(f"signal {self.stop.signal or 'on another rank'}")
        self.accelerator.print(f"stopping on signal at step {self.pos.step}; checkpoint {path or self.ckpt_dir}")
        self.log.close()
        return self.run_dir

    # ---- epoch end and run end: the hooks (pictures, periodic eval), the last checkpoint
    def hook_context(self) -> HookContext:
        return HookContext(self.method, self.pos.step, self.pos.epoch, self.data.total_steps,
                           self.accelerator.device, self.main, self.run_dir, self.log)  # fmt: skip

    def end_epoch(self) -> None:
        if self.pos.batch_in_epoch != self.data.steps_per_epoch and not (
                self.epoch_short and self.pos.step < self.data.total_steps):
            return  # the run ended inside the epoch (train.max_steps)
        self.pos.epoch += 1
        self.pos.batch_in_epoch = 0
        for hook in self.hooks:
            hook.on_epoch_end(self.hook_context())
        if self.hooks:
            self.accelerator.wait_for_everyone()

    def finish(self) -> Path:
        path = self.checkpoint("end")
        for hook in self.hooks:
            hook.on_end(self.hook_context())
        self.accelerator.print(f"done: {self.pos.step} steps; checkpoint {path or self.ckpt_dir}")
        self.log.close()
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()
        return self.run_dir
