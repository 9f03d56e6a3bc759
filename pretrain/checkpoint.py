"""Atomic, resumable checkpoints in ``run_dir/checkpoints``.

A checkpoint is written to a temporary file, fsynced, and renamed into place; only then is the
``latest`` pointer (itself written the same way) moved to it. A kill at any moment therefore
leaves ``latest`` naming a complete file. Files hold only tensors and plain Python values, so they
load with ``torch.load(weights_only=True)``: a checkpoint that needs arbitrary pickle is refused.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

LATEST = "latest"


class CheckpointError(RuntimeError):
    """No checkpoint where one was asked for, or a file that cannot be trusted."""


def _fsync_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save_checkpoint(ckpt_dir: str | Path, step: int, state: dict[str, Any], keep: int = 2) -> Path:
    """Write ``step-XXXXXXXX.pt`` atomically, point ``latest`` at it, keep the newest ``keep``."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    path = ckpt_dir / f"step-{step:08d}.pt"
    _fsync_write(path, lambda f: torch.save(state, f))
    _fsync_write(ckpt_dir / LATEST, lambda f: f.write(path.name.encode()))
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
