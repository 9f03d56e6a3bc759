"""The run directory, owned here: its layout, its checkpoints, and what a path a user gives means.

```
<run_dir>/
  config.yaml          the resolved config (selfsup.config)
  data_info.json       channels, image size, mean/std the method was built for
  checkpoints/         step-XXXXXXXX.pt (atomic writes) and ``latest`` naming the newest
  metrics.jsonl        one JSON object per logged step (pretrain/loop/runlog.py)
  wandb/               the W&B run, when log.wandb is not off
  reconstructions.png  autoencoder methods: what went in, what the model saw, what came out
  eval/                `selfsup eval` report, features cache, index, plots
  export/              `selfsup export` default output
```

A checkpoint is written to a temporary file, fsynced, and renamed into place; only then is the
``latest`` pointer (itself written the same way) moved to it. A kill at any moment therefore
leaves ``latest`` naming a complete file; a write that fails (a full disk) removes its temporary
file and raises an error saying which checkpoint is still valid. Files hold only tensors and plain
Python values, so they load with ``torch.load(weights_only=True)``: a checkpoint that needs
arbitrary pickle is refused.

Resuming (``resume_state``): ``auto`` takes the file ``latest`` names; if it is missing or does not
load (damaged on disk, a bad copy), the newest other checkpoint that loads is taken instead, with
a warning on stderr and a line in ``checkpoints/recovery.log``. When checkpoints exist but none
loads, that is an error: a run never silently starts again from zero.

Every problem with a run directory or checkpoint is a ``RunDirError`` naming the file and why.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from selfsup.config import Config, ConfigError, load_config, save_config
from selfsup.data_info import DataInfo

CONFIG_FILE = "config.yaml"
DATA_INFO_FILE = "data_info.json"
INIT_FILE = "init.json"  # model.init's key report (a run started from weights)
CHECKPOINTS = "checkpoints"
LATEST = "latest"
METRICS_FILE = "metrics.jsonl"
EVAL_DIR = "eval"
EXPORT_DIR = "export"
RECONSTRUCTIONS_FILE = "reconstructions.png"
# what marks an export folder (written by pretrain/run/export.py)
EXPORT_WEIGHTS = "backbone.safetensors"
EXPORT_CONFIG = "config.json"


class RunDirError(ValueError):
    """No run, checkpoint or export where one was asked for, or a file that cannot be trusted."""


CheckpointError = RunDirError  # the name the training loop and its callers use


# ---------------------------------------------------------------- checkpoints
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


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


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
            f"{path}: not a readable selfsup checkpoint (damaged, truncated, another kind of file, or "
            f"one that needs pickle): cannot load it safely; cannot read checkpoint: {type(e).__name__}: {e}"
        ) from e
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise RunDirError(f"{path}: not a selfsup checkpoint (expected a dict with 'model')")
    return state


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
    from selfsup.pretrain.data.shardset import rank_and_world

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


# ---------------------------------------------------------------- the run's description
def write_run_files(run_dir: str | Path, cfg: Config, info: DataInfo) -> None:
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / CONFIG_FILE)
    (run_dir / DATA_INFO_FILE).write_text(json.dumps(asdict(info), indent=1))


def write_init_report(run_dir: str | Path, report: Any, log: Any) -> None:
    """``model.init``'s key report (a ``pretrain.models.weights.InitReport``) into ``init.json``
    and, as counts, into the W&B summary (``log``: the run's RunLog)."""
    (Path(run_dir) / INIT_FILE).write_text(json.dumps(report.as_dict(), indent=1) + "\n")
    log.summary({"init/path": report.source, "init/sha256": report.sha256, "init/loaded": len(report.loaded),
                 "init/missing": len(report.missing), "init/unexpected": len(report.unexpected),
                 "init/shape_mismatch": len(report.shape), "init/adapted": len(report.adapted)})  # fmt: skip


def read_config(run_dir: str | Path) -> Config:
    path = Path(run_dir) / CONFIG_FILE
    try:
        return load_config(path)
    except ConfigError as e:
        raise RunDirError(f"{path}: {e}") from e


def read_data_info(run_dir: str | Path) -> DataInfo:
    """DataInfo from the run's ``data_info.json``."""
    path = Path(run_dir) / DATA_INFO_FILE
    raw = read_json(path, f"{path}: missing (it holds channels, image size, mean and std)")
    return data_info_from_dict(raw, str(path))


def read_json(path: Path, missing: str) -> Any:
    """The file's JSON; RunDirError ``missing`` when there is no file, or naming the file when it
    cannot be read or parsed (the run directory's and the export folder's JSON files)."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as e:
        raise RunDirError(missing) from e
    except (OSError, json.JSONDecodeError) as e:
        raise RunDirError(f"{path}: not readable JSON ({e})") from e


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
            load_checkpoint(p)  # is it one at all? that error first, not a config.yaml one
            raise RunDirError(
                f"{p}: a selfsup checkpoint, but not inside a run directory (it must sit in "
                f"<run>/{CHECKPOINTS}/ beside the run's {CONFIG_FILE} and {DATA_INFO_FILE})"
            )
        return Resolved("checkpoint", p, run, p)
    if (p / EXPORT_WEIGHTS).exists() or ((p / EXPORT_CONFIG).exists() and not (p / CONFIG_FILE).exists()):
        return Resolved("export", p, None, None)
    if (p / CONFIG_FILE).is_file():
        return Resolved("run", p, p, require_checkpoint(p))
    raise RunDirError(
        f"{p}: neither a run directory (no {CONFIG_FILE}) nor an export folder (no {EXPORT_WEIGHTS})"
    )
