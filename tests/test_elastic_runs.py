"""Elastic resume with real killed training processes: 2 processes -> SIGKILL -> 1 process (2
workers) -> SIGKILL -> 2 processes, ``--resume auto train.resume_elastic=true`` each time. Every
batch drawn is written down (tests/keytrace.py); the batches of a segment after the checkpoint
the next segment resumed from are discarded (they were lost with the kill). Per epoch the
multiset of keys trained on must equal the epoch's full set, and the loss must keep falling.
Without the flag the changed layout is refused."""

from __future__ import annotations

import json
import re
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from faultkit import kill_tree, start, wait_step
from test_train import SMALL, metrics

from selfsup.pretrain.data.stream import ShardSet, load_arrays

pytestmark = pytest.mark.slow
HERE = Path(__file__).parent
STEPS = 64  # 2 epochs of 32 steps (1024 samples, global batch 32)


def _cmd(run: Path, shards: str, nproc: int, workers: int, trace: Path, *extra: str) -> list[str]:
    args = [str(HERE / "keytrace.py"), "pretrain", f"data.train={shards}", f"run_dir={run}", *SMALL,
            f"data.workers={workers}", "log.wandb=off", f"train.max_steps={STEPS}", "train.checkpoint_every=4",
            "train.keep_checkpoints=0", "train.dist_timeout_s=60", "--resume", "auto", *extra]  # fmt: skip
    env_prefix = [sys.executable]
    if nproc > 1:
        env_prefix += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    trace.mkdir(parents=True, exist_ok=True)
    return [*env_prefix, *args]


def _segment(cmd: list[str], trace: Path, kill_at: int | None, run: Path) -> str:
    from faultkit import ENV

    proc = start(cmd, env={**ENV, "KEYTRACE_DIR": str(trace)})
    if kill_at is None:
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out
        return out
    wait_step(run, proc, kill_at)
    return kill_tree(proc)


def _records(trace: Path) -> list[dict]:
    return [json.loads(line) for f in sorted(trace.glob("rank-*.jsonl")) for line in f.read_text().splitlines()]


def test_two_one_two_processes_see_every_sample_once_per_epoch(tmp_path: Path, small_shards: str) -> None:
    run = tmp_path / "run"
    everything = Counter(load_arrays(ShardSet.open(small_shards))[2])
    plan = [(2, 1, 14), (1, 2, 46), (2, 1, None)]  # (processes, workers, kill after this step)
    outs, traces = [], []
    for i, (nproc, workers, kill_at) in enumerate(plan):
        trace = tmp_path / f"trace-{i}"
        traces.append(trace)
        outs.append(_segment(_cmd(run, small_shards, nproc, workers, trace, "train.resume_elastic=true"), trace,
                             kill_at, run))  # fmt: skip
        if i == 0:  # without the flag the other layout is refused, before anything is trained
            proc = start(_cmd(run, small_shards, 1, 2, tmp_path / "refused"))
            out, _ = proc.communicate(timeout=600)
            assert proc.returncode == 1 and "cannot resume exactly" in out and "train.resume_elastic=true" in out, out
    resumed = [int(m.group(1)) for out in outs[1:] for m in [re.search(r"elastic resume at step (\d+)", out)]]
    assert all("NOT bitwise" in out for out in outs[1:]), outs
    bounds = [*resumed, STEPS]
    per_epoch: dict[int, Counter] = {}
    for trace, last in zip(traces, bounds, strict=True):
        for r in _records(trace):
            if r["step"] <= last:
                per_epoch.setdefault(r["epoch"], Counter()).update(r["keys"])
    table = {e: (sum(c.values()), len(c), max(c.values())) for e, c in sorted(per_epoch.items())}
    print("elastic key counts per epoch (keys trained, distinct, max repeats); resumed at", resumed, table)
    assert sorted(per_epoch) == [0, 1]
    for e, c in per_epoch.items():
        assert c == everything, f"epoch {e}: {table[e]}; missing {len(everything - c)}, extra {len(c - everything)}"
    loss = [m["loss"] for m in metrics(run)]
    assert [m["step"] for m in metrics(run)] == list(range(1, STEPS + 1))
    assert np.mean(loss[-8:]) < np.mean(loss[:8]) - 0.1, loss
