"""Elastic resume (``train.resume_elastic``): the data position is the epoch's GLOBAL sample
position. The stream level is checked against real shards here (layout A for k batches, then the
rest re-split under layout B: every key of the epoch exactly once; the planted wrong variant —
taking the new layout's plan from the same step, as an exact resume would — repeats and misses
samples and must fail); tests/test_elastic_runs.py does it with killed training processes."""

from __future__ import annotations

from collections import Counter
from itertools import islice

import numpy as np
import pytest

from selfsup.pretrain.data.elastic import consumed_mask
from selfsup.pretrain.data.stream import ShardLoader, ShardSet, ShardStream, load_arrays

GLOBAL = 32


def _keys(ss: ShardSet, world: int, workers: int, epoch: int, start: int = 0, n: int | None = None,
          elastic: dict | None = None) -> list[str]:  # fmt: skip
    out = []
    for rank in range(world):
        loader = ShardLoader(ShardStream(ss, GLOBAL // world, rank, world, workers, seed=3, shuffle_buffer=100))
        loader.elastic = elastic
        loader._epoch = epoch
        loader.set_epoch(epoch, start)
        out += [k for b in islice(loader, n) for k in b["keys"]]
    return out


def _mask(ss: ShardSet, world: int, workers: int, epoch: int, k: int, remaining=None) -> np.ndarray:
    return consumed_mask(ShardStream, ss, batch=GLOBAL // world, world=world, workers=workers, seed=3, epoch=epoch,
                         shuffle_buffer=100, remaining=remaining, micro_batches=k)  # fmt: skip


@pytest.mark.parametrize(("a", "b"), [((2, 1), (1, 2)), ((1, 2), (2, 1)), ((2, 2), (4, 1))])
def test_rest_of_the_epoch_resplit_sees_every_sample_once(small_shards: str, a, b) -> None:
    ss = ShardSet.open(small_shards)
    everything = Counter(load_arrays(ss)[2])
    epoch, k = 1, 7
    first = _keys(ss, *a, epoch, n=k)
    done = _mask(ss, *a, epoch, k)
    assert done.sum() == len(first) == k * GLOBAL
    rest = _keys(ss, *b, epoch, start=5, elastic={"epoch": epoch, "done": done, "layout_start": 5})
    assert Counter(first + rest) == everything
    # a second change inside the same epoch: B for 4 more batches, then back to A
    k2 = 4
    part = _keys(ss, *b, epoch, start=5, n=k2, elastic={"epoch": epoch, "done": done, "layout_start": 5})
    done2 = done | _mask(ss, *b, epoch, k2, remaining=np.flatnonzero(~done))
    last = _keys(ss, *a, epoch, start=9, elastic={"epoch": epoch, "done": done2, "layout_start": 9})
    assert Counter(first + part + last) == everything
    # planted wrong variant: the new layout's own plan from step k, as an exact resume would take it
    wrong = _keys(ss, *b, epoch, start=k)
    assert Counter(first + wrong) != everything
