"""MAE and DAE through the real training loop (``selfsup pretrain`` in a subprocess, offline W&B):
short runs on the embedded data lower the loss, the run directory gets a reconstruction grid, the
checkpoint holds the backbone under its timm/torchvision names, and two gloo processes run the
same recipes unchanged."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from selfsup.pretrain.run.rundir import latest_checkpoint, load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
MAE_CPU = str(ROOT / "configs" / "mae_demo.yaml")
DAE = str(ROOT / "configs" / "dae_demo.yaml")
ENV = {
    **os.environ,
    "WANDB_MODE": "offline",
    "WANDB_SILENT": "true",
    "ACCELERATE_USE_CPU": "1",
    "OMP_NUM_THREADS": "1",
}
QUIET = ["log.progress=false", "data.workers=1"]


def pretrain(config: str, run: Path, shards: str, *overrides: str, nproc: int = 1):
    args = ["pretrain", "--config", config, f"data.train={shards}", f"run_dir={run}", *QUIET]
    if nproc == 1:
        cmd = [sys.executable, "-m", "selfsup.launch.cli", *args, *overrides]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", "-m", "selfsup.launch.cli", *args, *overrides]  # fmt: skip
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def losses(run: Path) -> list[float]:
    rows = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
    return [row["loss"] for row in rows if "loss" in row]


def check_run_dir(run: Path, backbone_key: str) -> None:
    grid = np.asarray(Image.open(run / "reconstructions.png"))
    assert grid.shape[0] > 3 * 28 and grid.std() > 0  # three rows of real images
    offline = list((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and list(offline[0].glob("run-*.wandb"))
    model = load_checkpoint(latest_checkpoint(run / "checkpoints"))["model"]
    assert backbone_key in model


@pytest.mark.slow
@pytest.mark.parametrize(("config", "drop", "weight"), [
    (MAE_CPU, 0.8, "backbone.blocks.0.attn.qkv.weight"),
    (DAE, 0.5, "backbone.layer1.0.conv1.weight"),
], ids=["mae", "dae"])  # fmt: skip
def test_short_run_lowers_loss(tmp_path: Path, small_shards: str, config: str, drop: float, weight: str) -> None:
    run = tmp_path / "run"
    pretrain(config, run, small_shards, "data.batch_size=64", "train.max_steps=48",
             "train.log_every=4", "train.epochs=0")  # fmt: skip
    loss = losses(run)
    assert len(loss) == 12
    assert np.mean(loss[-3:]) < drop * np.mean(loss[:2]), loss
    check_run_dir(run, weight)


@pytest.mark.slow
@pytest.mark.parametrize("config", [MAE_CPU, DAE], ids=["mae", "dae"])
def test_two_processes_run_unchanged(tmp_path: Path, small_shards: str, config: str) -> None:
    run = tmp_path / "run"
    pretrain(config, run, small_shards, "data.batch_size=32", "train.max_steps=6",
             "train.log_every=2", "train.epochs=0", nproc=2)  # fmt: skip
    saved = load_checkpoint(latest_checkpoint(run / "checkpoints"))
    assert saved["world_size"] == 2 and saved["step"] == 6
    assert all(np.isfinite(losses(run)))
    assert (run / "reconstructions.png").is_file()
