"""``selfsup demo --compare``: every demo method through the demo's pipeline, one table.

The end-to-end tests run the real command in a subprocess with a tiny budget (2 steps of 32
images per method, one process) on small shard sets put in ``<out>/data`` beforehand (the demo
uses shards already there as they are), then read each method's own eval report independently
and check the comparison against it, the chart, and that a second run reuses what is finished.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from embedded_sets import write_every_kth
from PIL import Image

from selfsup.config import load_config
from selfsup.launch.demo.compare import CONFIGS, Entry, assign_baselines, demo_methods, pick_methods
from selfsup.pretrain.methods import METHODS

METRICS = ("linear_top1", "knn_top1_k20", "knn_top1_k200", "recall@1", "map@r",
           "anomaly_knn_auroc")  # fmt: skip
TINY = ["--processes", "1", "--wandb", "off", "train.max_steps=2", "data.batch_size=32",
        "log.progress=false"]  # fmt: skip


def selfsup_demo(*args: str, timeout: float = 900) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "selfsup.launch.cli", "demo", *args],
                          capture_output=True, text=True, timeout=timeout, check=False)  # fmt: skip
    return proc, time.monotonic() - start


def write_small_shards(data: Path) -> None:
    """Every 20th train and 8th test image of the embedded set (500 / 250, all classes)."""
    write_every_kth(data, {"train": 20, "test": 8})


@pytest.fixture(scope="module")
def compared(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One compare of simclr and ae, as a user runs it: {out, proc, seconds}."""
    out = tmp_path_factory.mktemp("compare") / "cmp"
    write_small_shards(out / "data")
    proc, seconds = selfsup_demo("--compare", "--methods", "simclr,ae", "--out", str(out), *TINY)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    return {"out": out, "proc": proc, "seconds": seconds}


def test_demo_methods_are_the_demo_recipes_of_registered_methods():
    expected = {p.name.removesuffix("_demo.yaml") for p in CONFIGS.glob("*_demo.yaml")
                if load_config(p).method.name in METHODS}  # fmt: skip
    found = demo_methods()
    assert set(found) == expected
    assert {"simclr", "ae", "dae", "mae"} <= set(found)  # dae and mae: the renamed recipes
    assert all(path.is_file() for path in found.values())


def test_all_methods_leave_out_distill_which_needs_a_teacher_unless_named():
    found = demo_methods()
    assert "distill" in found
    default = pick_methods(None, found)
    assert "distill" not in default and set(default) == set(found) - {"distill"}
    assert list(pick_methods("distill,simclr", found)) == ["distill", "simclr"]


def test_unknown_method_is_an_error_before_anything_runs(tmp_path):
    out = tmp_path / "cmp"
    proc, _ = selfsup_demo("--compare", "--methods", "simclr,no_such_method", "--out", str(out))
    assert proc.returncode != 0
    assert "no_such_method" in proc.stderr
    for name in demo_methods():
        assert name in proc.stderr, f"the error does not list '{name}': {proc.stderr}"
    assert not out.exists(), "nothing may run (or be written) for a bad --methods"


@pytest.mark.slow
def test_compare_table_holds_each_methods_own_report(compared):
    out = compared["out"]
    result = json.loads((out / "compare.json").read_text())
    assert result["columns"] == ["simclr", "ae", "raw pixels", "random init (resnet_small)"]
    reports = {m: json.loads((out / m / "run" / "eval" / "report.json").read_text())["models"]
               for m in ("simclr", "ae")}  # fmt: skip
    for m, models in reports.items():
        for k in METRICS:
            assert result["models"][m][k] == models["pretrained"][k], (m, k)
        record = json.loads((out / m / "pretrain.json").read_text())
        assert result["models"][m]["steps"] == record["steps"] == 2
        assert result["models"][m]["images_per_s"] > 0 and result["models"][m]["pretrain_s"] > 0
    # the baselines: computed once (same backbone), by the first method's eval, not by ae's
    assert set(reports["ae"]) == {"pretrained"}
    assert result["baselines_from"] == {"raw pixels": "simclr", "random init (resnet_small)": "simclr"}
    assert {"raw_pixels", "random_init"} <= set(reports["simclr"])
    for column, key in (("raw pixels", "raw_pixels"), ("random init (resnet_small)", "random_init")):
        assert {k: result["models"][column][k] for k in METRICS} == \
            {k: reports["simclr"][key][k] for k in METRICS}  # fmt: skip
    table = (out / "compare.md").read_text()
    header = next(line for line in table.splitlines() if line.startswith("| Metric"))
    assert header.count("raw pixels") == 1 and header.count("random init") == 1
    assert "| Metric | simclr | ae | raw pixels | random init (resnet_small) |" in compared["proc"].stdout


