"""The loop's set-up, in the order ``train()`` runs it: the data (every rank reads its own slice,
every rank runs the same number of steps), the model with its optimiser and schedule, then the
position to start from (fresh, or restored from a checkpoint) and the state a checkpoint holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from selfsup.config import Config, ConfigError
from selfsup.data_info import DataInfo
from selfsup.pretrain.build import build_method, data_info
from selfsup.pretrain.data.stream import ShardLoader, ShardSet, ShardStream
from selfsup.pretrain.distributed import convert_allreduce_batchnorm
from selfsup.pretrain.loop.optim import build_optimizer, build_scheduler
from selfsup.pretrain.methods import Method
from selfsup.pretrain.run.rundir import resume_state, set_rng_state


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, incompatible resume, ...); the message says why."""


@dataclass
class Data:
    """This rank's stream of micro-batches and the run's length in optimiser steps."""

    info: DataInfo
    loader: ShardLoader
    steps_per_epoch: int
    total_steps: int


@dataclass
class Parts:
    """What is trained: ``model`` (wrapped for DDP by Accelerate), ``method`` (the same module
    unwrapped: the method contract), its optimiser and learning-rate schedule."""

    model: torch.nn.Module
    method: Method
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler


@dataclass
class Position:
    """Where the run stands: optimiser steps done, the epoch and the step inside it."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0


def build_data(cfg: Config, accelerator: Accelerator) -> Data:
    world, tc = accelerator.num_processes, cfg.train
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
        shards, cfg.data.batch_size // micro_div, accelerator.process_index, world, cfg.data.workers,
        seed=tc.seed, shuffle_buffer=cfg.data.shuffle_buffer, max_corrupt_fraction=cfg.data.max_corrupt_fraction,
    )  # fmt: skip
    loader = ShardLoader(stream, pin_memory=accelerator.device.type == "cuda")
    steps_per_epoch = len(loader) // tc.accumulate
    if steps_per_epoch == 0:
        raise ConfigError(
            f"data.batch_size={cfg.data.batch_size} is larger than the {shards.num_samples} samples of "
            f"{cfg.data.train}: not one step per epoch"
        )
    return Data(info, loader, steps_per_epoch, tc.max_steps or tc.epochs * steps_per_epoch)


def build_parts(cfg: Config, accelerator: Accelerator, data: Data) -> Parts:
    """The method with the same initial weights on every rank, its optimiser and schedule."""
    tc = cfg.train
    set_seed(tc.seed)
    model = build_method(cfg, data.info)  # a ValueError while building is a ConfigError
    if tc.sync_bn and accelerator.num_processes > 1:  # SyncBatchNorm needs CUDA; elsewhere our twin
        cuda = accelerator.device.type == "cuda"
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model) if cuda else convert_allreduce_batchnorm(model)
    if tc.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(cfg.optim, model, cfg.data.batch_size, model.no_weight_decay(),
                                model.param_groups_options())  # trainable parameters only
    scheduler = build_scheduler(optimizer, cfg.optim, data.total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    return Parts(model, accelerator.unwrap_model(model), optimizer, scheduler)


def restore(cfg: Config, accelerator: Accelerator, parts: Parts, data: Data, ckpt_dir: Path,
            resume: str | None) -> tuple[Position, dict | None]:
    """The position to start from and the checkpoint it came from (None: a fresh start, each rank
    then seeded differently for its own augmentations). Restores model, optimiser, schedule,
    scaler, this rank's RNG states and data-loader counters."""
    rank = accelerator.process_index
    found, state = resume_state(ckpt_dir, resume)  # newest that loads; loud fallback if latest is damaged
    if found is None:
        set_seed(cfg.train.seed + rank, device_specific=False)  # different augmentations per rank
        return Position(), None
    _check_compatible(state, accelerator.num_processes, cfg)
    parts.method.load_state_dict(state["model"])
    parts.optimizer.load_state_dict(state["optimizer"])
    parts.scheduler.load_state_dict(state["scheduler"])
    if accelerator.scaler is not None and state.get("scaler"):
        accelerator.scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"][rank])
    if "loader" in state:  # corrupt/padded counters (checkpoints before they existed lack it)
        data.loader.load_state_dict(state["loader"][rank])
    pos = Position(state["step"], state["epoch"], state["batch_in_epoch"])
    accelerator.print(f"resumed from {found} at step {pos.step} (epoch {pos.epoch}, batch {pos.batch_in_epoch})")
    return pos, state


def checkpoint_state(cfg: Config, accelerator: Accelerator, parts: Parts, pos: Position,
                     rngs: list, loaders: list, **extra) -> dict:
    """Everything a resume needs; ``rngs`` and ``loaders`` hold every rank's states, in rank order."""
    return {
        "model": parts.method.state_dict(),
        "optimizer": parts.optimizer.state_dict(),
        "scheduler": parts.scheduler.state_dict(),
        "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else {},
        "step": pos.step, "epoch": pos.epoch, "batch_in_epoch": pos.batch_in_epoch,
        "world_size": accelerator.num_processes, "workers": cfg.data.workers,
        "global_batch": cfg.data.batch_size, "accumulate": cfg.train.accumulate,
        "rng": rngs, "loader": loaders, **extra,
    }  # fmt: skip


def _check_compatible(state: dict, world: int, cfg: Config) -> None:
    """The data position only means the same thing with the same world size, workers and batch."""
    want = {"world_size": world, "workers": cfg.data.workers, "global_batch": cfg.data.batch_size,
            "accumulate": cfg.train.accumulate}  # fmt: skip
    diff = {k: (state.get(k), v) for k, v in want.items() if state.get(k) != v}
    if diff:
        desc = ", ".join(f"{k}: checkpoint {a}, now {b}" for k, (a, b) in diff.items())
        raise TrainingError(f"cannot resume exactly with a different setup ({desc})")
