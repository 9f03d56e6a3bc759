"""End to end on images that are not 8-bit RGB: a 4-channel .npy folder and a 16-bit PNG-16
folder, each imported -> pretrained (3 steps) -> evaluated -> exported -> ``load_backbone``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import selfsup

ENV = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "ACCELERATE_USE_CPU": "1"}
CLI = [sys.executable, "-m", "selfsup.launch.cli"]
SIDE = 16


def _run(*args: str) -> None:
    r = subprocess.run([*CLI, *args], env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr


def _write(root: Path, kind: str, seed: int) -> None:
    """Two classes told apart by a bright channel (4-channel) or a bright upper half (16-bit)."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", 24), ("test", 12)):
        for c in range(2):
            d = root / f"src-{split}" / f"c{c}"
            d.mkdir(parents=True)
            for i in range(n):
                if kind == "npy4":
                    a = rng.integers(0, 100, (SIDE, SIDE, 4), dtype=np.uint8)
                    a[..., 2 * c] += 120
                    np.save(d / f"{i}.npy", a)
                else:
                    a = rng.integers(0, 30000, (SIDE, SIDE), dtype=np.uint16)
                    a[: SIDE // 2] += 30000 * c
                    Image.fromarray(a).save(d / f"{i}.png")


@pytest.mark.slow
@pytest.mark.parametrize("kind,channels,bits", [("npy4", 4, 8), ("png16", 1, 16)])
def test_import_pretrain_eval_export_load(tmp_path: Path, kind: str, channels: int, bits: int) -> None:
    _write(tmp_path, kind, seed=0)
    depth = ["--keep-depth"] if bits == 16 else []
    for split in ("train", "test"):
        _run("shards", "--source", "folder", "--path", str(tmp_path / f"src-{split}"), "--out",
             str(tmp_path / split), "--size", str(SIDE), "--multichannel", *depth, "--quiet",
             "--workers", "1", "--split", split)  # fmt: skip
    manifest = json.loads((tmp_path / "train" / "manifest.json").read_text())
    assert manifest["channels"] == channels and manifest.get("bits", 8) == bits
    run = tmp_path / "run"
    _run("pretrain", f"data.train={tmp_path / 'train'}", f"run_dir={run}", "model.backbone=resnet_small",
         "model.stem=cifar_s2", "data.batch_size=16", "data.workers=1", "train.max_steps=3",
         "log.progress=false", "augment.gray_p=0", "method.simclr.proj_hidden=32", "method.simclr.proj_out=16")
    _run("export", "--run", str(run))
    _run("eval", "--checkpoint", str(run / "export"), "--train-shards", str(tmp_path / "train"),
         "--test-shards", str(tmp_path / "test"), "--protocols", "knn", "--no-baselines", "--k", "5")
    report = json.loads((run / "export" / "eval" / "report.json").read_text())["models"]["pretrained"]
    assert 50.0 < report["knn_top1_k5"] <= 100.0  # the planted class signal is found, above chance
    backbone = selfsup.load_backbone(run / "export")
    with torch.no_grad():
        feats = backbone(torch.zeros(2, channels, SIDE, SIDE))
    assert feats.shape[0] == 2 and torch.isfinite(feats).all()
