"""``selfsup demo --compare --seeds N``: N real runs (train.seed and eval --seed = k), one table of
mean ± sd. The check reads every run's own eval report and recomputes each cell with numpy."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_demo_compare import TINY, selfsup_demo, write_small_shards  # noqa: E402

from selfsup.launch.demo.seeds import aggregate  # noqa: E402


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("seeds") / "cmp"
    write_small_shards(out / "data")
    proc, _ = selfsup_demo("--compare", "--methods", "ae", "--seeds", "2", "--out", str(out), *TINY)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    return out


@pytest.mark.slow
def test_every_cell_is_mean_and_sd_over_exactly_the_seed_runs(seeded: Path) -> None:
    result = json.loads((seeded / "seeds.json").read_text())
    assert result["seeds"] == [0, 1]
    reports = [json.loads((seeded / f"seed-{k}" / "ae" / "run" / "eval" / "report.json").read_text())["models"]
               for k in (0, 1)]  # fmt: skip
    for col, key in (("ae", "pretrained"), ("raw pixels", "raw_pixels")):
        for metric in ("linear_top1", "knn_top1_k20", "map@r"):
            values = [r[key][metric] for r in reports]
            cell = result["table"][col][metric]
            assert cell["n"] == 2 and cell["values"] == values
            assert cell["mean"] == pytest.approx(np.mean(values))
            assert cell["sd"] == pytest.approx(np.std(values, ddof=1))
    # the runs differ: the seed reached training (the pretrained features) and the eval
    assert reports[0]["pretrained"]["linear_top1"] != reports[1]["pretrained"]["linear_top1"]
    assert "±" in (seeded / "seeds.md").read_text()
    for k in (0, 1):  # each run's own record says which seed made it
        record = json.loads((seeded / f"seed-{k}" / "ae" / "pretrain.json").read_text())
        assert f"train.seed={k}" in record["settings"]["overrides"]


def test_a_metric_missing_from_one_run_is_left_out_and_columns_must_agree() -> None:
    runs = [{"m": {"a": 1.0, "b": 2.0}}, {"m": {"a": 3.0, "b": None}}]
    assert list(aggregate(runs)["m"]) == ["a"]
    with pytest.raises(Exception, match="different columns"):
        aggregate([{"m": {"a": 1.0}}, {"n": {"a": 1.0}}])


def test_bad_seed_arguments_are_errors_naming_them(tmp_path: Path) -> None:
    proc, _ = selfsup_demo("--seeds", "0", "--out", str(tmp_path / "x"), *TINY, timeout=120)
    assert proc.returncode == 1 and "--seeds must be >= 1" in proc.stderr
    proc, _ = selfsup_demo("--seeds", "2", "--out", str(tmp_path / "y"), *TINY, "train.seed=3", timeout=120)
    assert proc.returncode == 1 and "train.seed=3 and --seeds 2" in proc.stderr
