"""The run directory, owned here: its layout, its checkpoints, and what a path a user gives means.

```
<run_dir>/
  config.yaml          the resolved config (selfsup.config)
  data_info.json       channels, image size, mean/std the method was built for
  checkpoints/         step-XXXXXXXX.pt (atomic writes) and ``latest`` naming the newest
  metrics.jsonl        one JSON object per logged step (pretrain/runlog.py)
  wandb/               the W&B run, when log.wandb is not off
  reconstructions.png  autoencoder methods: what went in, what the model saw, what came out
  eval/                `selfsup eval` report, features cache, index, plots
  export/              `selfsup export` default output
```

A checkpoint is written to a temporary file, fsynced, and renamed into place; only then is the
``latest`` pointer (itself written the same way) moved to it. A kill at any moment therefore
leaves ``latest`` naming a complete file. Files hold only tensors and plain Python values, so they
load with ``torch.load(weights_only=True)``: a checkpoint that needs arbitrary pickle is refused.

Every problem with a run directory or checkpoint is a ``RunDirError`` naming the file and why.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from selfsup.config import Config, ConfigError, load_config, save_config
from selfsup.data_info import DataInfo

CONFIG_FILE = "config.yaml"
DATA_INFO_FILE = "data_info.json"
CHECKPOINTS = "checkpoints"
LATEST = "latest"
METRICS_FILE = "metrics.jsonl"
EVAL_DIR = "eval"
EXPORT_DIR = "export"
RECONSTRUCTIONS_FILE = "reconstructions.png"
# what marks an export folder (written by pretrain/export.py)
EXPORT_WEIGHTS = "backbone.safetensors"
EXPORT_CONFIG = "config.json"


class RunDirError(ValueError):
    """No run, checkpoint or export where one was asked for, or a file that cannot be trusted."""


CheckpointError = RunDirError  # the name the training loop and its callers use


# ---------------------------------------------------------------- checkpoints
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


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def save_checkpoint(ckpt_dir: str | Path, step: int, state: dict[str, Any], keep: int = 2) -> Path:
    """Write ``step-XXXXXXXX.pt`` atomically, point ``latest`` at it, keep the newest ``keep``."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    path = ckpt_dir / f"step-{step:08d}.pt"
    _fsync_write(path, lambda f: torch.save(state, f))
    _fsync_write(ckpt_dir / LATEST, lambda f: f.write(path.name.encode()))
    if keep > 0:
        for old in list_checkpoints(ckpt_dir)[:-keep]:
            old.unlink(missing_ok=True)
    return path


def list_checkpoints(ckpt_dir: str | Path) -> list[Path]:
    """Every ``step-*.pt`` in ``ckpt_dir``, oldest first."""
    return sorted(Path(ckpt_dir).glob("step-*.pt"))


def latest_checkpoint(ckpt_dir: str | Path) -> Path | None:
    """The file ``latest`` names, or None when the run has no checkpoint yet."""
    pointer = Path(ckpt_dir) / LATEST
    if not pointer.is_file():
        return None
    name = pointer.read_text().strip()
    path = pointer.parent / name
    if not name or not path.is_file():
        raise RunDirError(f"{pointer} names '{name}', which is not a file in {pointer.parent}")
    return path


