"""Periodic kNN during a 2-process run: each rank extracts the features of its own half of the
train and test sets (no rank loads a whole set, or idles at a barrier bounded by
train.dist_timeout_s while rank 0 does it all), and the logged accuracy is the one a single
process computes from the same weights."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from test_train import metrics, pretrain

from selfsup.pretrain.checkpoint import latest_checkpoint, load_checkpoint


@pytest.mark.slow
def test_two_ranks_share_the_periodic_knn(tmp_path: Path, small_shards: str) -> None:
    import torch

    from selfsup.config import load_config
    from selfsup.eval.features import extract_features
    from selfsup.eval.knn import knn_classify
    from selfsup.pretrain.methods import build_method
    from selfsup.pretrain.methods.base import DataInfo
    from selfsup.pretrain.stream import ShardSet, load_arrays

    run = tmp_path / "run"
    r = pretrain(run, small_shards, "train.max_steps=32", "eval.every_epochs=1", f"data.test={small_shards}",
                 "eval.knn_k=[5]", "log.wandb=off", nproc=2)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout + r.stderr
    done = sorted(re.findall(r"eval: rank (\d)/2 extracted (\d+) features", out))
    assert done == [("0", "512"), ("0", "512"), ("1", "512"), ("1", "512")], out  # half of each set per rank
    (row,) = [m for m in metrics(run) if "eval/knn_top1_k5" in m]
    assert row["step"] == 32 and row["eval/samples"] == 2048
    # the same number from one process, the whole sets in memory, the weights of that step
    cfg = load_config(run / "config.yaml")
    ss = ShardSet.open(small_shards)
    method = build_method(cfg, DataInfo(ss.channels, ss.image_size, tuple(ss.mean), tuple(ss.std)))
    method.load_state_dict(load_checkpoint(latest_checkpoint(run / "checkpoints"))["model"])
    x, y, _ = load_arrays(ss)
    f = extract_features(method.backbone, x, ss.mean, ss.std)
    want = knn_classify(f, y, f, y, k=(5,), temperature=cfg.eval.knn_temperature)["knn_top1_k5"]
    assert abs(row["eval/knn_top1_k5"] - want) <= 100 / 1024 + 1e-9, (row["eval/knn_top1_k5"], want)
    assert torch.isfinite(f).all()
