"""Stream a shard set to many processes and DataLoader workers: exact coverage, equal batch
counts, deterministic per-epoch shuffling, resumable position (for users: docs/data.md).

* Each epoch the shard order is permuted by ``(seed, epoch)``. The shards' samples, in that
  order, form one sequence of ``total`` samples (counts come from the manifest, so no process
  needs to read a tar to plan).
* Training (``drop_last=True``): every rank takes a contiguous slice of ``total // world``
  samples and yields ``(total // world) // batch`` full batches. The remainder (< world × batch +
  world samples) is **dropped for this epoch**; as the shard order changes every epoch, a
  different remainder is dropped each time. Every rank therefore runs the same number of steps and
  DDP never waits for a rank that ran dry.
* Evaluation (``drop_last=False``, no shuffle): ranks split the sequence into near-equal slices
  and the last batch may be short; each sample is read exactly once.
* Within a rank, batch ``i`` is built by worker ``i % num_workers`` from that worker's contiguous
  block of the rank's slice, matching the round-robin order in which the DataLoader collects
  batches, so the global batch sequence is a pure function of ``(seed, epoch, rank, world,
  workers)``. Samples are shuffled inside each worker with a buffer seeded the same way.
* Resume: ``set_epoch(epoch, start_batch=k)`` replays the same plan and discards the first ``k``
  batches without decoding them, so no sample is repeated or skipped within the epoch. Resuming
  needs the same world size and worker count (the checkpoint stores both and the trainer checks).
* Corrupt data: an undecodable sample, a sample with a missing field, or a sample lost in the
  unread tail of a truncated tar is skipped and counted (``corrupt``). Batch ``j`` of a worker is
  always made of the same ``batch_sizes[j]`` source positions, readable or not, so a resume point
  means the same samples however many were unreadable before it; the gap is filled with readable
  samples drawn (seeded per batch) from the worker's first ``POOL`` readable ones (``padded``).
  More than ``max_corrupt_fraction`` of a worker's block corrupt is an error. ``ShardLoader``'s
  ``state_dict()`` carries the counters through a checkpoint.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import chain, groupby, islice, repeat

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from selfsup.pretrain.data.elastic import pack, to_segments, unpack
from selfsup.pretrain.data.shardset import ShardError, ShardSet, rank_and_world  # noqa: F401 - re-exported
from selfsup.pretrain.data.shuffle_buffer import shuffle_buffer
from selfsup.pretrain.data.tar_reader import tar_samples

POOL = 256  # readable samples a worker keeps to pad batches with


# ----------------------------------------------------------------------------------------- plan
@dataclass(frozen=True)
class WorkerPlan:
    segments: tuple[tuple[int, int, int], ...]  # (shard index, first sample, end sample)
    batch_sizes: tuple[int, ...]  # sizes of this worker's batches, in its own order


def plan_epoch(
    counts: list[int],
    batch_size: int,
    rank: int,
    world: int,
    workers: int,
    seed: int,
    epoch: int,
    shuffle: bool = True,
    drop_last: bool = True,
    remaining: np.ndarray | None = None,
) -> tuple[list[WorkerPlan], int]:
    """Which samples each worker of ``rank`` reads this epoch; returns (plans, batches for rank).
    ``remaining``: sorted positions of the epoch's sequence still to read (an elastic resume,
    ``data/elastic.py``); they are split over ranks and workers the same way."""
    order = epoch_order(len(counts), seed, epoch, shuffle)
    total = sum(counts) if remaining is None else len(remaining)
    if drop_last:
        per_rank = total // world
        start = rank * per_rank
        n_batches = per_rank // batch_size
        sizes = [batch_size] * n_batches
    else:
        base, extra = divmod(total, world)
        start = rank * base + min(rank, extra)
        per_rank = base + (rank < extra)
        sizes = [batch_size] * (per_rank // batch_size) + ([per_rank % batch_size] if per_rank % batch_size else [])
        n_batches = len(sizes)
    # cumulative sample offsets of the shards in this epoch's order
    bounds = np.cumsum([0] + [counts[i] for i in order])
    plans = []
    offset = start
    for w in range(max(workers, 1)):
        mine = tuple(sizes[w :: max(workers, 1)])
        length = sum(mine)
        segs = []
        lo, hi = offset, offset + length
        if remaining is not None:
            plans.append(WorkerPlan(tuple(to_segments(remaining[lo:hi], bounds, order)), mine))
            offset = hi
            continue
        # the shards overlapping [lo, hi), by bisection (a walk over 10k shards x 8 workers took ~1.5 s)
        first = max(int(np.searchsorted(bounds, lo, side="right")) - 1, 0)
        last = min(int(np.searchsorted(bounds, hi, side="left")), len(order))
        for j in range(first, last):
            a, b = max(lo, bounds[j]), min(hi, bounds[j + 1])
            if a < b:
                segs.append((int(order[j]), int(a - bounds[j]), int(b - bounds[j])))
        plans.append(WorkerPlan(tuple(segs), mine))
        offset = hi
    return plans, n_batches


def epoch_order(n_shards: int, seed: int, epoch: int, shuffle: bool = True) -> list[int]:
    return list(np.random.default_rng([seed, epoch]).permutation(n_shards)) if shuffle else list(range(n_shards))


# --------------------------------------------------------------------------------------- stream
def _sample_seed(*parts: int) -> np.random.Generator:
    return np.random.default_rng(list(parts))


def _samples_or_error(url: str, errs: list[Exception]) -> Iterator[dict]:
    """The shard's samples (lean tar reader); a read error ends the shard and goes into ``errs``."""
    try:
        yield from tar_samples(url)
    except Exception as exn:  # noqa: BLE001 - truncated, corrupt or unreadable: counted by the caller
        errs.append(exn)


