"""End to end through the commands a user types: shapes shards with factors, a short SimCLR run,
then ``selfsup eval --protocols properties``; the report carries the properties rows for all three
columns and the run's InfoNCE bound under its ceiling."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ENV = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "ACCELERATE_USE_CPU": "1"}
CLI = [sys.executable, "-m", "selfsup.launch.cli"]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], env=ENV, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_shapes_pretrain_eval_properties(tmp_path: Path) -> None:
    data = tmp_path / "data"
    for split, n in (("train", 600), ("test", 200)):
        r = _run("shards", "--source", "shapes", "--split", split, "--count", str(n), "--size", "16",
                 "--out", str(data / split), "--quiet")
        assert r.returncode == 0, r.stdout + r.stderr
    run = tmp_path / "run"
    r = _run("pretrain", f"data.train={data / 'train'}", f"run_dir={run}", "model.backbone=resnet_small",
             "model.stem=cifar_s2", "model.width=0.5", "data.batch_size=64", "data.workers=1",
             "train.max_steps=20", "train.log_every=5", "optim.name=sgd", "optim.base_lr=0.3",
             "log.progress=false", "log.wandb=off", "method.simclr.proj_hidden=128",
             "method.simclr.proj_out=32")
    assert r.returncode == 0, r.stdout + r.stderr
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(row["infonce_mi_bound"] <= math.log(2 * 64 - 1) for row in rows)

    r = _run("eval", "--checkpoint", str(run), "--train-shards", str(data / "train"),
             "--test-shards", str(data / "test"), "--protocols", "properties")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "InfoNCE bound log(2N−1) − L at the end of training (nats)" in r.stdout
    report = json.loads((run / "eval" / "report.json").read_text())
    pre = report["models"]["pretrained"]
    assert pre["infonce_ceiling"] == pytest.approx(math.log(127))
    assert 0 < pre["infonce_mi_bound"] < pre["infonce_ceiling"]
    want = sum(row["infonce_mi_bound"] for row in rows[-5:]) / len(rows[-5:])
    assert pre["infonce_mi_bound"] == pytest.approx(want)
    for name in ("pretrained", "raw_pixels", "random_init"):
        m = report["models"][name]
        assert {"dci_disentanglement", "mig", "suff_class", "inv_mean"} <= m.keys(), name
    assert "infonce_mi_bound" not in report["models"]["raw_pixels"]
    assert (run / "eval" / "properties_importance.png").is_file()

    # the same command on an image folder's shards (no factors): exit 1, naming the missing field
    from PIL import Image

    from selfsup.pretrain.data.datasets import shapes

    src = shapes(12, size=16, seed=9)
    for i, (img, label) in enumerate(zip(src.images, src.labels, strict=True)):
        (tmp_path / "folder" / src.classes[label]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(tmp_path / "folder" / src.classes[label] / f"{i}.png")
    r = _run("shards", "--source", "folder", "--path", str(tmp_path / "folder"), "--size", "16",
             "--out", str(data / "plain"), "--quiet")
    assert r.returncode == 0, r.stdout + r.stderr
    r = _run("eval", "--checkpoint", str(run), "--train-shards", str(data / "plain"),
             "--test-shards", str(data / "plain"), "--protocols", "properties")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "properties protocol: train shards at" in r.stderr and "no 'factors' field" in r.stderr, r.stderr
