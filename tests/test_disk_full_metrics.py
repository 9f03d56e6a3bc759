"""A disk that fills up while a real run appends to metrics.jsonl (a size-limited tmpfs, filled
by another file mid-run, as a neighbour's job fills a shared scratch disk): the run stops with an
error saying what failed and which checkpoint is intact, metrics.jsonl ends with a complete row,
the checkpoint loads, and once space is back ``--resume auto`` continues from it."""

from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path

import pytest
from faultkit import size_limited_disk, start
from test_train import SMALL

from selfsup.pretrain.run.rundir import latest_checkpoint, load_checkpoint


def _fill(disk: Path) -> Path:
    """Write a file until the disk refuses another byte."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as f:
        for size in (2**20, 2**12, 1):
            with contextlib.suppress(OSError):
                while True:
                    f.write(b"\0" * size)
    return filler


def _steps(path: Path) -> list[int]:
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


@pytest.fixture
def disk(tmp_path: Path):
    with size_limited_disk(tmp_path, "16m") as mnt:
        yield mnt


def test_full_disk_while_logging_stops_cleanly(disk: Path, small_shards: str) -> None:
    run = disk / "run"
    args = [sys.executable, "-m", "selfsup.launch.cli", "pretrain", f"data.train={small_shards}", f"run_dir={run}",
            *SMALL, "log.wandb=offline", "train.max_steps=60", "train.checkpoint_every=20", "train.keep_checkpoints=1"]  # fmt: skip
    proc = start(args)
    deadline = time.monotonic() + 300
    while not (run / "metrics.jsonl").exists() or len(_steps(run / "metrics.jsonl")) < 22:
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended or stalled before step 22"
        time.sleep(0.05)
    filler = _fill(disk)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1, out
    assert "No space left on device" in out and "cannot append step" in out and "metrics.jsonl" in out, out
    assert "is intact" in out, out
    steps = _steps(run / "metrics.jsonl")  # every line parses: no torn row
    assert steps == list(range(1, len(steps) + 1)) and len(steps) < 50
    latest = latest_checkpoint(run / "checkpoints")
    assert load_checkpoint(latest)["step"] == 20 and latest.name in out
    filler.unlink()
    proc = start([*args, "--resume", "auto"])
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert _steps(run / "metrics.jsonl") == list(range(1, 61))
