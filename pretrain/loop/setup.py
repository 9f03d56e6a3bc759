"""The loop's set-up, in the order ``train()`` runs it: the data (every rank reads its own slice,
every rank runs the same number of steps), the model with its optimiser and schedule, then the
position to start from (fresh, or restored from a checkpoint) and the state a checkpoint holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from selfsup.config import Config, ConfigError
from selfsup.data_info import DataInfo
from selfsup.pretrain.build import build_method, data_info
from selfsup.pretrain.data.elastic import consumed_mask
from selfsup.pretrain.data.stream import ShardLoader, ShardSet, ShardStream
from selfsup.pretrain.distributed import convert_allreduce_batchnorm
from selfsup.pretrain.loop.optim import build_optimizer, build_scheduler
from selfsup.pretrain.methods import Method
from selfsup.pretrain.run.rundir import list_checkpoints, resume_state, set_rng_state


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
    init: dict | None = None  # where model.init's weights came from (path, sha256), kept by resumes


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


def build_parts(cfg: Config, accelerator: Accelerator, data: Data, fresh: bool = True) -> Parts:
    """The method with the same initial weights on every rank (``model.init``'s on a ``fresh``
    start: every rank reads the same file), its optimiser and schedule."""
    tc = cfg.train
    set_seed(tc.seed)
    model = build_method(cfg, data.info, init=fresh)  # a ValueError while building is a ConfigError
    if tc.sync_bn and accelerator.num_processes > 1:  # SyncBatchNorm needs CUDA; elsewhere our twin
        cuda = accelerator.device.type == "cuda"
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model) if cuda else convert_allreduce_batchnorm(model)
    if tc.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if tc.compile:
        compile_parts(model)
    optimizer = build_optimizer(cfg.optim, model, cfg.data.batch_size, model.no_weight_decay(),
                                model.param_groups_options())  # trainable parameters only
    scheduler = build_scheduler(optimizer, cfg.optim, data.total_steps)
    report = model.init_report
    if report is not None:
        for line in report.lines():
            accelerator.print(line)
    init = {"path": report.source, "sha256": report.sha256, "kind": report.kind} if report else None
    model, optimizer = accelerator.prepare(model, optimizer)
    return Parts(model, accelerator.unwrap_model(model), optimizer, scheduler, init)


def starts_fresh(ckpt_dir: Path, resume: str | None) -> bool:
    """Whether ``restore`` will start from zero: then ``model.init`` is loaded."""
    return resume is None or (resume == "auto" and not list_checkpoints(ckpt_dir)
                              and not (ckpt_dir / "latest").is_file())


def compile_parts(method: torch.nn.Module) -> list[str]:
    """``torch.compile`` every direct child of ``method`` that has parameters (backbone, heads,
    teacher), in place (``nn.Module.compile``): the modules, their parameters and state-dict names
    stay what they were, so checkpoints and resume do not change. Parameter-free children (the
    views, whose per-sample gathers and Kornia ops must not be compiled) stay eager. Returns the
    names of the compiled children."""
    names = []
    for name, child in method.named_children():
        if any(True for _ in child.parameters()):
            child.compile()
            names.append(name)
    return names


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
    elastic = _check_compatible(state, accelerator.num_processes, cfg)
    parts.method.load_state_dict(state["model"])
    parts.init = state.get("init")
    parts.optimizer.load_state_dict(state["optimizer"])
    parts.scheduler.load_state_dict(state["scheduler"])
    if accelerator.scaler is not None and state.get("scaler"):
        accelerator.scaler.load_state_dict(state["scaler"])
    pos = Position(state["step"], state["epoch"], state["batch_in_epoch"])
    if elastic:
        _restore_elastic(cfg, accelerator, data, state, pos)
        return pos, state
    set_rng_state(state["rng"][rank])
    if "loader" in state:  # corrupt/padded counters (checkpoints before they existed lack it)
        data.loader.load_state_dict(state["loader"][rank])
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
        "rng": rngs, "loader": loaders, "init": parts.init, **extra,
    }  # fmt: skip


def _restore_elastic(cfg: Config, accelerator: Accelerator, data: Data, state: dict, pos: Position) -> None:
    """Another layout (processes, workers, per-process batch): mark the positions of this epoch the
    checkpoint's layout had consumed (``data/elastic.py``), re-split the rest over the new ranks.
    Each rank's RNG is seeded afresh; the counters of unreadable samples go to rank 0."""
    rank, loader = accelerator.process_index, data.loader
    old = state["loader"][0]
    set_seed(cfg.train.seed + 7919 * (pos.step + 1) + rank, device_specific=False)
    loader.load_state_dict({**old, "workers": {}, "before": [
        sum(s["before"][i] + sum(v[i] for v in s["workers"].values()) for s in state["loader"]) if rank == 0 else 0
        for i in (0, 1)]})  # fmt: skip
    prior = loader.elastic if loader.elastic is not None and loader.elastic["epoch"] == pos.epoch else None
    old_micro = state["batch_in_epoch"] * state["accumulate"] - (prior["layout_start"] if prior else 0)
    done = consumed_mask(
        ShardStream, loader.stream.ss, batch=state["global_batch"] // (state["world_size"] * state["accumulate"]),
        world=state["world_size"], workers=state["workers"], seed=cfg.train.seed, epoch=pos.epoch,
        shuffle_buffer=cfg.data.shuffle_buffer, remaining=np.flatnonzero(~prior["done"]) if prior else None,
        micro_batches=old_micro,
    )  # fmt: skip
    if prior:
        done |= prior["done"]
    loader.elastic = {"epoch": pos.epoch, "done": done, "layout_start": pos.batch_in_epoch * cfg.train.accumulate}
    accelerator.print(
        f"elastic resume at step {pos.step} (epoch {pos.epoch}): checkpoint layout {state['world_size']} process(es) x "
        f"{state['workers']} worker(s), now {accelerator.num_processes} x {cfg.data.workers}; {int(done.sum())} samples "
        f"of this epoch already trained on, the other {int((~done).sum())} re-split over the new ranks. NOT bitwise: "
        "the rest of the run differs from an uninterrupted one (other sample order and augmentation draws)"
    )  # fmt: skip


def _check_compatible(state: dict, world: int, cfg: Config) -> bool:
    """The data position only means the same thing with the same world size, workers and batch;
    with ``train.resume_elastic`` a different layout (same global batch) resumes elastically (True)."""
    want = {"world_size": world, "workers": cfg.data.workers, "global_batch": cfg.data.batch_size,
            "accumulate": cfg.train.accumulate}  # fmt: skip
    diff = {k: (state.get(k), v) for k, v in want.items() if state.get(k) != v}
    if not diff:
        return False
    desc = ", ".join(f"{k}: checkpoint {a}, now {b}" for k, (a, b) in diff.items())
    if cfg.train.resume_elastic and "global_batch" not in diff and "loader" in state:
        return True
    if cfg.train.resume_elastic:
        raise TrainingError(f"cannot resume elastically ({desc}): the global batch data.batch_size must stay the same")
    raise TrainingError(
        f"cannot resume exactly with a different setup ({desc}); train.resume_elastic=true continues "
        "with the global sample position kept (not bitwise, see docs/reliability_elastic.md)"
    )
