"""The eval orchestration: protocols on plain arrays, the report on a run directory (pretrained vs raw
pixels vs random init), --query, and clear errors for bad checkpoints and bad shards."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from selfsup.config import load_config, save_config
from selfsup.data_info import DataInfo
from selfsup.eval.run import EvalError, EvalOptions, evaluate_features, run_eval
from selfsup.launch.cli.main import main as cli
from selfsup.pretrain.build import build_method
from selfsup.pretrain.data.datasets import ArraySource, embedded
from selfsup.pretrain.data.shards import ShardOptions, write_shards
from selfsup.pretrain.data.stream import ShardSet

FAST = EvalOptions(knn_k=(5, 20), plot_points=200, probe_weight_decays=(1e-1, 1e-3))
RUN = ["model.backbone=resnet_small", "model.stem=cifar_s2", "model.width=0.5", "method.name=dae"]


def _write(root: Path, name: str, images: np.ndarray, labels: np.ndarray, classes: list[str]) -> str:
    src = ArraySource(name, images, labels, classes)
    write_shards(iter(src), root / name, classes, ShardOptions(samples_per_shard=200, progress=False))
    return str(root / name)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Small embedded subsets as shard sets, plus deliberately bad ones."""
    root = tmp_path_factory.mktemp("evaldata")
    tr, te = embedded("train"), embedded("test")
    out = {
        "train": _write(root, "train", tr.images[:300], tr.labels[:300], tr.classes),
        "test": _write(root, "test", te.images[:100], te.labels[:100], te.classes),
    }
    one = te.labels == te.labels[0]
    out["one_class"] = _write(root, "one_class", te.images[one][:50], te.labels[one][:50], te.classes)
    out["unlabelled"] = _write(root, "unlabelled", te.images[:50], -np.ones(50, np.int64), [])
    rgb = np.repeat(te.images[:50], 3, axis=-1)
    out["rgb"] = _write(root, "rgb", rgb, te.labels[:50], te.classes)
    big = np.kron(te.images[:50], np.ones((1, 2, 2, 1), np.uint8))
    out["big"] = _write(root, "big", big, te.labels[:50], te.classes)
    return out


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, data: dict[str, str]) -> Path:
    """A run directory as the trainer writes it, holding an (untrained) DAE: a real method with
    reconstruct(), so both anomaly scores run."""
    run = tmp_path_factory.mktemp("run")
    ss = ShardSet.open(data["train"])
    info = DataInfo(ss.channels, ss.image_size, tuple(ss.mean), tuple(ss.std))
    cfg = load_config(None, [f"run_dir={run}", *RUN])
    torch.manual_seed(1234)  # not the random-init baseline's seed: the columns must differ
    method = build_method(cfg, info)
    (run / "checkpoints").mkdir()
    save_config(cfg, run / "config.yaml")
    (run / "data_info.json").write_text(json.dumps(dataclasses.asdict(info)))
    torch.save({"model": method.state_dict(), "step": 1}, run / "checkpoints/step-00000001.pt")
    (run / "checkpoints/latest").write_text("step-00000001.pt\n")
    return run


def test_evaluate_features_on_plain_arrays():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(4, 12)) * 3
    ytr, yte = rng.integers(0, 4, 300), rng.integers(0, 4, 100)
    xtr = centers[ytr] + rng.normal(size=(300, 12))
    xte = centers[yte] + rng.normal(size=(100, 12))
    opts = EvalOptions(protocols=("linear", "knn", "retrieval", "anomaly"), knn_k=(10,),
                       index="hnsw")
    m, extras = evaluate_features(xtr, ytr, xte, yte, opts, num_classes=4)
    assert m["linear_top1"] > 90 and m["knn_top1_k10"] > 90 and m["recall@1"] > 90
    assert 90 < m["approx_recall@10"] <= 100
    assert set(extras["anomaly_knn"]) == {0, 1, 2, 3} and m["anomaly_knn_auroc"] > 0.9
    assert "linear_top5" not in m  # only 4 classes
    with pytest.raises(EvalError, match="unknown protocol"):
        EvalOptions(protocols=("bogus",)).check()


@pytest.mark.slow
def test_full_report_with_linear_probe(run_dir, data, tmp_path):
    out = tmp_path / "eval"
    run_eval(run_dir, data["train"], data["test"], out, FAST)
    saved = json.loads((out / "report.json").read_text())
    assert saved["models"].keys() == {"pretrained", "raw_pixels", "random_init"}
    for name, m in saved["models"].items():
        for key in ("linear_top1", "linear_top5", "linear_weight_decay", "knn_top1_k20", "map@r"):
            assert key in m, (name, key)
        assert 10.0 < m["linear_top1"] <= 100.0
        assert m["linear_weight_decay"] in FAST.probe_weight_decays
    assert "Linear probe top-1 (%)" in (out / "report.md").read_text()


