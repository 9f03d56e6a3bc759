"""A new method registered outside the package (tests/toy_method.py, ~20 lines, the contract only)
trains, checkpoints and resumes bitwise through the real loop, with no change to the loop."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from selfsup.config import ConfigError, load_config
from selfsup.pretrain.run.rundir import LATEST, list_checkpoints, load_checkpoint

TOY = str(Path(__file__).with_name("toy_method.py"))

ENV = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
ARGS = ["method.name=toy", "method.toy.dim=8", "model.backbone=resnet_small", "model.stem=cifar_s2",
        "model.width=0.25", "data.batch_size=16", "data.workers=0", "train.max_steps=6",
        "train.checkpoint_every=3", "train.keep_checkpoints=0", "train.log_every=1",
        "log.wandb=off", "log.progress=false"]  # fmt: skip


def run_toy(run_dir: Path, shards: str, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, TOY, "pretrain", f"data.train={shards}", f"run_dir={run_dir}", *ARGS, *extra]
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)


def test_toy_method_trains_checkpoints_and_resumes_bitwise(tmp_path: Path, small_shards: str) -> None:
    ref, run = tmp_path / "ref", tmp_path / "run"
    for d in (ref, run):
        r = run_toy(d, small_shards)
        assert r.returncode == 0, r.stdout + r.stderr
    rows = [json.loads(x) for x in (ref / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6] and all("align" in r for r in rows)
    assert "toy:" in (ref / "config.yaml").read_text()  # the registry gave it a config section

    # resume from the step-3 checkpoint, as after a crash there
    step3, step6 = list_checkpoints(run / "checkpoints")
    assert load_checkpoint(step3)["model"]["last_step"] == 3  # after_step ran, state checkpointed
    step6.unlink()
    (run / "checkpoints" / LATEST).write_text(step3.name)
    r = run_toy(run, small_shards, "--resume", "auto")
    assert r.returncode == 0 and "resumed from" in r.stdout, r.stdout + r.stderr
    a = load_checkpoint(list_checkpoints(ref / "checkpoints")[-1])["model"]
    b = load_checkpoint(list_checkpoints(run / "checkpoints")[-1])["model"]
    assert a["last_step"] == b["last_step"] == 6
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_unregistered_method_and_bad_section_are_config_errors(tmp_path: Path, small_shards: str) -> None:
    with pytest.raises(ConfigError, match="method.name: 'toy' is not one of"):
        load_config(None, ["method.name=toy"])  # not registered in this process
    r = run_toy(tmp_path / "bad", small_shards, "method.toy.dim=0", "--print-config")
    assert r.returncode == 2 and "method.toy.dim must be >= 1" in r.stdout
