"""End to end: a short real SimCLR pretraining on a fifth of the embedded data (2000 train / 500
test images), then `selfsup eval` on its run directory and on its export; the report files exist,
parse, and hold all three columns."""

from __future__ import annotations

import json
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
def test_pretrain_then_eval_run_dir_and_export(tmp_path: Path, embedded_fifth: dict) -> None:
    run = tmp_path / "run"
    r = _run("pretrain", f"data.train={embedded_fifth['train']}", f"run_dir={run}",
             "model.backbone=resnet_small", "model.stem=cifar_s2", "data.batch_size=64",
             "data.workers=1", "train.max_steps=30", "optim.name=sgd", "optim.base_lr=0.5",
             "log.progress=false", "method.simclr.proj_hidden=256", "method.simclr.proj_out=64")
    assert r.returncode == 0, r.stdout + r.stderr
    out = run / "eval"
    r = _run("eval", "--checkpoint", str(run), "--train-shards", embedded_fifth["train"],
             "--test-shards", embedded_fifth["test"], "--k", "20", "200")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "| Metric | pretrained | raw_pixels | random_init |" in r.stdout
    report = json.loads((out / "report.json").read_text())
    models = report["models"]
    assert models.keys() == {"pretrained", "raw_pixels", "random_init"}
    for m in models.values():
        assert 30.0 < m["linear_top1"] <= 100.0 and 30.0 < m["knn_top1_k200"] <= 100.0
        assert 0.5 < m["anomaly_knn_auroc"] <= 1.0
    assert "reconstruction" not in report["anomaly_per_class"]["pretrained"]  # SimCLR: no decoder
    assert (out / "report.md").read_text().startswith("# Evaluation report")
    assert (out / "embedding_pca.png").stat().st_size > 10_000

    # the export of the same run gives the same pretrained features, hence the same kNN numbers
    r = _run("export", "--run", str(run))
    assert r.returncode == 0, r.stdout + r.stderr
    r = _run("eval", "--checkpoint", str(run / "export"), "--train-shards",
             embedded_fifth["train"], "--test-shards", embedded_fifth["test"],
             "--protocols", "knn", "--no-baselines")
    assert r.returncode == 0, r.stdout + r.stderr
    exported = json.loads((run / "export" / "eval" / "report.json").read_text())["models"]
    assert exported.keys() == {"pretrained"}
    for key in ("knn_top1_k20", "knn_top1_k200"):
        assert exported["pretrained"][key] == pytest.approx(models["pretrained"][key], abs=0.051)
