"""The non-finite guard with gradient accumulation, on a real run.

The data make a genuine non-finite loss in ONE micro-batch: every image is black except one
bright image, and ``augment.std=[1e-45]`` (a float32 denormal) normalises black to exactly 0 but
bright to +inf, which the first convolution turns into NaN (BatchNorm alone would absorb any finite
scale). The bright image is placed (through the stream's own plan) at
the first micro-batch of step K+1 of a ``train.accumulate=2`` run, so the last micro-batch of that
step is finite: a guard that only looks at the last loss lets the NaN gradients into
``optimizer.step``. The run must stop before updating, with a checkpoint equal, bitwise, to the
reference run's checkpoint at step K (the same data with no bright image). Non-finite gradients
behind a finite loss are checked on a real backward with an infinite derivative.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from faultruns import differences
from test_train import metrics, pretrain

from selfsup.pretrain.data.datasets import ArraySource
from selfsup.pretrain.data.shards import ShardOptions, write_shards
from selfsup.pretrain.data.stream import ShardSet, ShardStream
from selfsup.pretrain.loop.guard import FiniteGuard
from selfsup.pretrain.run.rundir import load_checkpoint

K, N, MICRO = 3, 320, 16
RUN = ["train.accumulate=2", "data.batch_size=32", "augment.mean=[0.0]", "augment.std=[1e-45]", "train.max_steps=8",
       "train.checkpoint_every=1", "train.keep_checkpoints=0", "log.wandb=off", "augment.recipe=simclr"]  # fmt: skip


def _set(root: Path, bright: int | None) -> str:
    images = np.zeros((N, 28, 28, 1), dtype=np.uint8)
    if bright is not None:
        images[bright] = 255
    src = ArraySource("black", images, np.zeros(N, dtype=np.int64), ["black"])
    write_shards(iter(src), root, src.classes, ShardOptions(samples_per_shard=100, progress=False))
    return str(root)


def test_nan_in_an_early_micro_batch_stops_with_the_last_good_state(tmp_path: Path) -> None:
    plain = _set(tmp_path / "black", None)
    # where micro-batch 2K (the first of step K+1) takes its first sample from, per the stream's plan
    stream = ShardStream(ShardSet.open(plain), MICRO, workers=1, seed=0, shuffle_buffer=2000)
    batch = list(stream)[2 * K]
    bright = int(batch["keys"][0].split("-")[-1])
    ref = tmp_path / "ref"
    r = pretrain(ref, plain, *RUN)
    assert r.returncode == 0, r.stdout + r.stderr
    run = tmp_path / "nan"
    r = pretrain(run, _set(tmp_path / "one-bright", bright), *RUN)
    assert r.returncode == 1 and f"non-finite loss at step {K} " in r.stdout, r.stdout + r.stderr
    stop = load_checkpoint(run / "checkpoints" / f"step-{K:08d}.pt")
    assert stop["reason"] == "non-finite loss" and sorted(int(p.stem[5:]) for p in (run / "checkpoints").glob("*.pt")) == list(range(1, K + 1))
    want = load_checkpoint(ref / "checkpoints" / f"step-{K:08d}.pt")
    diff = [d for d in differences(stop, want) if not d.startswith(".reason")]
    assert not diff, f"the stop checkpoint is not the last good state: {diff[:5]}"
    assert [m["loss"] for m in metrics(run)] == [m["loss"] for m in metrics(ref)][:K]


@pytest.mark.parametrize("check_grads", [True, False])
def test_finite_loss_with_infinite_gradient_is_caught(check_grads: bool) -> None:
    w = torch.nn.Parameter(torch.tensor([0.0, 4.0]))
    loss = torch.sqrt(w).sum()  # finite (2.0), but d sqrt(w)/dw is infinite at w = 0
    loss.backward()
    assert torch.isfinite(loss) and not torch.isfinite(w.grad).all()
    guard = FiniteGuard(torch.device("cpu"), check_grads=check_grads)
    module = torch.nn.Module()
    module.w = w
    guard.begin(module)
    guard.loss(loss)
    finite, stop = guard.agree(torch.nn.utils.clip_grad_norm_([w], float("inf")), stop=False, world=1)
    assert finite is (not check_grads) and stop is False  # without grad checks (fp16 scaler) it is the scaler's call
    guard.begin(module)
    guard.loss(torch.tensor(float("nan")))
    guard.loss(torch.tensor(1.0))  # a later finite micro-batch does not clear it
    assert guard.agree(0.0, stop=True, world=1) == (False, True)