def test_report_on_run_dir_with_baselines_and_query(run_dir, data, tmp_path, capsys):
    out = tmp_path / "eval"
    opts = dataclasses.replace(FAST, protocols=("knn", "retrieval", "anomaly", "plot"))
    report = run_eval(run_dir, data["train"], data["test"], out, opts)
    saved = json.loads((out / "report.json").read_text())
    assert saved["models"].keys() == {"pretrained", "raw_pixels", "random_init"}
    for name, m in saved["models"].items():
        for key in ("knn_top1_k5", "knn_top1_k20", "knn_top5_k20", "recall@1", "recall@10",
                    "map@r", "anomaly_knn_auroc"):
            assert key in m, (name, key)
        assert "linear_top1" not in m
        assert 10.0 < m["knn_top1_k20"] <= 100.0  # far above chance even untrained
        assert m["recall@1"] <= m["recall@5"] <= m["recall@10"]
        assert 0.0 <= m["anomaly_knn_auroc"] <= 1.0
    assert saved["models"]["pretrained"] != saved["models"]["random_init"]
    assert saved["models"]["raw_pixels"]["feature_dim"] == 784
    recon = saved["anomaly_per_class"]["pretrained"]["reconstruction"]
    assert set(recon) == {str(c) for c in range(10)}
    assert all(0.0 <= v <= 1.0 for v in recon.values())
    assert "pretrained (reconstruction)" in (out / "report.md").read_text()
    assert report["meta"]["weights_hash"] == saved["meta"]["weights_hash"]
    md = (out / "report.md").read_text()
    assert "| Metric | pretrained | raw_pixels | random_init |" in md
    assert "kNN top-1, k=20 (%)" in md and "embedding_pca.png" in md
    assert (out / "embedding_pca.png").stat().st_size > 10_000
    assert (out / "index" / "index.faiss").is_file()
    assert len(list((out / "features").glob("features-*.npy"))) == 2  # train + test, pretrained

    # --query: the nearest item of a training image is itself (similarity 1)
    ss = ShardSet.open(data["train"])
    from selfsup.pretrain.data.stream import load_arrays

    images, labels, keys = load_arrays(ss)
    from PIL import Image

    Image.fromarray(images[3, 0].numpy()).save(tmp_path / "q.png")
    capsys.readouterr()
    rc = cli(["eval", "--checkpoint", str(run_dir), "--out", str(out), "--query",
              str(tmp_path / "q.png"), "--topk", "4"])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    line = printed.splitlines()[1]
    first = line.split()
    assert first[0] == "1" and float(first[1]) == pytest.approx(1.0, abs=1e-4)
    assert first[-1] == keys[3] and ss.classes[int(labels[3])] in line
    assert (out / "query-q.png").stat().st_size > 2000


@pytest.mark.parametrize(
    ("shards", "message"),
    [
        ("one_class", "single-class test set"),
        ("unlabelled", "have no labels"),
        ("rgb", "channel mismatch"),
        ("big", "size mismatch"),
    ],
)
def test_bad_shards_are_clear_errors(run_dir, data, tmp_path, shards, message):
    with pytest.raises(EvalError, match=message):
        run_eval(run_dir, data["train"], data[shards], tmp_path / "e", FAST)


def test_bad_checkpoints_are_clear_errors(run_dir, data, tmp_path, capsys):
    with pytest.raises(EvalError, match="checkpoint not found"):
        run_eval(tmp_path / "nope", data["train"], data["test"], tmp_path / "e", FAST)
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("config.yaml", "data_info.json"):
        (broken / name).write_text((run_dir / name).read_text())
    (broken / "checkpoints").mkdir()
    (broken / "checkpoints/step-00000001.pt").write_bytes(b"not a checkpoint")
    (broken / "checkpoints/latest").write_text("step-00000001.pt")
    rc = cli(["eval", "--checkpoint", str(broken), "--train-shards", data["train"],
              "--test-shards", data["test"], "--out", str(tmp_path / "e")])
    err = capsys.readouterr().err
    assert rc == 1 and "cannot load checkpoint" in err and "step-00000001.pt" in err


def test_resize_option_allows_other_sizes(run_dir, data, tmp_path):
    opts = EvalOptions(protocols=("knn",), baselines=(), knn_k=(5,), resize=True, cache=False)
    report = run_eval(run_dir, data["train"], data["big"], tmp_path / "e", opts)
    assert 0 <= report["models"]["pretrained"]["knn_top1_k5"] <= 100


def test_help_teaches():
    r = subprocess.run([sys.executable, "-m", "selfsup.launch.cli", "eval", "--help"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0
    for word in ("--checkpoint", "--query", "mAP@R", "random initialisation", "examples:"):
        assert word in r.stdout, word


def test_report_goes_to_active_wandb_run(tmp_path, monkeypatch):
    import wandb

    from selfsup.eval.report import write_report

    monkeypatch.setenv("WANDB_MODE", "offline")
    run = wandb.init(project="selfsup-test", dir=str(tmp_path))
    try:
        models = {"pretrained": {"knn_top1_k20": 81.5}, "raw_pixels": {"knn_top1_k20": 78.0}}
        write_report({"meta": {}, "models": models}, tmp_path / "eval")
        assert run.summary["eval/pretrained/knn_top1_k20"] == 81.5
        assert run.summary["eval/raw_pixels/knn_top1_k20"] == 78.0
    finally:
        run.finish()
    assert json.loads((tmp_path / "eval" / "report.json").read_text())["models"] == models
    assert list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))


def test_report_without_a_wandb_run_does_not_import_wandb(tmp_path):
    # an eval outside a W&B run (an export, log.wandb=off) writes its report without importing wandb
    # (~1 s per eval); the planted variant imports it to ask wandb.run, as the report once did
    code = """
import sys
from pathlib import Path
from selfsup.eval import report
if sys.argv[2] == "planted":
    report.log_wandb = lambda r: __import__("wandb").run is not None
report.write_report({"meta": {}, "models": {"pretrained": {"knn_top1_k20": 81.5}}}, Path(sys.argv[1]))
print("wandb" in sys.modules)
"""
    for variant, imported in (("ours", "False"), ("planted", "True")):
        r = subprocess.run([sys.executable, "-c", code, str(tmp_path / variant), variant],
                           capture_output=True, text=True, timeout=120)  # fmt: skip
        assert r.returncode == 0, r.stderr[-2000:]
        assert r.stdout.split()[-1] == imported, variant
        assert (tmp_path / variant / "report.json").is_file()
