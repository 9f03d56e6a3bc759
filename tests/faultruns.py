"""The training runs the fault tests share: two damaged shard sets and their uninterrupted
reference runs, made once per session (tests/test_faults.py and tests/test_two_nodes.py compare
against the same references), and the helpers that start runs and compare checkpoints."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from faultkit import copy_set, damage_samples, start, truncate_shard
from test_train import SMALL, metrics

STEPS, EVERY = 36, 3
TIMING = {"img_per_s", "data_wait"}  # the only fields allowed to differ between runs
# 1 process: offline W&B. 2 processes: a bad shard skipped, periodic kNN every epoch (24 steps).
EXTRA = {1: ["log.wandb=offline"],
         2: ["log.wandb=off", "data.on_bad_shard=skip", "train.dist_timeout_s=30", "eval.every_epochs=1",
             "eval.knn_k=[5]"]}  # fmt: skip


def train_args(run: Path, shards: dict[str, str], nproc: int) -> list[str]:
    extra = [*EXTRA[nproc], *([f"data.test={shards['test']}"] if nproc == 2 else [])]
    return [f"data.train={shards[str(nproc)]}", f"run_dir={run}", *SMALL, f"train.max_steps={STEPS}",
            f"train.checkpoint_every={EVERY}", "train.keep_checkpoints=0", *extra]  # fmt: skip


def command(run: Path, shards: dict[str, str], nproc: int, resume: bool = False) -> list[str]:
    args = ["pretrain", *train_args(run, shards, nproc), *(["--resume", "auto"] if resume else [])]
    if nproc == 1:
        return [sys.executable, "-m", "selfsup.launch.cli", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "selfsup.launch.cli", *args]  # fmt: skip


def run_to_end(run: Path, shards: dict[str, str], nproc: int, resume: bool = False) -> str:
    proc = start(command(run, shards, nproc, resume))
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    return out


def ckpts(run: Path) -> dict[int, Path]:
    return {int(p.stem.split("-")[1]): p for p in (run / "checkpoints").glob("step-*.pt")}


def differences(a, b, where: str = "") -> list[str]:
    """Paths at which two checkpoint structures differ (tensors compared bitwise; W&B id ignored)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        ok = isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
        return [] if ok else [where]
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{where} keys {sorted(a.keys() ^ b.keys())}"]
        return [d for k in a if k != "wandb_id" for d in differences(a[k], b[k], f"{where}.{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{where} length"]
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in differences(x, y, f"{where}[{i}]")]
    return [] if a == b else [f"{where}: {a!r} != {b!r}"]


def rows(run: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in metrics(run)]


@pytest.fixture(scope="session", name="fault_sets")
def fault_sets_fixture(small_shards: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """"1": undecodable images, manifest rebuilt; "2": one truncated shard and undecodable images in
    a shard whose manifest entry has no size/hash; "test": the plain set, for the periodic kNN."""
    root = tmp_path_factory.mktemp("fault-sets")
    a = copy_set(small_shards, root / "damaged")
    damage_samples(a, 0, [3, 50, 100])
    damage_samples(a, 2, [7])
    b = copy_set(small_shards, root / "bad-shard")
    truncate_shard(b, 3)
    damage_samples(b, 1, [10, 11], rebuild_manifest=False)
    return {"1": str(a), "2": str(b), "test": small_shards}


@pytest.fixture(scope="session", name="fault_refs")
def fault_refs_fixture(fault_sets: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """The uninterrupted runs (1 and 2 processes), once per session."""
    root = tmp_path_factory.mktemp("fault-refs")
    out = {}
    for nproc in (1, 2):
        out[nproc] = root / f"ref-{nproc}"
        run_to_end(out[nproc], fault_sets, nproc)
    return out
