"""Atomic, resumable checkpoints in ``run_dir/checkpoints``.

A checkpoint is written to a temporary file, fsynced, and renamed into place; only then is the
``latest`` pointer (itself written the same way) moved to it. A kill at any moment therefore
leaves ``latest`` naming a complete file; a write that fails (a full disk) removes its temporary
file and raises ``CheckpointError`` saying which checkpoint is still valid. Files hold only tensors
and plain Python values, so they load with ``torch.load(weights_only=True)``: a checkpoint that
needs arbitrary pickle is refused.

Resuming (``resume_state``): ``auto`` takes the file ``latest`` names; if it is missing or does not
load (damaged on disk, a bad copy), the newest other checkpoint that loads is taken instead, with
a warning on stderr and a line in ``checkpoints/recovery.log``. When checkpoints exist but none
loads, that is an error: a run never silently starts again from zero.
"""

from __future__ import annotations

import os
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

LATEST = "latest"


class CheckpointError(RuntimeError):
    """No checkpoint where one was asked for, or a file that cannot be trusted."""


class _Writer:
    """A file that remembers the OSError of a failed write: torch.save turns ENOSPC into an
    opaque "unexpected pos" RuntimeError, and the user needs to read "No space left on device"."""

    def __init__(self, f) -> None:
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def _fsync_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    w = None
    try:
        with open(tmp, "wb") as f:
            w = _Writer(f)
            write(w)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)  # a half-written temp file would keep the disk full
        if w is not None and w.error is not None and w.error is not e:
            raise w.error from e
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save_checkpoint(ckpt_dir: str | Path, step: int, state: dict[str, Any], keep: int = 2) -> Path:
    """Write ``step-XXXXXXXX.pt`` atomically, point ``latest`` at it, keep the newest ``keep``."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    for stale in ckpt_dir.glob(".*.tmp-*"):  # left by a process killed mid-write: never a complete file
        stale.unlink(missing_ok=True)
    path = ckpt_dir / f"step-{step:08d}.pt"
    try:
        _fsync_write(path, lambda f: torch.save(state, f))
        _fsync_write(ckpt_dir / LATEST, lambda f: f.write(path.name.encode()))
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        try:
            valid = latest_checkpoint(ckpt_dir)
        except CheckpointError:
            valid = None
        free = shutil.disk_usage(ckpt_dir).free / 2**20
        raise CheckpointError(
            f"cannot write checkpoint {path} ({e}); {free:.1f} MiB free in {ckpt_dir}. "
            f"{LATEST} still names {valid.name if valid else 'no checkpoint'}, which is intact"
        ) from e
    if keep > 0:
        for old in sorted(ckpt_dir.glob("step-*.pt"))[:-keep]:
            old.unlink(missing_ok=True)
    return path


def latest_checkpoint(ckpt_dir: str | Path) -> Path | None:
    """The file ``latest`` names, or None when the run has no checkpoint yet."""
    pointer = Path(ckpt_dir) / LATEST
    if not pointer.is_file():
        return None
    path = pointer.parent / pointer.read_text().strip()
    if not path.is_file():
        raise CheckpointError(f"{pointer} names {path.name}, which does not exist")
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load with ``weights_only=True``; a truncated or foreign file is a CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors come in many types; name the file either way
        raise CheckpointError(f"cannot load checkpoint {path} safely (corrupt, or needs pickle): {e}") from e


def resume_state(ckpt_dir: str | Path, resume: str | None) -> tuple[Path | None, dict[str, Any] | None]:
    """(path, state) to resume from: ``resume`` is None (a fresh run: refuses a folder that has
    checkpoints), ``"auto"`` (the newest checkpoint that loads, see the module docstring) or a
    checkpoint path (taken as given). (None, None) when there is nothing to resume."""
    ckpt_dir = Path(ckpt_dir)
    files = sorted(ckpt_dir.glob("step-*.pt"), reverse=True)
    pointer = ckpt_dir / LATEST
    if resume is None:
        if files or pointer.is_file():
            raise CheckpointError(
                f"{ckpt_dir} already has checkpoints: pass --resume auto to continue, or choose a new run_dir"
            )
        return None, None
    if resume != "auto":
        state = load_checkpoint(resume)
        _check_state(state, Path(resume))
        return Path(resume), state
    if not files and not pointer.is_file():
        return None, None
    problems: list[str] = []
    named = ckpt_dir / pointer.read_text().strip() if pointer.is_file() else None
    if named is not None and named not in files:
        problems.append(f"{pointer} names {named.name}, which does not exist")
    for path in ([named] if named in files else []) + [f for f in files if f != named]:
        try:
            state = load_checkpoint(path)
            _check_state(state, path)
        except CheckpointError as e:
            problems.append(str(e))
            continue
        if problems:
            _warn(ckpt_dir, f"WARNING: the latest checkpoint cannot be used ({'; '.join(problems)}). "
                            f"Resuming from the newest checkpoint that loads: {path} (step {state['step']}).")  # fmt: skip
        return path, state
    raise CheckpointError(
        f"none of the {len(files)} checkpoint(s) in {ckpt_dir} loads ({'; '.join(problems)}); refusing to start "
        "again from zero: repair or move the folder away (a new run_dir starts afresh)"
    )


def _check_state(state: Any, path: Path) -> None:
    if not isinstance(state, dict) or not {"model", "step"} <= state.keys():
        raise CheckpointError(f"{path}: not a selfsup checkpoint (no model/step)")


def _warn(ckpt_dir: Path, message: str) -> None:
    """Loudly, once (rank 0): stderr and checkpoints/recovery.log."""
    from selfsup.pretrain.shardset import rank_and_world

    if rank_and_world()[0] != 0:
        return
    print(f"selfsup: {message}", file=sys.stderr, flush=True)
    with open(ckpt_dir / "recovery.log", "a") as f:
        f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")


def rng_state() -> dict[str, Any]:
    """This process's RNG states in weights_only-loadable form."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    random.setstate(_as_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(x: Any) -> Any:
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x