@pytest.mark.slow
def test_compare_chart_is_a_png(compared):
    png = compared["out"] / "compare.png"
    assert png.stat().st_size > 10_000
    with Image.open(png) as img:
        assert img.format == "PNG" and img.width > 400 and img.height > 200
        img.verify()
    with Image.open(png) as img:  # not a blank canvas: bars in several colours
        colours = np.asarray(img.convert("RGB")).reshape(-1, 3)
        assert len(np.unique(colours[::7], axis=0)) > 20


@pytest.mark.slow
def test_second_run_reuses_finished_methods_and_refuses_other_settings(compared):
    """Finished methods are reused, other settings are refused, a missing eval is redone."""
    out, first = compared["out"], compared["out"] / "compare.json"
    before = json.loads(first.read_text())
    proc, seconds = selfsup_demo("--compare", "--methods", "simclr,ae", "--out", str(out), *TINY)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    for m in ("simclr", "ae"):
        assert f"{m}: reused" in proc.stdout
    assert "pretrain (" not in proc.stdout and "evaluate (" not in proc.stdout
    assert seconds < compared["seconds"] / 2, (seconds, compared["seconds"])
    assert json.loads(first.read_text())["models"] == before["models"]

    longer = [o.replace("max_steps=2", "max_steps=3") for o in TINY]
    proc, _ = selfsup_demo("--compare", "--methods", "ae", "--out", str(out), *longer)
    assert proc.returncode == 1
    assert "other settings" in proc.stderr and "--overwrite" in proc.stderr

    # killed after ae's pretraining, before its eval wrote the report: only that eval runs again
    (out / "ae" / "run" / "eval" / "report.json").unlink()
    proc, _ = selfsup_demo("--compare", "--methods", "simclr,ae", "--out", str(out), *TINY)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "simclr: reused" in proc.stdout and "ae: evaluate (no baselines)" in proc.stdout
    assert "pretrain (" not in proc.stdout
    report = json.loads((out / "ae" / "run" / "eval" / "report.json").read_text())["models"]
    assert json.loads(first.read_text())["models"]["ae"]["linear_top1"] == \
        report["pretrained"]["linear_top1"]  # fmt: skip


def test_a_failing_method_stops_the_compare_naming_it_and_its_command(tmp_path):
    out = tmp_path / "cmp"
    for split in ("train", "test"):  # a shard set that claims to be there but is not readable
        (out / "data" / split).mkdir(parents=True)
        (out / "data" / split / "manifest.json").write_text("{}")
    proc, _ = selfsup_demo("--compare", "--methods", "ae", "--out", str(out), *TINY)
    assert proc.returncode == 1
    assert "method 'ae'" in proc.stderr
    assert "command:" in proc.stderr and "selfsup.launch.cli pretrain" in proc.stderr


def _entry(tmp: Path, name: str, backbone: str, report: dict | None) -> Entry:
    e = Entry(name, CONFIGS / f"{name}_demo.yaml", tmp / name, backbone, backbone, 32)
    if report is not None:
        e.report.parent.mkdir(parents=True)
        e.report.write_text(json.dumps({"models": {m: {} for m in report}}))
        e.state = "done"
    return e


def test_baselines_once_per_backbone_preferring_reports_that_hold_them(tmp_path):
    fresh = [_entry(tmp_path / "a", "ae", "resnet_small", None),
             _entry(tmp_path / "a", "mae", "vit_micro", None),
             _entry(tmp_path / "a", "simclr", "resnet_small", None)]  # fmt: skip
    cols = assign_baselines(fresh)
    assert {c: e.name for c, e in cols.items()} == {
        "raw pixels": "ae", "random init (resnet_small)": "ae", "random init (vit_micro)": "mae"}
    assert [e.baselines for e in fresh] == [("raw_pixels", "random_init"), ("random_init",), ()]

    # a resumed compare: simclr's finished report holds both baselines, so ae needs none
    resumed = [_entry(tmp_path / "b", "ae", "resnet_small", None),
               _entry(tmp_path / "b", "simclr", "resnet_small",
                      ["pretrained", "raw_pixels", "random_init"])]  # fmt: skip
    cols = assign_baselines(resumed)
    assert cols["raw pixels"].name == "simclr" and resumed[0].baselines == ()
    assert resumed[1].state == "done"

    # a finished report without the baselines its method now has to provide is evaluated again
    again = [_entry(tmp_path / "c", "ae", "resnet_small", ["pretrained"])]
    assign_baselines(again)
    assert again[0].state == "trained" and again[0].baselines == ("raw_pixels", "random_init")
