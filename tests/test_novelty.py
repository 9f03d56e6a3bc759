"""Anomaly detection as the notes describe it: a normal-classes-only shard set (``--exclude-classes``),
the threshold picked on a validation half and never on the evaluated half, and eval's novelty rows
for an autoencoder run whose pretraining data left classes out."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from selfsup.config import load_config, save_config
from selfsup.data_info import DataInfo
from selfsup.eval.novelty import novelty_metrics, threshold_at_fpr, validation_split
from selfsup.eval.run import EvalError, EvalOptions, run_eval
from selfsup.launch.cli.main import main as cli
from selfsup.pretrain.build import build_method
from selfsup.pretrain.data.datasets import ArraySource, embedded
from selfsup.pretrain.data.shards import ShardOptions, write_shards
from selfsup.pretrain.data.stream import ShardSet, load_arrays


def test_threshold_comes_from_validation_only():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 250)
    scores = rng.normal(size=1000) + 3.0 * (labels == 3)  # class 3 is the anomaly
    m = novelty_metrics(scores, labels, [3], fpr=0.1, seed=0)
    val = validation_split(labels, 0.5, 0)
    assert val.sum() == 500 and all(val[labels == c].sum() == 125 for c in range(4))
    assert m["novelty_threshold"] == threshold_at_fpr(scores[val & (labels != 3)], 0.1)
    assert abs(m["novelty_fpr"] - 10.0) < 5.0 and m["novelty_tpr"] > 80 and m["novelty_auroc"] > 0.95
    assert m["novelty_eval_images"] == 500
    # changing only the evaluated half leaves the threshold alone (it was never looked at)
    shifted = np.where(val, scores, scores + 100.0)
    m2 = novelty_metrics(shifted, labels, [3], fpr=0.1, seed=0)
    assert m2["novelty_threshold"] == m["novelty_threshold"] and m2["novelty_fpr"] == 100.0
    with pytest.raises(ValueError, match="held-out classes"):
        novelty_metrics(scores, labels, [7])


def test_threshold_at_fpr_bounds_the_validation_false_positives():
    s = np.arange(100, dtype=float)
    tau = threshold_at_fpr(s, 0.05)
    assert (s > tau).mean() <= 0.05 and (s >= tau).mean() > 0.05


def test_shards_without_classes_record_them(tmp_path: Path):
    assert cli(["shards", "--source", "embedded", "--split", "test", "--out", str(tmp_path / "n"),
                "--exclude-classes", "8", "9", "--quiet"]) == 0  # fmt: skip
    ss = ShardSet.open(tmp_path / "n")
    _, labels, _ = load_arrays(ss)
    assert ss.manifest["exclude_classes"] == [8, 9] and len(ss.classes) == 10
    assert set(labels.tolist()) == set(range(8)) and ss.num_samples == 1600
    assert cli(["shards", "--out", str(tmp_path / "bad"), "--exclude-classes", "10", "--quiet"]) == 2


def write(root: Path, name: str, images, labels, classes, **kw) -> str:
    src = ArraySource(name, images, labels, classes)
    opts = ShardOptions(samples_per_shard=200, progress=False, **kw)
    write_shards(iter(src), root / name, classes, opts)
    return str(root / name)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ae", "vae"])
def test_eval_reports_novelty_for_a_normal_only_run(tmp_path: Path, name: str):
    tr, te = embedded("train"), embedded("test")
    train = write(tmp_path, "normal", tr.images[:300], tr.labels[:300], tr.classes, exclude_classes=(9,))
    test = write(tmp_path, "test", te.images[:400], te.labels[:400], te.classes)
    ss = ShardSet.open(train)
    info = DataInfo(ss.channels, ss.image_size, tuple(ss.mean), tuple(ss.std))
    run = tmp_path / "run"
    cfg = load_config(None, [f"run_dir={run}", f"method.name={name}", f"data.train={train}",
                             "model.backbone=resnet_small", "model.stem=cifar_s2", "model.width=0.25",
                             "method.vae.score_samples=1"])  # fmt: skip
    method = build_method(cfg, info)  # untrained: the protocol's plumbing is what is tested here
    (run / "checkpoints").mkdir(parents=True)
    save_config(cfg, run / "config.yaml")
    (run / "data_info.json").write_text(json.dumps(dataclasses.asdict(info)))
    torch.save({"model": method.state_dict(), "step": 1}, run / "checkpoints/step-00000001.pt")
    (run / "checkpoints/latest").write_text("step-00000001.pt\n")
    opts = EvalOptions(protocols=("anomaly",), baselines=(), batch_size=128)
    report = run_eval(run, train, test, tmp_path / "eval", opts)
    m = report["models"]["pretrained"]
    assert 0 <= m["novelty_auroc"] <= 1 and m["novelty_target_fpr"] == 5.0
    assert m["novelty_eval_images"] == 200 and np.isfinite(m["recon_score_mean"])
    notes = " ".join(report["meta"]["notes"])
    assert "ankle boot" in notes and ("negative ELBO" in notes) == (name == "vae")
    md = (tmp_path / "eval" / "report.md").read_text()
    assert "Novelty AUROC" in md and "threshold" in md
    with pytest.raises(EvalError, match="--fpr"):  # checked before anything is loaded
        run_eval(run, train, test, tmp_path / "eval3", dataclasses.replace(opts, novelty_fpr=1.5))
    if name == "vae":
        return
    # an explicit list overrides the manifest's
    report = run_eval(run, train, test, tmp_path / "eval2", dataclasses.replace(opts, held_out_classes=[0, 9]))
    assert report["models"]["pretrained"]["novelty_auroc"] != m["novelty_auroc"]
