"""Subsets of the embedded Fashion-MNIST set written as shard sets: every k-th image of a split
keeps all ten classes at 1/k of the cost (tests/conftest.py's fixtures, the demo --compare tests)."""

from __future__ import annotations

from pathlib import Path

from selfsup.pretrain.data.datasets import ArraySource, embedded
from selfsup.pretrain.data.shards import ShardOptions, write_shards


def write_every_kth(root: Path, every: dict[str, int], samples_per_shard: int = 1000) -> dict[str, str]:
    """``{split: k}`` -> every k-th image of that split in ``root/<split>``; returns {split: dir}."""
    out = {}
    for split, k in every.items():
        src = embedded(split)
        sub = ArraySource(split, src.images[::k], src.labels[::k], src.classes)
        opts = ShardOptions(name=split, split=split, samples_per_shard=samples_per_shard, progress=False)
        write_shards(iter(sub), root / split, sub.classes, opts, total=len(sub))
        out[split] = str(root / split)
    return out
