"""benchmarks/gpu_check.py: the dry run (the same code on the CPU at tiny sizes) writes every part
with numbers, so the script a lent GPU node runs once cannot rot unnoticed; plus its pieces
(OOM as a result, failure and time-cap bookkeeping, the demo's figures) in isolation."""

from __future__ import annotations

import importlib
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
PARTS = ("demo", "views", "infonce", "train", "determinism", "dino", "multicrop")


@pytest.fixture(scope="module")
def gc():
    """The benchmark modules, imported the way the script imports them (benchmarks/ on the path)."""
    sys.path.insert(0, str(BENCH))
    try:
        yield importlib.import_module("gpu_check")
    finally:
        sys.path.remove(str(BENCH))


def number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def test_help_explains_every_part_and_figure(gc, capsys):
    with pytest.raises(SystemExit) as e:
        gc.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for word in (*PARTS, "--dry-run", "--parts", "--out", "host_syncs_per_batch", "overhead_pct",
                 "data_wait", "max_memory_allocated", "oom", "identical"):  # fmt: skip
        assert word in text, word


def test_unknown_part_is_an_error(gc, capsys):
    with pytest.raises(SystemExit):
        gc.main(["--dry-run", "--parts", "views,nope"])
    assert "nope" in capsys.readouterr().err


def test_out_of_memory_is_a_recorded_result(gc):
    common = importlib.import_module("_common")
    dev = common.Device(cuda=False)

    def oom() -> dict:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 GiB")

    assert common.catch_oom(oom, dev) == {
        "oom": True, "error": "CUDA out of memory. Tried to allocate 64.00 GiB"}  # fmt: skip
    with pytest.raises(ValueError):  # any other error is not swallowed
        common.catch_oom(lambda: (_ for _ in ()).throw(ValueError("bug")), dev)


def test_failed_part_is_recorded_and_the_next_still_runs(gc, tmp_path, monkeypatch):
    def broken(part, ctx):
        part.put("first", 1.0)
        raise RuntimeError("boom")

    def slow(part, ctx):
        part.put("done", 2.0)
        assert not part.due("needs a day", 86400)

    monkeypatch.setitem(gc.PARTS, "views", broken)
    monkeypatch.setitem(gc.PARTS, "infonce", slow)
    out = tmp_path / "r.json"
    assert gc.main(["--dry-run", "--parts", "views,infonce", "--out", str(out)]) == 1
    parts = json.loads(out.read_text())["parts"]
    assert parts["views"]["status"] == "failed"
    assert parts["views"]["results"] == {"first": 1.0}  # what it had before failing is kept
    assert parts["views"]["error"]["message"] == "boom"
    assert any("broken" in line for line in parts["views"]["error"]["traceback"])
    assert parts["infonce"]["status"] == "partial"
    assert parts["infonce"]["skipped"] == ["needs a day"]


def test_demo_figures_from_its_output_and_run_dir(gc, tmp_path):
    parts = importlib.import_module("gpu_parts")
    lines = [(0.0, "=== [1/5] pretrain simclr (1 process)"),
             (3.0, "    9000 images/s -> 2000 steps of 256 images (~51.2 epochs) in 1 min"),
             (64.5, "=== pretrain simclr (1 process): done in 64 s"),
             (70.0, "| Metric | pretrained | raw_pixels |"), (70.0, "|---|---:|---:|")]  # fmt: skip
    run = tmp_path / "run"
    (run / "eval").mkdir(parents=True)
    (run / "eval" / "report.json").write_text(json.dumps({"models": {"pretrained": {"knn": 80}}}))
    rows = [{"step": 10, "loss": 5.0, "img_per_s": 100, "data_wait": 0.5},
            {"step": 20, "loss": 4.0, "img_per_s": 9000, "data_wait": 0.1}]  # fmt: skip
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    res = parts.demo_figures(lines, tmp_path)
    assert res["stages"] == [{"stage": "pretrain simclr (1 process)", "seconds": 64.5, "printed_s": 64}]
    assert res["started_at_s"] == {"pretrain simclr (1 process)": 0.0}
    assert res["calibration"] == {"img_per_s": 9000, "steps": 2000, "batch": 256}
    assert res["table"] == {"pretrained": {"knn": 80}}
    assert res["table_md"].startswith("| Metric")
    assert res["pretrain"] == {"steps": 20, "final_loss": 4.0, "img_per_s_median": 9000,
                               "data_wait_mean": 0.1}  # fmt: skip


@pytest.mark.slow
def test_dry_run_writes_every_part_with_numbers(tmp_path):
    """~40-60 s on 2 busy cores: the seven parts at tiny sizes on the CPU, as one user command."""
    out = tmp_path / "dry.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH / "gpu_check.py"), "--dry-run", "--quiet", "--out", str(out),
         "--tmp", str(tmp_path)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    data = json.loads(out.read_text())
    assert data["meta"]["environment"]["device"] == "cpu"
    parts = data["parts"]
    assert list(parts) == list(PARTS)
    for name, part in parts.items():
        assert part["status"] == ("partial" if name == "demo" else "ok"), (name, part)
        assert number(part["seconds"])
    r = parts["demo"]["results"]  # the real `selfsup demo`, stopped by its 6-s cap
    assert r["exit_code"] is None and r["started_at_s"]
    assert all(number(t) for t in r["started_at_s"].values())
    for size in ("16px", "32px", "64px"):
        v = parts["views"]["results"][size]
        for key in ("device_ms_per_batch", "device_source_img_s", "loader_to_device_img_s",
                    "pil_img_s", "pil_worker_cpu_s_per_1k"):  # fmt: skip
            assert number(v[key]), (size, key)
        assert v["params_on_device"] is True
        assert v["host_syncs_per_batch"] is None  # counted on CUDA only
    for n in ("N=256", "N=512", "N=1024"):
        row = parts["infonce"]["results"][n]
        for mode in ("chunked", "plain"):
            assert number(row[mode]["ms"]) and number(row[mode]["peak_mib"]), (n, mode)
        assert row["loss_rel_diff"] < 1e-5
    t = parts["train"]["results"]
    for key in ("resnet18_32px eager", "resnet50_224px eager",
                "resnet18_32px torch.compile(eager)"):  # fmt: skip
        for fig in ("full_img_s", "bare_img_s", "overhead_pct", "full_peak_mib", "bare_peak_mib"):
            assert number(t[key][fig]), (key, fig)
    assert number(t["resnet18_32px eager"]["views_ms"])
    assert number(t["resnet18_32px torch.compile(eager)"]["compile_s"])
    loop = t["resnet18_32px selfsup pretrain"]
    assert number(loop["img_s"]) and 0 <= loop["data_wait"] <= 1
    for key in ("vit_s16_224px", "vit_s16_224px_ibot_koleo"):  # the DINO multi-crop step, bf16
        row = parts["dino"]["results"][key]
        assert number(row["ms"]) and number(row["img_s"]) and row["loss_finite"] is True, row
    m = parts["multicrop"]["results"]  # DINO's multi-crop views; each view op eager vs compiled
    assert number(m["views"]["ms"]) and m["views"]["crops_per_image"] == 10
    assert m["views"]["params_on_device"] is True and m["views"]["host_syncs_per_batch"] is None
    for op in ("crop_flip", "jitter", "blur", "apply"):
        assert number(m["compile"][op]["speedup"]) and number(m["compile"][op]["compile_s"]), op
    d = parts["determinism"]["results"]["two runs"]
    assert len(d["loss_abs_diff_per_step"]) == d["steps"]
    assert d["identical"] is True  # on CPU training is deterministic
