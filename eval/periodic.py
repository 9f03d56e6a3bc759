"""kNN evaluation during pretraining (``eval.every_epochs``), split over the training processes:
a training hook that ``selfsup pretrain`` hands to the loop, so the loop knows nothing of eval.

Every rank reads only its own contiguous slice of the train and test shard sets (the evaluation
plan of ``selfsup.pretrain.data.stream``: each sample once, near-equal slices in rank order), extracts
the frozen features of that slice, and the slices are gathered back in rank order, so the matrices
are the whole sets in manifest order. Rank 0 then runs the kNN vote (FAISS; seconds even for
large sets). No rank loads a whole set or waits at a barrier while another extracts everything:
the only waits are the imbalance between slices and the vote. Every rank extracts with rank 0's
BatchNorm statistics (DDP leaves each rank its own between forwards), so the result is what the
checkpoint's weights give, and a run resumed at an epoch boundary logs the same number.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn

from selfsup.config import Config
from selfsup.eval.features import _gather_rows, extract_features_from
from selfsup.pretrain.data.stream import ShardSet, ShardStream
from selfsup.pretrain.distributed import get_rank, get_world_size
from selfsup.pretrain.hooks.base import HookContext, TrainHook


def slice_features(backbone: nn.Module, shards: ShardSet, mean: Sequence[float], std: Sequence[float],
                   batch_size: int, rank: int, world: int, max_corrupt: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Features and labels of this rank's slice of a shard set (possibly empty)."""
    stream = ShardStream(shards, batch_size, rank, world, workers=0, shuffle=False, drop_last=False,
                         max_corrupt_fraction=max_corrupt)  # fmt: skip
    labels: list[torch.Tensor] = []

    def images():
        for b in stream:
            labels.append(b["labels"])
            yield b["images"]

    if len(stream) == 0:
        return torch.zeros((0, backbone.feature_dim)), torch.zeros(0, dtype=torch.int64)
    feats = extract_features_from(backbone, images(), mean, std)
    return feats, torch.cat(labels)


def _gather(x: torch.Tensor) -> torch.Tensor:
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    return _gather_rows(x, dev)


@torch.no_grad()
def periodic_knn(backbone: nn.Module, train: str, test: str, mean: Sequence[float], std: Sequence[float],
                 batch_size: int, k: Sequence[int], temperature: float, on_bad_shard: str = "error",
                 max_corrupt: float = 0.0) -> dict[str, float]:  # fmt: skip
    """Every rank must call this; returns the kNN accuracies on rank 0 and {} elsewhere. The
    training set is read as training reads it (``on_bad_shard``, ``max_corrupt`` from data.*;
    undecodable samples padded), the test set strictly."""
    rank, world = get_rank(), get_world_size()
    # DDP keeps the weights equal on every rank but each rank's BatchNorm statistics are its own
    # since the last forward: every rank extracts with rank 0's (those the checkpoint holds), and
    # gets its own back afterwards
    own = [b.detach().clone() for b in backbone.buffers()] if world > 1 else []
    for b in backbone.buffers() if world > 1 else []:
        dist.broadcast(b.data, src=0)
    try:
        return _knn(backbone, train, test, mean, std, batch_size, k, temperature, on_bad_shard, max_corrupt, rank, world)
    finally:
        with torch.no_grad():
            for b, saved in zip(backbone.buffers() if world > 1 else [], own, strict=True):
                b.copy_(saved)


def _knn(backbone, train, test, mean, std, batch_size, k, temperature, on_bad_shard, max_corrupt, rank, world):
    from selfsup.eval.knn import knn_classify

    parts = []
    sets = ((ShardSet.open(train, on_bad_shard=on_bad_shard), max_corrupt), (ShardSet.open(test), 0.0))
    for (shards, corrupt), path in zip(sets, (train, test), strict=True):
        feats, labels = slice_features(backbone, shards, mean, std, batch_size, rank, world, corrupt)
        parts.append((feats, labels))
        print(f"selfsup: eval: rank {rank}/{world} extracted {feats.shape[0]} features of {path}", file=sys.stderr,
              flush=True)  # fmt: skip
    if world > 1:
        parts = [(_gather(f), _gather(y[:, None])[:, 0]) for f, y in parts]
    if rank != 0:
        return {}
    (f_train, y_train), (f_test, y_test) = parts
    res = knn_classify(f_train, y_train, f_test, y_test, k=tuple(k), temperature=temperature)
    return {**res, "samples": float(f_train.shape[0] + f_test.shape[0])}


class PeriodicKNN(TrainHook):
    """Every ``eval.every_epochs`` epochs: kNN top-1/top-5 of the current backbone's features on
    ``data.test`` against ``data.train``, logged as ``eval/knn_*`` at that step. Every rank
    extracts its slice (``periodic_knn``); rank 0 votes and logs."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg

    def on_epoch_end(self, ctx: HookContext) -> None:
        cfg = self.cfg
        if ctx.epoch % cfg.eval.every_epochs:
            return
        info = ctx.method.info
        res = periodic_knn(ctx.method.backbone, cfg.data.train, cfg.data.test, info.mean, info.std,
                           cfg.eval.batch_size, cfg.eval.knn_k, cfg.eval.knn_temperature,
                           cfg.data.on_bad_shard, cfg.data.max_corrupt_fraction)  # fmt: skip
        if ctx.is_main:
            ctx.log.log(ctx.step, {f"eval/{k}": v for k, v in res.items() if isinstance(v, (int, float))})


def periodic_hooks(cfg: Config) -> list[TrainHook]:
    """The periodic kNN hook when the config asks for it (``eval.every_epochs`` and ``data.test``)."""
    return [PeriodicKNN(cfg)] if cfg.eval.every_epochs and cfg.data.test else []
