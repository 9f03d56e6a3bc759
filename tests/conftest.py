"""Shared fixtures: real shard sets on disk, written once per test session."""

from __future__ import annotations

import os
import random
import zlib

import numpy as np
import pytest
import torch
from embedded_sets import write_every_kth

from selfsup.pretrain.data.datasets import ArraySource, embedded
from selfsup.pretrain.data.shards import ShardOptions, write_shards

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(autouse=True)
def _seed_global_rngs(request: pytest.FixtureRequest) -> None:
    """Seed the global RNGs per test, so a test that draws from them does not depend on which tests
    ran before it. ``SELFSUP_TEST_SEED=n`` shifts every seed: run the suite with a few values to find
    tests that pass only for a lucky draw."""
    seed = zlib.crc32(request.node.nodeid.encode()) + int(os.environ.get("SELFSUP_TEST_SEED", "0"))
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@pytest.fixture
def one_thread():
    """Small tensors: intra-op threads only add hand-off cost (and stall badly on busy cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def embedded_shards(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The embedded Fashion-MNIST subset as shard sets: {"train": dir (10k), "test": dir (2k)}."""
    return write_every_kth(tmp_path_factory.mktemp("embedded"), {"train": 1, "test": 1})


@pytest.fixture(scope="session")
def embedded_fifth(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Every 5th image of the embedded train split and every 4th of its test split (2000 / 500, all
    ten classes): evaluation end to end at a fifth of the full set's cost."""
    return write_every_kth(tmp_path_factory.mktemp("embedded-fifth"), {"train": 5, "test": 4}, 500)


@pytest.fixture(scope="session")
def small_shards(tmp_path_factory: pytest.TempPathFactory) -> str:
    """1024 embedded training images in 5 uneven shards: fast enough for many short runs."""
    src = embedded("train")
    sub = ArraySource("small", src.images[:1024], src.labels[:1024], src.classes)
    out = tmp_path_factory.mktemp("small")
    write_shards(iter(sub), out, sub.classes, ShardOptions(samples_per_shard=230, progress=False))
    return str(out)


# The fault tests' shard sets and reference runs (tests/faultruns.py), registered here so that
# test_faults.py and test_two_nodes.py share one session-wide copy instead of one per module.
from faultruns import fault_refs_fixture, fault_sets_fixture  # noqa: E402, F401

# `make test` runs the suite in two passes (measured: serially it kept 1.22 of 2 cores busy, 1407 of
# 3614 core-seconds idle, most runs being one single-threaded trainer):
#   1. everything but SYSTEM_FILES on two pytest-xdist workers, one test file per unit
#      (`--dist loadgroup`), so a file's module-scoped runs are built once, on one worker;
#   2. SYSTEM_FILES alone, serially: they start network namespaces or SLURM daemons, wait on
#      timeouts, and test_faults shares its reference runs with test_two_nodes (measured 2-4x slower
#      beside other work in an earlier try of one xdist pass over everything).
SYSTEM_FILES = {"test_faults.py", "test_two_nodes.py", "test_slurm.py", "test_slurm_two_nodes.py"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        name = item.path.name
        item.add_marker(pytest.mark.xdist_group(name))
        if name in SYSTEM_FILES:
            item.add_marker(pytest.mark.system)


if os.environ.get("PYTEST_XDIST_WORKER"):
    # two workers on two cores: one intra-op thread each, or their OpenMP pools spin against each other
    torch.set_num_threads(1)
