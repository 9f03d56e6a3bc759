"""Checkpoints under real damage: a damaged latest checkpoint with a good older one beside it
(``--resume auto`` falls back to the newest one that loads, loudly, and the run still ends bitwise
equal), nothing loadable at all (an error, never a silent start from zero), and a write that fails
because the disk is full (a real size-limited tmpfs: the previous ``latest`` stays valid and no
temporary file is left eating the space). The end-to-end fallback (a training run resumed past a
damaged latest checkpoint, still bitwise equal) is part of tests/test_faults.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from faultkit import size_limited_disk

from selfsup.pretrain.run.rundir import (
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    resume_state,
    save_checkpoint,
)


def _state(step: int, mib: float = 0.01) -> dict:
    return {"model": {"w": torch.full((int(mib * 2**18),), float(step))}, "step": step}


def test_damaged_latest_falls_back_to_the_newest_that_loads(tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    ck = tmp_path / "checkpoints"
    for s in (2, 4, 6):
        save_checkpoint(ck, s, _state(s), keep=0)
    data = (ck / "step-00000006.pt").read_bytes()
    (ck / "step-00000006.pt").write_bytes(data[: len(data) // 3])  # torn by a bad copy or disk
    (ck / "step-00000004.pt").write_bytes(b"\0" * 100)  # zeroed blocks
    path, state = resume_state(ck, "auto")
    assert path.name == "step-00000002.pt" and state["step"] == 2
    err = capfd.readouterr().err
    assert "WARNING" in err and "step-00000006.pt" in err and "step-00000004.pt" in err and "step-00000002.pt" in err
    assert "step-00000002.pt" in (ck / "recovery.log").read_text()
    # latest names a file that is gone: same fallback
    (ck / "step-00000006.pt").unlink()
    assert resume_state(ck, "auto")[0].name == "step-00000002.pt"
    # nothing loads: an error naming the folder, not a fresh start
    (ck / "step-00000002.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="none of the 2 checkpoint"):
        resume_state(ck, "auto")
    # an explicit --resume PATH is taken as given: no fallback
    with pytest.raises(CheckpointError, match="cannot load"):
        resume_state(ck, str(ck / "step-00000004.pt"))
    assert resume_state(tmp_path / "fresh", "auto") == (None, None)
    with pytest.raises(CheckpointError, match="already has checkpoints"):
        resume_state(ck, None)


@pytest.fixture
def small_disk(tmp_path: Path):
    """A real 2 MiB tmpfs (root only), unmounted and removed afterwards."""
    with size_limited_disk(tmp_path, "2m") as mnt:
        yield mnt


def test_disk_full_leaves_previous_latest_valid(small_disk: Path) -> None:
    ck = small_disk / "checkpoints"
    save_checkpoint(ck, 1, _state(1, mib=0.8))  # fits
    with pytest.raises(CheckpointError, match="No space left|no space left|file write failed") as e:
        save_checkpoint(ck, 2, _state(2, mib=1.5))  # does not
    assert "step-00000001.pt" in str(e.value)  # says what is still valid
    assert latest_checkpoint(ck).name == "step-00000001.pt"
    assert load_checkpoint(latest_checkpoint(ck))["step"] == 1
    assert sorted(p.name for p in ck.iterdir()) == ["latest", "step-00000001.pt"]  # no temp file left
    save_checkpoint(ck, 3, _state(3, mib=0.3), keep=1)  # space is back: writes again, prunes
    assert load_checkpoint(latest_checkpoint(ck))["step"] == 3
