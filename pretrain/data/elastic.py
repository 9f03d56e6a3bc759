"""Elastic resume of the data position: what an epoch has already consumed, whatever the layout.

A layout is (processes, workers, per-process micro-batch) over the epoch's sequence of samples
(the shards in their per-epoch order, ``stream.plan_epoch``). Within one layout the samples a rank's
worker has delivered after ``n`` of its batches are the first ``sum(batch_sizes[:n])`` positions of
its block in the order its seeded shuffle buffer gives them: a pure function of the plan, so the
set of positions consumed after ``k`` micro-batches of every rank can be recomputed from a
checkpoint without reading a shard. An elastic resume marks them done, and the new layout plans
over the positions still left (``remaining``): every sample of the epoch is still trained on once.
"""

from __future__ import annotations

import numpy as np
import torch


def to_segments(positions: np.ndarray, bounds: np.ndarray, order: list[int]) -> list[tuple[int, int, int]]:
    """Sorted epoch positions -> (shard, first sample, end sample) runs, in sequence order."""
    if len(positions) == 0:
        return []
    j = np.searchsorted(bounds, positions, side="right") - 1  # index into this epoch's shard order
    local = positions - bounds[j]
    breaks = np.flatnonzero((np.diff(positions) != 1) | (np.diff(j) != 0)) + 1
    segs = []
    for a, b in zip(np.r_[0, breaks], np.r_[breaks, len(positions)], strict=True):
        segs.append((int(order[j[a]]), int(local[a]), int(local[b - 1]) + 1))
    return segs


def consumed_mask(stream_cls, shardset, *, batch: int, world: int, workers: int, seed: int, epoch: int,
                  shuffle_buffer: int, remaining: np.ndarray | None, micro_batches: int) -> np.ndarray:
    """Bool mask over the epoch's positions delivered by every rank after ``micro_batches`` of
    each, under the given layout planning over ``remaining`` (None: the whole epoch)."""
    total = shardset.num_samples
    done = np.zeros(total, dtype=bool)
    for rank in range(world):
        s = stream_cls(shardset, batch, rank, world, workers, seed=seed, shuffle_buffer=shuffle_buffer)
        s.epoch, s.remaining = epoch, remaining
        plans, _ = s.plan()
        nw = max(workers, 1)
        for w, plan in enumerate(plans):
            n = len(range(w, micro_batches, nw))
            if n == 0:
                continue
            seq = np.concatenate([s.seq_positions(seg) for seg in plan.segments]) if plan.segments else np.zeros(0, int)
            order = list(s._shuffled(iter(seq.tolist()), s.sample_rng(w), len(seq)))
            done[np.asarray(order[: sum(plan.batch_sizes[:n])], dtype=np.int64)] = True
    return done


def pack(elastic: dict) -> dict:
    """Checkpoint form (weights_only-loadable): the mask as packed bits."""
    return {"epoch": int(elastic["epoch"]), "layout_start": int(elastic["layout_start"]),
            "done": torch.from_numpy(np.packbits(elastic["done"]))}  # fmt: skip


def unpack(state: dict, total: int) -> dict:
    done = np.unpackbits(np.asarray(state["done"], dtype=np.uint8))[:total].astype(bool)
    return {"epoch": int(state["epoch"]), "layout_start": int(state["layout_start"]), "done": done}
