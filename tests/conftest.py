"""Shared fixtures: real shard sets on disk, written once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from selfsup.pretrain.datasets import embedded
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


def repo_root() -> Path:
    return Path(__file__).resolve().parents[1]
