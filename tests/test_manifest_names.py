"""A manifest may only name shards inside its own folder, and only regular files: ``../x``, an
absolute path and a FIFO each give a clear error naming the entry (a real FIFO made with
os.mkfifo: opening it for reading would block the reader for ever)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from faultkit import copy_set
from test_train import ENV, SMALL

from selfsup.pretrain.data.shards import MANIFEST
from selfsup.pretrain.data.stream import ShardError, ShardSet


def _rename_entry(folder: Path, index: int, name: str) -> None:
    m = json.loads((folder / MANIFEST).read_text())
    m["shards"][index]["file"] = name
    (folder / MANIFEST).write_text(json.dumps(m, indent=1))


def _open_error(folder: Path, **kw) -> str:
    """ShardSet.open's error, from a thread with a deadline (a hang is a failure, not a stuck suite)."""
    out: list = []

    def go() -> None:
        try:
            ShardSet.open(folder, **kw)
            out.append(None)
        except ShardError as e:
            out.append(str(e))

    t = threading.Thread(target=go, daemon=True)
    t.start()
    t.join(30)
    assert out, f"ShardSet.open({folder}) did not return within 30 s"
    assert out[0] is not None, f"{folder}: opened without an error"
    return out[0]


def test_outside_names_and_a_fifo_are_three_clear_errors(tmp_path: Path, small_shards: str) -> None:
    (tmp_path / "x").write_bytes(b"a file beside the set, outside its folder")
    cases = {"dotdot": "../x", "absolute": "/etc/passwd", "fifo": "fifo.tar"}
    errors = {}
    for case, name in cases.items():
        folder = copy_set(small_shards, tmp_path / case)
        _rename_entry(folder, 1, name)
        if case == "fifo":
            os.mkfifo(folder / name)
        errors[case] = _open_error(folder)
    assert "shards[1] file '../x' is a path with '..'" in errors["dotdot"], errors["dotdot"]
    assert "shards[1] file '/etc/passwd' is an absolute path" in errors["absolute"], errors["absolute"]
    assert "'fifo.tar' is a FIFO, not a regular file" in errors["fifo"], errors["fifo"]
    for e in errors.values():
        assert "manifest" in e
    # names are checked before any file: both bad entries of one manifest are listed, even with skip
    both = copy_set(small_shards, tmp_path / "both")
    _rename_entry(both, 0, "../../../../etc/passwd")
    _rename_entry(both, 3, "/etc/passwd")
    e = _open_error(both, on_bad_shard="skip")
    assert "shards[0] file '../../../../etc/passwd'" in e and "shards[3] file '/etc/passwd'" in e, e
    # a FIFO under on_bad_shard=skip is left out like a missing shard, never opened
    fifo = Path(tmp_path / "fifo")
    ss = ShardSet.open(fifo, on_bad_shard="skip")
    assert [s["file"] for s in ss.skipped] == ["fifo.tar"] and "FIFO" in ss.skipped[0]["reason"]


@pytest.mark.parametrize("name", ["sub/../../x", "./a.tar", "a//b.tar", ""])
def test_other_escapes_are_refused(tmp_path: Path, small_shards: str, name: str) -> None:
    folder = copy_set(small_shards, tmp_path / "set")
    _rename_entry(folder, 2, name)
    assert "shards[2]" in _open_error(folder)


def test_pretrain_names_the_entry(tmp_path: Path, small_shards: str) -> None:
    folder = copy_set(small_shards, tmp_path / "set")
    _rename_entry(folder, 0, "../x")
    cmd = [sys.executable, "-m", "selfsup.launch.cli", "pretrain", f"data.train={folder}", f"run_dir={tmp_path / 'run'}",
           *SMALL, "log.wandb=off", "train.max_steps=1"]  # fmt: skip
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 1 and "shards[0] file '../x'" in r.stdout, r.stdout + r.stderr
