"""Kill-and-resume check for a method, on test_train.py's helpers: a run SIGKILLed after a
checkpoint and resumed with ``--resume auto`` ends bitwise equal to an uninterrupted one (final
parameters and buffers, and the logged loss of every step)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from test_train import _wait_for_checkpoint, assert_same_params, final_model, metrics, pretrain

from selfsup.pretrain.run.rundir import latest_checkpoint, load_checkpoint

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


# ---------------------------------------------------------------- the CLI kill-and-resume tests of
# the EMA methods (byol, mocov3, dino): their own recipe overrides, the same mechanics
CLI_ENV = {**os.environ, "WANDB_MODE": "offline", "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}


def cli_pretrain(run_dir: Path, shards: str, run_args: list[str], *extra: str, wait: bool = True):
    """``selfsup pretrain`` in a subprocess: the finished process, or (``wait=False``) the running one."""
    cmd = [sys.executable, "-m", "selfsup.launch.cli", "pretrain", f"data.train={shards}",
           f"run_dir={run_dir}", *run_args, *extra]  # fmt: skip
    if not wait:
        return subprocess.Popen(cmd, env=CLI_ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return subprocess.run(cmd, env=CLI_ENV, capture_output=True, text=True, timeout=600)


def cli_kill_then_resume(tmp_path: Path, shards: str, run_args: list[str], low: int,
                         high: int) -> tuple[Path, Path, int, str]:
    """The run SIGKILLed after a checkpoint in [low, high) (alone: a reference run beside it could
    let it finish), then the uninterrupted reference, then ``--resume auto`` of the killed run.
    Returns (reference dir, killed dir, the step it was killed after, the resume's stdout)."""
    ref, run = tmp_path / "ref", tmp_path / "killed"
    proc = cli_pretrain(run, shards, run_args, wait=False)
    killed_at = sigkill_after_a_checkpoint(proc, run, low, high)
    r = cli_pretrain(ref, shards, run_args)
    assert r.returncode == 0, r.stdout + r.stderr
    r = cli_pretrain(run, shards, run_args, "--resume", "auto")
    assert r.returncode == 0 and "resumed from" in r.stdout, r.stdout + r.stderr
    return ref, run, killed_at, r.stdout


def sigkill_after_a_checkpoint(proc: subprocess.Popen, run_dir: Path, low: int, high: int) -> int:
    """SIGKILL ``proc`` once its run has a checkpoint at or after a random step in [low, high);
    returns that checkpoint's step."""
    kill_after = int(np.random.default_rng().integers(low, high))
    deadline = time.time() + 300
    while True:
        path = None
        with contextlib.suppress(Exception):  # the pointer may be mid-replace; poll again
            path = latest_checkpoint(run_dir / "checkpoints")
        if path is not None and int(path.stem.split("-")[1]) >= kill_after:
            break
        if proc.poll() is not None or time.time() > deadline:
            if proc.poll() is None:  # stuck: kill it first, or reading its output blocks forever
                proc.kill()
            raise AssertionError(f"no checkpoint >= {kill_after} (exit {proc.wait()}):\n{proc.stdout.read()[-4000:]}")
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return int(path.stem.split("-")[1])


def same_final_models(ref: Path, run: Path) -> dict[str, torch.Tensor]:
    """The two runs' last checkpoints hold bitwise equal models; returns the reference's."""
    a = load_checkpoint(latest_checkpoint(ref / "checkpoints"))["model"]
    b = load_checkpoint(latest_checkpoint(run / "checkpoints"))["model"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"
    return a


def jsonl_rows(run_dir: Path) -> list[dict]:
    return [json.loads(r) for r in (run_dir / "metrics.jsonl").read_text().splitlines()]
