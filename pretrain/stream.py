"""Stream a shard set to many processes and DataLoader workers: exact coverage, equal batch
counts, deterministic per-epoch shuffling, resumable position.

The rule (documented for users in the README):

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
* Corrupt data: an undecodable sample, a sample with a missing field, or the unread tail of a
  truncated tar is skipped and counted; to keep the batch count, the worker fills the gap with a
  random earlier good sample (counted as ``padded``). More than ``max_corrupt_fraction`` of a
  worker's block corrupt is an error.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from selfsup.pretrain.shards import FORMAT, MANIFEST

_REQUIRED = ("format", "encoding", "extension", "image_size", "channels", "classes", "num_samples", "shards")


class ShardError(ValueError):
    """A shard set is missing, empty, inconsistent with its manifest, or too corrupt to use."""


def _is_url(path: str) -> bool:
    return "://" in path or path.startswith("pipe:")


class ShardSet:
    """A verified shard set: ``ShardSet.open(folder or URL prefix)``."""

    def __init__(self, base: str, manifest: dict) -> None:
        self.base = base
        self.manifest = manifest
        self.shards: list[dict] = manifest["shards"]
        self.urls = [f"{base.rstrip('/')}/{s['file']}" for s in self.shards]
        self.counts = [int(s["num_samples"]) for s in self.shards]
        self.num_samples = int(manifest["num_samples"])
        self.classes: list[str] = list(manifest["classes"])
        self.channels = int(manifest["channels"])
        self.height, self.width = (int(v) for v in manifest["image_size"])
        self.extension: str = manifest["extension"]
        self.mean: list[float] = list(manifest.get("mean") or [0.5] * self.channels)
        self.std: list[float] = list(manifest.get("std") or [0.25] * self.channels)

    @property
    def image_size(self) -> int:
        if self.height != self.width:
            raise ShardError(f"{self.base}: images are {self.height}x{self.width}; models need square images")
        return self.height

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, self.height, self.width)

    @classmethod
    def open(cls, path: str | Path, verify_hashes: bool = False) -> ShardSet:
        """Read and check the manifest; for local sets also check every shard file exists with the
        recorded size (and sha256 when ``verify_hashes``)."""
        path = str(path)
        if path.endswith(MANIFEST):
            path = path[: -len(MANIFEST)].rstrip("/") or "."
        if _is_url(path):
            with wds.gopen(f"{path.rstrip('/')}/{MANIFEST}", "rb") as f:
                manifest = json.load(f)
        else:
            folder = Path(path)
            if not folder.exists():
                raise ShardError(f"shard set not found: {folder}")
            mpath = folder / MANIFEST
            if not mpath.is_file():
                raise ShardError(f"{folder} has no {MANIFEST} (write shards with 'selfsup shards')")
            try:
                manifest = json.loads(mpath.read_text())
            except json.JSONDecodeError as e:
                raise ShardError(f"{mpath} is not valid JSON: {e}") from e
        missing = [k for k in _REQUIRED if k not in manifest]
        if missing:
            raise ShardError(f"{path}/{MANIFEST} lacks {', '.join(missing)}")
        if manifest["format"] != FORMAT:
            raise ShardError(f"{path}/{MANIFEST}: format {manifest['format']!r}, expected {FORMAT!r}")
        counts = [int(s["num_samples"]) for s in manifest["shards"]]
        if not counts or manifest["num_samples"] <= 0:
            raise ShardError(f"{path}: the shard set is empty")
        if sum(counts) != manifest["num_samples"]:
            raise ShardError(f"{path}/{MANIFEST}: shards hold {sum(counts)} samples, total says {manifest['num_samples']}")
        shardset = cls(path, manifest)
        if not _is_url(path):
            shardset._check_files(verify_hashes)
        return shardset

    def _check_files(self, verify_hashes: bool) -> None:
        from selfsup.pretrain.shards import _sha256

        for shard, url in zip(self.shards, self.urls, strict=True):
            p = Path(url)
            if not p.is_file():
                raise ShardError(f"shard listed in the manifest is missing: {p}")
            if "bytes" in shard and p.stat().st_size != shard["bytes"]:
                raise ShardError(
                    f"{p}: {p.stat().st_size} bytes on disk, manifest says {shard['bytes']} "
                    "(truncated or replaced?)"
                )
            if verify_hashes and shard.get("sha256") and _sha256(p) != shard["sha256"]:
                raise ShardError(f"{p}: sha256 differs from the manifest")

    def decode(self, sample: dict) -> tuple[np.ndarray, int, str]:
        """Raw tar sample -> (uint8 [C, H, W], label, key). Raises on anything malformed."""
        payload = sample[self.extension]
        if self.extension == "u8":
            img = np.frombuffer(payload, dtype=np.uint8)
            if img.size != self.channels * self.height * self.width:
                raise ValueError(f"raw payload of {img.size} bytes, expected {self.channels * self.height * self.width}")
            img = img.reshape(self.height, self.width, self.channels)
        else:
            with Image.open(io.BytesIO(payload)) as im:
                img = np.asarray(im.convert("L" if self.channels == 1 else "RGB"), dtype=np.uint8)
            if img.ndim == 2:
                img = img[..., None]
            if img.shape != (self.height, self.width, self.channels):
                raise ValueError(f"image of shape {img.shape}, manifest says {(self.height, self.width, self.channels)}")
        return img.transpose(2, 0, 1), int(sample["cls"]), sample["__key__"]


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
) -> tuple[list[WorkerPlan], int]:
    """Which samples each worker of ``rank`` reads this epoch; returns (plans, batches for rank)."""
    order = list(range(len(counts)))
    if shuffle:
        order = list(np.random.default_rng([seed, epoch]).permutation(len(counts)))
    total = sum(counts)
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
        for j, shard in enumerate(order):
            a, b = max(lo, bounds[j]), min(hi, bounds[j + 1])
            if a < b:
                segs.append((int(shard), int(a - bounds[j]), int(b - bounds[j])))
        plans.append(WorkerPlan(tuple(segs), mine))
        offset = hi
    return plans, n_batches


# --------------------------------------------------------------------------------------- stream
def _sample_seed(*parts: int) -> np.random.Generator:
    return np.random.default_rng(list(parts))


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

    def plan(self) -> tuple[list[WorkerPlan], int]:
        return plan_epoch(
            self.ss.counts, self.batch_size, self.rank, self.world, self.workers,
            self.seed, self.epoch, self.shuffle, self.drop_last,
        )  # fmt: skip

    def __len__(self) -> int:
        return self.plan()[1]

    def _raw(self, segments, counter: dict) -> Iterator[dict]:
        """Raw samples of the worker's segments; a truncated/unreadable tar counts its missing tail."""
        for shard, lo, hi in segments:
            got = 0
            errors: list[Exception] = []
            src = wds.tariterators.tarfile_samples(
                [{"url": self.ss.urls[shard]}], handler=lambda exn, errors=errors: errors.append(exn) or True
            )
            for i, sample in enumerate(src):
                if i >= hi:
                    break
                if i >= lo:
                    got += 1
                    yield sample
            counter["corrupt"] += (hi - lo) - got
            if got < hi - lo:
                counter.setdefault("errors", []).append(f"{self.ss.urls[shard]}: {errors[:1] or 'short'}")

    def _shuffled(self, it: Iterator[dict], rng: np.random.Generator) -> Iterator[dict]:
        if not self.shuffle or self.shuffle_buffer <= 1:
            yield from it
            return
        buf: list[dict] = []
        for s in it:
            if len(buf) < self.shuffle_buffer:
                buf.append(s)
                continue
            j = int(rng.integers(len(buf)))
            buf[j], s = s, buf[j]
            yield s
        rng.shuffle(buf)
        yield from buf

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        # The DataLoader always asks its worker 0 first; after a resume at batch k the next batch
        # belongs to plan k % workers, so DataLoader worker d plays plan (d + k) % workers.
        wid = ((info.id if info is not None else 0) + self.start_batch) % max(self.workers, 1)
        plans, _ = self.plan()
        if wid >= len(plans):  # more DataLoader workers than planned: nothing for this one
            return
        plan = plans[wid]
        rng = _sample_seed(self.seed, self.epoch, self.rank, wid)
        pad_rng = _sample_seed(self.seed, self.epoch, self.rank, wid, 1)  # separate: replay-safe
        counter = {"corrupt": 0, "padded": 0}
        block = sum(plan.batch_sizes)
        # batches this worker already delivered before the resume point
        skip = len(range(wid, self.start_batch, max(self.workers, 1)))
        skip_samples = sum(plan.batch_sizes[:skip])
        stream = self._shuffled(self._raw(plan.segments, counter), rng)
        pool: list[tuple[np.ndarray, int, str]] = []
        emitted = 0
        batch: list[tuple[np.ndarray, int, str]] = []
        sizes = iter(plan.batch_sizes[skip:])
        want = next(sizes, 0)
        for raw in stream:
            if emitted < skip_samples:  # replaying up to the resume point: no decoding
                emitted += 1
                continue
            try:
                item = self.ss.decode(raw)
            except Exception:  # noqa: BLE001 - any malformed sample is skipped and counted
                counter["corrupt"] += 1
                continue
            if len(pool) < 256:
                pool.append(item)
            else:
                pool[int(pad_rng.integers(256))] = item
            batch.append(item)
            emitted += 1
            if len(batch) == want:
                yield self._collate(batch, counter, wid)
                batch, want = [], next(sizes, 0)
        self._check_corrupt(counter, block)
        while want:  # the block ran short because of corrupt data: pad with earlier good samples
            if not pool:
                raise ShardError(f"worker {wid}: no readable sample in its shards; {counter.get('errors')}")
            batch.append(pool[int(pad_rng.integers(len(pool)))])
            counter["padded"] += 1
            if len(batch) == want:
                yield self._collate(batch, counter, wid)
                batch, want = [], next(sizes, 0)

    def _check_corrupt(self, counter: dict, block: int) -> None:
        if block and counter["corrupt"] / block > self.max_corrupt_fraction:
            raise ShardError(
                f"{counter['corrupt']} of {block} samples unreadable in this worker's shards "
                f"(> data.max_corrupt_fraction={self.max_corrupt_fraction}); first problems: "
                f"{counter.get('errors', ['undecodable samples'])[:3]}"
            )

    @staticmethod
    def _collate(items: list, counter: dict, wid: int) -> dict:
        return {
            "images": torch.from_numpy(np.stack([i[0] for i in items])),
            "labels": torch.tensor([i[1] for i in items], dtype=torch.int64),
            "keys": [i[2] for i in items],
            "corrupt": counter["corrupt"],
            "padded": counter["padded"],
            "worker": wid,
        }


