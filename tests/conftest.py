"""Shared fixtures: real shard sets on disk, written once per test session."""

from __future__ import annotations

import os

import pytest

from selfsup.pretrain.datasets import ArraySource, embedded
from selfsup.pretrain.shards import ShardOptions, write_shards

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(scope="session")
def embedded_shards(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The embedded Fashion-MNIST subset as shard sets: {"train": dir (10k), "test": dir (2k)}."""
    root = tmp_path_factory.mktemp("embedded")
    out = {}
    for split in ("train", "test"):
        src = embedded(split)
        opts = ShardOptions(name=split, split=split, samples_per_shard=1000, progress=False)
        write_shards(iter(src), root / split, src.classes, opts, total=len(src))
        out[split] = str(root / split)
    return out


@pytest.fixture(scope="session")
def small_shards(tmp_path_factory: pytest.TempPathFactory) -> str:
    """1024 embedded training images in 5 uneven shards: fast enough for many short runs."""
    src = embedded("train")
    sub = ArraySource("small", src.images[:1024], src.labels[:1024], src.classes)
    out = tmp_path_factory.mktemp("small")
    write_shards(iter(sub), out, sub.classes, ShardOptions(samples_per_shard=230, progress=False))
    return str(out)