class ShardStream(IterableDataset):
    """Yields dict batches ``{"images": uint8 [B,C,H,W], "labels": int64 [B], "keys": [str],
    "corrupt": int, "padded": int, "worker": int}`` following ``plan_epoch``."""

    def __init__(
        self,
        shardset: ShardSet,
        batch_size: int,
        rank: int = 0,
        world: int = 1,
        workers: int = 0,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        shuffle_buffer: int = 2000,
        max_corrupt_fraction: float = 0.01,
    ) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {batch_size}")
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside world of {world}")
        self.ss = shardset
        self.batch_size, self.rank, self.world, self.workers = batch_size, rank, world, workers
        self.seed, self.shuffle, self.drop_last = seed, shuffle, drop_last
        self.shuffle_buffer, self.max_corrupt_fraction = shuffle_buffer, max_corrupt_fraction
        self.epoch, self.start_batch = 0, 0
        self.remaining: np.ndarray | None = None  # elastic resume: the positions left this epoch
        # per plan index: (corrupt, padded) this epoch before start_batch (from a checkpoint)
        self.start_counts: dict[int, tuple[int, int]] = {}

    def plan(self) -> tuple[list[WorkerPlan], int]:
        return plan_epoch(
            self.ss.counts, self.batch_size, self.rank, self.world, self.workers,
            self.seed, self.epoch, self.shuffle, self.drop_last, self.remaining,
        )  # fmt: skip

    def sample_rng(self, wid: int) -> np.random.Generator:
        return _sample_seed(self.seed, self.epoch, self.rank, wid)

    def seq_positions(self, seg: tuple[int, int, int]) -> np.ndarray:
        """A segment's positions in this epoch's sequence."""
        order = epoch_order(len(self.ss.counts), self.seed, self.epoch, self.shuffle)
        start = sum(self.ss.counts[i] for i in order[: order.index(seg[0])])
        return np.arange(start + seg[1], start + seg[2])

    def __len__(self) -> int:
        return self.plan()[1]

    def _raw(self, segments, errors: list[str]) -> Iterator[dict | None]:
        """Raw samples of the worker's segments, one per source position. The unread tail of a
        truncated or unreadable tar yields ``None`` per missing sample, so every later sample keeps
        its position (and its batch) whatever was lost before it."""
        # consecutive segments of one shard (an elastic resume's scattered positions): one pass
        for shard, group in groupby(segments, key=lambda seg: seg[0]):
            runs = [(lo, hi) for _, lo, hi in group]
            want = sum(hi - lo for lo, hi in runs)
            got = 0
            errs: list[Exception] = []
            src = _samples_or_error(self.ss.urls[shard], errs)
            r = 0
            for i, sample in enumerate(src):
                while r < len(runs) and i >= runs[r][1]:
                    r += 1
                if r == len(runs):
                    break
                if i >= runs[r][0]:
                    got += 1
                    yield sample
            if got < want:
                errors.append(f"{self.ss.urls[shard]}: {errs[:1] or 'short'}")
                yield from [None] * (want - got)

    def _shuffled(self, it: Iterator, rng: np.random.Generator, n: int) -> Iterator:
        """``it`` (``n`` items) through the shuffle buffer (``data/shuffle_buffer.py``), or as it is."""
        if not self.shuffle or self.shuffle_buffer <= 1:
            return it
        return shuffle_buffer(it, rng, self.shuffle_buffer, n)

    def _decode(self, raw: dict | None, out: np.ndarray | None = None) -> tuple[np.ndarray, int, str] | None:
        if raw is None:
            return None
        try:
            return self.ss.decode(raw, out)
        except Exception:  # noqa: BLE001 - any malformed sample is skipped and counted (its slot reused)
            return None

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        workers = max(self.workers, 1)
        # The DataLoader always asks its worker 0 first; after a resume at batch k the next batch
        # belongs to plan k % workers, so DataLoader worker d plays plan (d + k) % workers.
        wid = ((info.id if info is not None else 0) + self.start_batch) % workers
        plans, _ = self.plan()
        if wid >= len(plans):  # more DataLoader workers than planned: nothing for this one
            return
        plan = plans[wid]
        block = sum(plan.batch_sizes)
        # Batch j of this worker is made of exactly batch_sizes[j] source positions, readable or
        # not, so the batches delivered before the resume point span a known number of positions.
        skip = len(range(wid, self.start_batch, workers))
        skip_positions = sum(plan.batch_sizes[:skip])
        corrupt, padded = self.start_counts.get(wid, (0, 0))
        errors: list[str] = []
        source = self._shuffled(self._raw(plan.segments, errors), self.sample_rng(wid), block)
        # every position of the block, even if the tars hold fewer samples than the manifest says
        positions = islice(chain(source, repeat(None)), block)
        pool: list[tuple[np.ndarray, int, str]] = []  # the block's first readable samples: padding
        for _ in range(skip_positions):  # replay to the resume point, decoding only for the pool
            raw = next(positions)
            if len(pool) < POOL and (item := self._decode(raw)) is not None:
                pool.append(item)
        for j in range(skip, len(plan.batch_sizes)):
            batch: list[tuple[np.ndarray, int, str]] = []
            pixels = self.ss.batch_slots(plan.batch_sizes[j])  # planar sets decode into their slots
            for raw in islice(positions, plan.batch_sizes[j]):
                item = self._decode(raw, None if pixels is None else pixels[len(batch)])
                if item is None:
                    corrupt += 1
                    continue
                batch.append(item)
                if len(pool) < POOL:  # its own copy of a slot: the batch's pixels leave with it
                    pool.append(item if pixels is None else (item[0].copy(), *item[1:]))
            self._check_corrupt(corrupt, block, errors)
            missing = plan.batch_sizes[j] - len(batch)
            if missing:  # fill the gap with earlier readable samples, drawn per batch (replay-safe)
                if not pool:
                    raise ShardError(f"worker {wid}: no readable sample in its first batches; {errors[:3]}")
                pick = _sample_seed(self.seed, self.epoch, self.rank, wid, 1, j).integers(len(pool), size=missing)
                batch.extend(pool[int(i)] for i in pick)
                if pixels is not None:
                    pixels[-missing:] = np.stack([item[0] for item in batch[-missing:]])
                padded += missing
            yield self._collate(pixels, batch, (corrupt, padded), wid)

    def _check_corrupt(self, corrupt: int, block: int, errors: list[str]) -> None:
        if block and corrupt / block > self.max_corrupt_fraction:
            raise ShardError(
                f"{corrupt} of {block} samples unreadable in this worker's shards "
                f"(> data.max_corrupt_fraction={self.max_corrupt_fraction}); first problems: "
                f"{errors[:3] or ['undecodable samples']}"
            )

    @staticmethod
    def _collate(pixels: np.ndarray | None, items: list, counts: tuple[int, int], wid: int) -> dict:
        return {
            "images": torch.from_numpy(np.stack([i[0] for i in items]) if pixels is None else pixels),
            "labels": torch.tensor([i[1] for i in items], dtype=torch.int64),
            "keys": [i[2] for i in items],
            "corrupt": counts[0],
            "padded": counts[1],
            "worker": wid,
        }