def require_checkpoint(run_dir: str | Path) -> Path:
    """The run's latest checkpoint (``latest``, else the highest ``step-*.pt``), or an error."""
    ckdir = checkpoint_dir(run_dir)
    found = latest_checkpoint(ckdir) or next(reversed(list_checkpoints(ckdir)), None)
    if found is None:
        raise RunDirError(f"{run_dir}: no checkpoint (no {ckdir / LATEST} and no {ckdir}/step-*.pt)")
    return found


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load with ``weights_only=True``; a truncated, foreign or non-selfsup file is an error."""
    path = Path(path)
    if not path.is_file():
        raise RunDirError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors come in many types; name the file either way
        raise RunDirError(
            f"cannot read checkpoint {path} safely (corrupt, or needs pickle): {type(e).__name__}: {e}"
        ) from e
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise RunDirError(f"{path}: not a selfsup checkpoint (expected a dict with 'model')")
    return state


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


# ---------------------------------------------------------------- the run's description
def write_run_files(run_dir: str | Path, cfg: Config, info: DataInfo) -> None:
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / CONFIG_FILE)
    (run_dir / DATA_INFO_FILE).write_text(json.dumps(asdict(info), indent=1))


def read_config(run_dir: str | Path) -> Config:
    path = Path(run_dir) / CONFIG_FILE
    try:
        return load_config(path)
    except ConfigError as e:
        raise RunDirError(f"{path}: {e}") from e


def read_data_info(run_dir: str | Path) -> DataInfo:
    """DataInfo from the run's ``data_info.json``."""
    path = Path(run_dir) / DATA_INFO_FILE
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise RunDirError(f"{path}: missing (it holds channels, image size, mean and std)") from e
    except (OSError, json.JSONDecodeError) as e:
        raise RunDirError(f"{path}: not readable JSON ({e})") from e
    return data_info_from_dict(raw, str(path))


def data_info_from_dict(raw: Any, source: str) -> DataInfo:
    names = [f.name for f in dataclasses.fields(DataInfo)]
    if not isinstance(raw, dict) or any(n not in raw for n in names):
        raise RunDirError(f"{source}: expected an object with keys {', '.join(names)}")
    try:
        info = DataInfo(
            channels=int(raw["channels"]),
            image_size=int(raw["image_size"]),
            mean=tuple(float(v) for v in raw["mean"]),
            std=tuple(float(v) for v in raw["std"]),
        )
    except (TypeError, ValueError) as e:
        raise RunDirError(f"{source}: bad data info values ({e})") from e
    if info.channels <= 0 or info.image_size <= 0:
        raise RunDirError(f"{source}: channels and image_size must be > 0, got {raw}")
    if len(info.mean) != info.channels or len(info.std) != info.channels:
        raise RunDirError(f"{source}: mean/std need one value per channel ({info.channels})")
    return info


# ---------------------------------------------------------------- what a user's path means
@dataclass(frozen=True)
class Resolved:
    """A path a user gave: a run directory, one checkpoint inside one, or an export folder."""

    kind: str  # run | checkpoint | export
    path: Path
    run_dir: Path | None  # None for an export folder
    checkpoint: Path | None  # the checkpoint to use (None for an export folder)

    @property
    def home(self) -> Path:
        """Where outputs about this model go by default (eval/, export/)."""
        return self.run_dir if self.run_dir is not None else self.path


def resolve(path: str | Path) -> Resolved:
    """What ``path`` is, checked: a run dir (its latest checkpoint), a ``.pt`` in a run's
    ``checkpoints/``, or an export folder. Anything else is a RunDirError saying what was
    expected."""
    p = Path(path)
    if not p.exists():
        raise RunDirError(
            f"checkpoint not found: {p}: no such run directory, checkpoint file or export folder"
        )
    if p.is_file():
        run = p.parent.parent
        if p.parent.name != CHECKPOINTS or not (run / CONFIG_FILE).is_file():
            raise RunDirError(
                f"{p}: not a selfsup checkpoint inside a run directory (expected "
                f"<run>/{CHECKPOINTS}/step-*.pt beside <run>/{CONFIG_FILE})"
            )
        return Resolved("checkpoint", p, run, p)
    if (p / EXPORT_WEIGHTS).exists() or ((p / EXPORT_CONFIG).exists() and not (p / CONFIG_FILE).exists()):
        return Resolved("export", p, None, None)
    if (p / CONFIG_FILE).is_file():
        return Resolved("run", p, p, require_checkpoint(p))
    raise RunDirError(
        f"{p}: neither a run directory (no {CONFIG_FILE}) nor an export folder (no {EXPORT_WEIGHTS})"
    )
