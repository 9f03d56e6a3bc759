"""The demo: argument checks (fast) and the whole pipeline with a tiny budget (slow).

The end-to-end test runs ``selfsup demo`` exactly as a user does (a subprocess of the same
Python) and checks that every artefact it announces exists and parses: shards, checkpoint,
metrics, views grid, evaluation report, and an export that reproduces the checkpoint's features.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from PIL import Image

from selfsup.launch.cli.main import main as cli_main
from selfsup.launch.demo.command import DEFAULT_CONFIG, DemoError, resolve_processes
from selfsup.pretrain.run.export import load_backbone


def test_processes_argument():
    assert resolve_processes("3") == 3
    assert resolve_processes("auto") >= 1
    with pytest.raises(DemoError, match="--processes"):
        resolve_processes("many")
    with pytest.raises(DemoError, match="must be >= 1"):
        resolve_processes("0")


def test_missing_recipe_is_a_clear_error(tmp_path, capsys):
    code = cli_main(["demo", "--out", str(tmp_path), "--config", str(tmp_path / "no.yaml")])
    assert code == 1
    assert "recipe not found" in capsys.readouterr().err


def test_previous_run_is_not_overwritten_silently(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "keep.txt").write_text("x")
    assert cli_main(["demo", "--out", str(tmp_path)]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "run" / "keep.txt").is_file()


@pytest.mark.slow
def test_demo_end_to_end_with_tiny_budget(tmp_path):
    assert DEFAULT_CONFIG.is_file(), "configs/simclr_ae_demo.yaml is the demo's recipe"
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "selfsup.launch.cli", "demo", "--out", str(out),
         "--minutes", "0.1", "--processes", "2"],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]

    for split in ("train", "test"):
        manifest = json.loads((out / "data" / split / "manifest.json").read_text())
        assert manifest["num_samples"] == {"train": 10000, "test": 2000}[split]
    run_dir = out / "run"
    assert (run_dir / "checkpoints" / "latest").is_file()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses and all(math.isfinite(v) for v in losses)
    steps = [r["step"] for r in rows]
    assert steps == sorted(steps) and steps[-1] > 0
    assert list((run_dir / "wandb").glob("offline-run-*")), "W&B offline run missing"

    with Image.open(out / "views.png") as img:
        img.verify()

    report = json.loads((run_dir / "eval" / "report.json").read_text())
    assert report, "empty eval report"

    export = out / "export"
    meta = json.loads((export / "config.json").read_text())
    assert meta["method"] == "simclr_ae" and meta["channels"] == 1 and meta["image_size"] == 28
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(load_backbone(export)(x), load_backbone(run_dir)(x))

    for path in (out / "views.png", run_dir / "eval" / "report.json", export):
        assert str(path) in proc.stdout, f"demo did not print {path}"


def test_demo_adds_the_properties_protocol_when_its_shards_carry_factors(tmp_path):
    from selfsup.launch.demo.steps import eval_protocols
    from selfsup.pretrain.data.datasets import shapes
    from selfsup.pretrain.data.shards import ShardOptions, write_shards

    src = shapes(20, size=8)
    write_shards(iter(src), tmp_path / "f", src.classes, ShardOptions(progress=False), factors=src.factor_specs)
    write_shards(iter(src), tmp_path / "p", src.classes, ShardOptions(progress=False))
    assert eval_protocols(tmp_path / "f") == "linear,knn,retrieval,anomaly,plot,properties"
    assert eval_protocols(tmp_path / "p") == "linear,knn,retrieval,anomaly,plot"
