"""Seeded fault injection on real training processes: SIGKILL at random steps (1 and 2 processes),
one rank of two killed, a torn checkpoint, damaged samples in the stream. Every resumed segment
must write the very checkpoints an uninterrupted reference run wrote (model, optimiser, scheduler,
RNG and data-loader state, bitwise), and the final metrics must equal the reference's row for row.

Each chain kills the whole process tree (launcher, ranks, W&B service) with SIGKILL, as a node
crash or a SLURM kill does, at a random step and a random instant inside it (which can fall in a
checkpoint write), then ``--resume auto``; each resume is checked by the checkpoints its segment
writes. ``SELFSUP_FAULT_SEED`` picks other kill points; the seed is in every failure message.

* 1 process (3 kills): undecodable images whose manifest was rebuilt (counted, padded), offline
  W&B (the last W&B run must hold exactly the metrics.jsonl history).
* 2 processes (3 kills, then a 4th fault: only rank 1 killed): a truncated shard left out by
  ``data.on_bad_shard=skip``, undecodable images in a shard the manifest cannot vouch for, the
  periodic kNN (each rank extracts its half). Before the third resume the newest checkpoint is also
  torn: the resume falls back to the one before, says so, and still ends bitwise equal. After the
  4th fault the survivor must exit naming rank 1 within ``train.dist_timeout_s``.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from faultkit import kill_tree, start, wait_step
from faultruns import (
    STEPS,
    ckpts,
    command,
    differences,
        rows,
)
from test_train import metrics

from selfsup.pretrain.run.rundir import latest_checkpoint, load_checkpoint

pytestmark = pytest.mark.slow
SEED = int(os.environ.get("SELFSUP_FAULT_SEED", "20261201"))
KILLS = 3  # 5 until 2026-12-07: each kill costs a process start; the kinds of fault stay the same
TORN = 4096  # bytes left of the checkpoint the 2-process chain tears


def _check_segments(run: Path, ref: Path, starts: list[int], seed: int, torn: set[str]) -> list[list[int]]:
    """Each resumed segment's checkpoints equal the reference's; returns the steps checked per resume.
    A checkpoint the test tore and no later segment rewrote (the resume went past it) is left out."""
    got, want = ckpts(run), ckpts(ref)
    got = {s: p for s, p in got.items() if not (p.name in torn and p.stat().st_size == TORN)}
    bounds = [*starts, STEPS]
    report = []
    for i, lo in enumerate(starts):
        steps = sorted(s for s in got if lo < s <= bounds[i + 1])
        assert steps, f"seed={seed}: the segment resumed at step {lo} wrote no checkpoint to check"
        for s in steps:
            diff = differences(load_checkpoint(got[s]), load_checkpoint(want[s]))
            assert not diff, f"seed={seed}: resume at step {lo}: checkpoint {s} differs at {diff[:5]}"
        report.append(steps)
    return report


def _kill_rank1(run: Path, proc, seed: int) -> tuple[str, str]:
    """The last fault of the 2-process chain: only rank 1 dies; rank 0 must say so and exit in time."""
    import psutil

    ranks = {int(p.environ().get("RANK", -1)): p for p in psutil.Process(proc.pid).children()}
    assert sorted(ranks) == [0, 1], f"seed={seed}: {ranks}"
    ranks[1].kill()
    t0 = time.monotonic()
    out, _ = proc.communicate(timeout=90)
    took = time.monotonic() - t0
    assert proc.returncode != 0, out
    assert "error: lost a process of the job" in out and "rank(s) 1 of 2 stopped" in out, f"seed={seed}: {out}"
    assert took < 30, f"seed={seed}: the survivor took {took:.0f}s to give up (train.dist_timeout_s=30)"
    return f"{took:.1f}s", out


@pytest.mark.parametrize("nproc", [1, 2])
def test_seeded_sigkills_resume_bitwise(tmp_path: Path, fault_sets: dict, fault_refs: dict, nproc: int) -> None:
    seed = SEED + nproc
    rng = np.random.default_rng(seed)
    run = tmp_path / "killed"
    kills, starts, outs, damaged, survivor, torn = [], [], [], None, None, set()
    at = 0
    proc = start(command(run, fault_sets, nproc))
    for i in range(KILLS + (nproc == 2)):
        damage = nproc == 2 and i == 2  # this time also tear the newest checkpoint: resume falls back
        at += 8 if damage else int(rng.integers(4, 6))  # >= 4 apart: every segment passes a checkpoint
        wait_step(run, proc, at)
        time.sleep(float(rng.uniform(0.0, 0.08)))  # a random instant in the next step
        if i == KILLS:
            survivor, out = _kill_rank1(run, proc, seed)
            outs.append(out)
        else:
            outs.append(kill_tree(proc))
        if damaged is not None:  # the segment that resumed past the torn checkpoint said so
            assert "WARNING" in outs[-1] and damaged in outs[-1] and "newest checkpoint that loads" in outs[-1]
            damaged = None
        if damage:
            newest = latest_checkpoint(run / "checkpoints")
            newest.write_bytes(newest.read_bytes()[:TORN])
            damaged = newest.name
            torn.add(damaged)
        kills.append(at)
        starts.append(load_checkpoint(max(p for p in ckpts(run).values() if p.name != damaged))["step"])
        proc = start(command(run, fault_sets, nproc, resume=True))
    out, _ = proc.communicate(timeout=600)
    outs.append(out)
    assert proc.returncode == 0, f"seed={seed}: {out}"
    report = _check_segments(run, fault_refs[nproc], starts, seed, torn)
    print(f"seed={seed} nproc={nproc}: faults after steps {kills}, resumed at {starts}, checkpoints checked "
          f"{report}: {len(report)}/{len(starts)} resumes bitwise equal"
          + (f"; survivor of the rank-1 kill exited after {survivor}" if survivor else ""))  # fmt: skip
    assert rows(run) == rows(fault_refs[nproc]), f"seed={seed}: metrics differ"
    last = metrics(run)[-1]
    if nproc == 1:  # damaged images: counted and padded, and the same counts after every resume
        assert last["corrupt"] >= 4 and last["padded"] == last["corrupt"], last
        _check_wandb(run, seed)
    else:
        assert last["skipped_shards"] == 1 and last["corrupt"] >= 2 and last["padded"] == last["corrupt"], last
        _check_periodic_knn(fault_refs[2], fault_sets, "\n".join(outs))
    assert not list((run / "checkpoints").glob(".*tmp*")), "a killed write left its temporary file"


def _check_wandb(run: Path, seed: int) -> None:
    """The W&B run the last resume wrote holds exactly the metrics.jsonl history."""
    from wandb_records import history

    wandb_id = load_checkpoint(latest_checkpoint(run / "checkpoints"))["wandb_id"]
    (path,) = run.glob(f"wandb/offline-run-*-{wandb_id}/run-{wandb_id}.wandb")
    got = [(h["_step"], h["loss"]) for h in history(path)]
    assert got == [(m["step"], m["loss"]) for m in metrics(run)], f"seed={seed}: W&B history differs"


def _check_periodic_knn(ref: Path, sets: dict, output: str) -> None:
    """Each rank extracted half of each set; the logged accuracy is what one process computes."""
    from selfsup.config import load_config
    from selfsup.data_info import DataInfo
    from selfsup.eval.features import extract_features
    from selfsup.eval.knn import knn_classify
    from selfsup.pretrain.build import build_method
    from selfsup.pretrain.data.stream import ShardSet, load_arrays

    done = set(re.findall(r"eval: rank (\d)/2 extracted (\d+) features of (\S+)", output))
    assert {(r, n) for r, n, _ in done} == {("0", "397"), ("1", "397"), ("0", "512"), ("1", "512")}, done
    (row,) = [m for m in metrics(ref) if "eval/knn_top1_k5" in m]
    cfg = load_config(ref / "config.yaml")
    train, test = ShardSet.open(sets["2"], on_bad_shard="skip"), ShardSet.open(sets["test"])
    info = DataInfo(train.channels, train.image_size, tuple(train.mean), tuple(train.std))
    method = build_method(cfg, info)
    method.load_state_dict(load_checkpoint(ckpts(ref)[row["step"]])["model"])
    (xtr, ytr), (xte, yte, _) = _padded_arrays(train), load_arrays(test)
    ftr, fte = (extract_features(method.backbone, x, info.mean, info.std) for x in (xtr, xte))
    want = knn_classify(ftr, ytr, fte, yte, k=(5,), temperature=cfg.eval.knn_temperature)["knn_top1_k5"]
    assert abs(row["eval/knn_top1_k5"] - want) <= 100 / 1024 + 1e-9, (row, want)


def _padded_arrays(ss) -> tuple:
    """The whole set in order, its few undecodable images padded as the trainer's stream pads them."""
    from selfsup.pretrain.data.stream import ShardStream

    batches = list(ShardStream(ss, 4096, shuffle=False, drop_last=False, max_corrupt_fraction=0.01))
    return torch.cat([b["images"] for b in batches]), torch.cat([b["labels"] for b in batches])