class ShardLoader:
    """A DataLoader over ``ShardStream`` for one rank; ``len()`` is the same on every rank.

    Use ``set_epoch(epoch, start_batch)`` before iterating. ``corrupt``/``padded`` hold the counts
    seen so far in the current epoch (summed over workers).
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
        )
        self.corrupt = self.padded = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.stream.epoch, self.stream.start_batch = epoch, start_batch

    def __len__(self) -> int:
        return len(self.stream)

    def __iter__(self) -> Iterator[dict]:
        per_worker: dict[int, tuple[int, int]] = {}
        for batch in self.loader:
            per_worker[batch["worker"]] = (batch["corrupt"], batch["padded"])
            self.corrupt = sum(c for c, _ in per_worker.values())
            self.padded = sum(p for _, p in per_worker.values())
            yield batch


def rank_and_world() -> tuple[int, int]:
    """From an initialised process group, else from launcher environment variables."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def load_arrays(shardset: ShardSet, batch_size: int = 4096, factors: bool = False) -> tuple:
    """The whole set in memory, in manifest order: (uint8 [N,C,H,W], int64 [N], keys), and with
    ``factors=True`` also the generating factors, float64 [N, F] (``selfsup.pretrain.factors``)."""
    stream = ShardStream(shardset, batch_size, shuffle=False, drop_last=False, max_corrupt_fraction=0.0)
    images, labels, keys = [], [], []
    for b in stream:
        images.append(b["images"])
        labels.append(b["labels"])
        keys.extend(b["keys"])
    if not factors:
        return torch.cat(images), torch.cat(labels), keys
    from selfsup.pretrain.factors import FactorError, load_factors

    values, fkeys = load_factors(shardset)
    if fkeys != keys:
        raise FactorError(f"{shardset.base}: factors and images are not in the same sample order")
    return torch.cat(images), torch.cat(labels), keys, values