def _ignore_stop_signals(_worker_id: int) -> None:
    """DataLoader workers leave SIGTERM/SIGUSR1 to the trainer: SLURM and torchrun signal every
    process of a job, and a worker dying of the signal would crash the trainer ("DataLoader worker
    is killed by signal") instead of letting it checkpoint and stop, or report a lost rank. A
    worker still ends with its trainer (it watches its parent)."""
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


class ShardLoader:
    """A DataLoader over ``ShardStream`` for one rank; ``len()`` is the same on every rank.

    Use ``set_epoch(epoch, start_batch)`` before iterating. ``corrupt``/``padded`` count the
    unreadable samples skipped and the padding drawn so far in this run (all epochs, all workers of
    this rank). ``state_dict()`` after a batch, ``load_state_dict()`` before ``set_epoch`` on
    resume: the counters then continue as if the run had not stopped.
    """

    def __init__(self, stream: ShardStream, pin_memory: bool = False) -> None:
        self.stream = stream
        self.loader = DataLoader(
            stream,
            batch_size=None,
            num_workers=stream.workers,
            pin_memory=pin_memory,
            persistent_workers=False,
            prefetch_factor=4 if stream.workers > 0 else None,
            # its own generator: otherwise every new iterator draws a seed from the global torch
            # RNG, which the augmentations use too, and a resumed run would draw different views
            generator=torch.Generator().manual_seed(stream.seed),
            worker_init_fn=_ignore_stop_signals,
        )
        self._epoch = 0
        self._before = (0, 0)  # totals of the epochs before self._epoch
        self._workers: dict[int, tuple[int, int]] = {}  # this epoch, per plan index
        self._workers_before: dict[int, tuple[int, int]] = {}
        self.elastic: dict | None = None  # {"epoch", "done" (bool mask), "layout_start"}: data/elastic.py

    @property
    def corrupt(self) -> int:
        return self._before[0] + sum(c for c, _ in self._workers.values())

    @property
    def padded(self) -> int:
        return self._before[1] + sum(p for _, p in self._workers.values())

    def counters(self) -> dict[str, int]:
        """What the trainer logs: unreadable samples and padding so far, summed over all ranks
        when a process group is up (a collective: every rank calls it at the same step), and the
        shards left out at open (the same on every rank)."""
        counts = torch.tensor([self.corrupt, self.padded], dtype=torch.int64)
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
            counts = counts.to(dev)
            dist.all_reduce(counts)
        corrupt, padded = counts.tolist()
        return {"corrupt": corrupt, "padded": padded, "skipped_shards": len(self.stream.ss.skipped)}

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        if epoch != self._epoch:
            self._before, self._workers, self._epoch = (self.corrupt, self.padded), {}, epoch
            self._workers_before = {}
        el = self.elastic if self.elastic is not None and self.elastic["epoch"] == epoch else None
        self.stream.remaining = np.flatnonzero(~el["done"]) if el else None
        self.stream.epoch, self.stream.start_batch = epoch, start_batch - (el["layout_start"] if el else 0)
        self.stream.start_counts = dict(self._workers)

    def state_dict(self, before_last_batch: bool = False) -> dict:
        """Plain values (``torch.load(weights_only=True)`` reads them back); ``before_last_batch``:
        as it was before the batch last yielded (the trainer's state before a step it undoes)."""
        workers = self._workers_before if before_last_batch else self._workers
        return {"epoch": self._epoch, "before": list(self._before),
                "workers": {int(w): list(v) for w, v in workers.items()},
                "num_samples": self.stream.ss.num_samples,
                "skipped": [s["file"] for s in self.stream.ss.skipped],
                **({"elastic": pack(self.elastic)} if self.elastic and self.elastic["epoch"] == self._epoch else {})}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        now = [s["file"] for s in self.stream.ss.skipped]
        if state.get("skipped", []) != now or state.get("num_samples", self.stream.ss.num_samples) != self.stream.ss.num_samples:
            raise ShardError(
                f"the shard set changed since the checkpoint ({state.get('num_samples')} samples, skipped "
                f"{state.get('skipped', [])}; now {self.stream.ss.num_samples}, skipped {now}): the data "
                "position would not mean the same samples"
            )
        self._epoch = int(state["epoch"])
        self._before = tuple(int(v) for v in state["before"])
        self._workers = {int(w): (int(c), int(p)) for w, (c, p) in state["workers"].items()}
        self._workers_before = dict(self._workers)
        self.elastic = unpack(state["elastic"], self.stream.ss.num_samples) if "elastic" in state else None

    def __len__(self) -> int:
        return len(self.stream)

    def __iter__(self) -> Iterator[dict]:
        for batch in self.loader:
            self._workers_before = dict(self._workers)
            self._workers[batch["worker"]] = (batch["corrupt"], batch["padded"])
            yield batch


def load_arrays(shardset: ShardSet, batch_size: int = 4096) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """The whole set in memory, in manifest order: (uint8 [N,C,H,W], int64 [N], keys)."""
    stream = ShardStream(shardset, batch_size, shuffle=False, drop_last=False, max_corrupt_fraction=0.0)
    images, labels, keys = [], [], []
    for b in stream:
        images.append(b["images"])
        labels.append(b["labels"])
        keys.extend(b["keys"])
    return torch.cat(images), torch.cat(labels), keys

