"""Kill-and-resume check for a method, on test_train.py's helpers: a run SIGKILLed after a
checkpoint and resumed with ``--resume auto`` ends bitwise equal to an uninterrupted one (final
parameters and buffers, and the logged loss of every step)."""

from __future__ import annotations

import signal
from pathlib import Path

import numpy as np
from test_train import _wait_for_checkpoint, assert_same_params, final_model, metrics, pretrain

STEPS = ["train.max_steps=16", "train.checkpoint_every=2", "data.batch_size=16", "model.width=0.25", "log.wandb=off"]


def kill_resume_is_bitwise(tmp_path: Path, shards: str, *overrides: str) -> list[dict]:
    """Returns the reference run's metrics rows."""
    ref, run = tmp_path / "ref", tmp_path / "killed"
    proc = pretrain(run, shards, *STEPS, *overrides, wait=False)
    at = _wait_for_checkpoint(run, proc, int(np.random.default_rng().integers(2, 7)))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    r = pretrain(ref, shards, *STEPS, *overrides)
    assert r.returncode == 0, r.stdout + r.stderr
    r = pretrain(run, shards, *STEPS, *overrides, resume=True)
    assert r.returncode == 0 and "resumed from" in r.stdout, r.stdout + r.stderr
    assert at < 16
    assert_same_params(final_model(ref), final_model(run))
    rows, rows_ref = metrics(run), metrics(ref)
    assert [m["step"] for m in rows] == list(range(1, 17))
    assert [m["loss"] for m in rows] == [m["loss"] for m in rows_ref]
    return rows_ref
