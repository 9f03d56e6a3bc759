"""``selfsup eval`` / ``selfsup export`` given a file that is not a checkpoint say so, instead of
complaining about a config.yaml the user never mentioned."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch


def test_eval_cli_on_a_file_that_is_not_a_checkpoint(tmp_path: Path, small_shards: str) -> None:
    (tmp_path / "notes.pt").write_text("not a checkpoint\n")
    r = subprocess.run([sys.executable, "-m", "selfsup.launch.cli", "eval", "--checkpoint", str(tmp_path / "notes.pt"),
                        "--train-shards", small_shards, "--test-shards", small_shards],
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 1, r.stdout + r.stderr
    assert "notes.pt: not a readable selfsup checkpoint" in r.stderr and "config.yaml" not in r.stderr, r.stderr


def test_load_paths_name_what_is_wrong_with_the_file(tmp_path: Path) -> None:
    from selfsup.eval.run import EvalError, load_model
    from selfsup.pretrain.run.export import ExportError, read_run

    (tmp_path / "notes.pt").write_text("not a checkpoint\n")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")  # a torch file, but not ours
    torch.save({"model": {"backbone.w": torch.zeros(1)}, "step": 3}, tmp_path / "step-00000003.pt")
    for name in ("notes.pt", "other.pt"):
        with pytest.raises(EvalError, match=f"{name}: not a (readable )?selfsup checkpoint") as e:
            load_model(tmp_path / name)
        assert "config.yaml" not in str(e.value)
        with pytest.raises(ExportError, match="not a (readable )?selfsup checkpoint"):  # selfsup export --run FILE
            read_run(tmp_path / name)
    with pytest.raises(EvalError, match="a selfsup checkpoint, but not inside a run directory"):
        load_model(tmp_path / "step-00000003.pt")
