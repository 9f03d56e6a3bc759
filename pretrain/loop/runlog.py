"""Where numbers go: ``metrics.jsonl`` (always), W&B (online/offline/off) and a progress bar.

Only the main process writes. ``metrics.jsonl`` is the machine-readable history that does not
depend on W&B: one JSON object per logged step. What it holds after a resume from a checkpoint at
step ``k``: the rows written before that checkpoint (all with ``step <= k``; the checkpoint records
how many, so a row logged at step ``k`` after it, like the end-of-epoch kNN that the resumed run
redoes, is not kept twice), as first written, then the resumed run's rows. The rows a killed run
had logged after its checkpoint are dropped when the resumed run starts,
by writing the kept rows to a temporary file and renaming it over the old one (a kill during the
resume leaves either the old or the new file, never a mix), and a torn last line left by a kill
mid-write is dropped too. So the file reads as one uninterrupted run, and after a bitwise-exact
resume it equals the uninterrupted run's file except for timings. The W&B run id is kept in the
checkpoint; ``selfsup.pretrain.loop.wandb_resume`` decides how W&B is made to agree (same run after a
clean stop; after a kill a linked new run with the kept history re-logged, or a rewound run).

Representation collapse: when a method logs ``collapse_std`` (``methods/base.py`` ``COLLAPSE_LOG``)
and it stays below ``log.collapse_threshold`` for ``log.collapse_patience`` consecutive logged
steps, the main process warns once (``CollapseWarning`` on stderr, and ``collapse_step`` in the
W&B summary). The method only returns tensors; this is where the numbers reach the host anyway.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any

from tqdm import tqdm

from selfsup.config import Config, to_dict
from selfsup.pretrain.methods.base import COLLAPSE_LOG
from selfsup.pretrain.run.rundir import RunDirError, checkpoint_dir, latest_checkpoint


class CollapseWarning(UserWarning):
    """The representation is collapsing: ``collapse_std`` stayed below the threshold."""


class CollapseWatch:
    """Counts consecutive logged values below ``threshold``; says so once, at ``patience``."""

    def __init__(self, threshold: float, patience: int) -> None:
        self.threshold, self.patience = threshold, patience
        self.below = 0
        self.warned_at: int | None = None

    def update(self, step: int, value: float) -> str | None:
        """The warning text the first time the run of low values reaches ``patience``, else None."""
        self.below = self.below + 1 if value < self.threshold else 0
        if self.warned_at is not None or self.below < self.patience or self.threshold <= 0:
            return None
        self.warned_at = step
        return (
            f"step {step}: {COLLAPSE_LOG} = {value:.3g} has stayed below log.collapse_threshold="
            f"{self.threshold:g} for {self.below} logged steps: the representation is collapsing "
            f"(every image maps to nearly the same output; ~1 is healthy). Check the method's "
            f"stop-gradient / predictor / target network, or lower optim.base_lr."
        )


class RunLog:
    def __init__(
        self,
        run_dir: Path,
        cfg: Config,
        is_main: bool,
        total_steps: int,
        start_step: int,
        wandb_id: str | None,
        keep_rows: int | None = None,
    ) -> None:
        self.is_main = is_main
        self.path = run_dir / "metrics.jsonl"
        self.wandb = None
        self.wandb_id = wandb_id
        self.bar = None
        self.run_dir, self.step, self.rows = run_dir, start_step, 0  # rows: lines in metrics.jsonl
        self.collapse = CollapseWatch(cfg.log.collapse_threshold, cfg.log.collapse_patience)
        if not is_main:
            return
        self._truncate_after(start_step, keep_rows)
        if cfg.log.wandb != "off":
            from selfsup.pretrain.loop.wandb_resume import open_run

            os.environ.setdefault("WANDB_SILENT", "true")
            kwargs = {"project": cfg.log.project, "entity": cfg.log.entity, "name": cfg.log.name or run_dir.name,
                      "tags": cfg.log.tags, "dir": str(run_dir), "mode": cfg.log.wandb, "config": to_dict(cfg)}  # fmt: skip
            self.wandb = open_run(kwargs, wandb_id, start_step, cfg.log.wandb_resume, run_dir, self.path)
            self.wandb_id = self.wandb.id
        if cfg.log.progress:
            # in a log file (SLURM, CI) a redraw every few seconds would bury the output
            interactive = sys.stderr.isatty()
            self.bar = tqdm(total=total_steps, initial=start_step, desc="pretrain", unit="step",
                            dynamic_ncols=True, mininterval=0.5 if interactive else 60)  # fmt: skip

    def _truncate_after(self, step: int, keep_rows: int | None) -> int:
        """Keep the rows written before the checkpoint: the first ``keep_rows`` (the checkpoint
        says how many there were), else those with ``step <= step``; atomically. Returns how many
        rows were dropped."""
        if not self.path.exists():
            return 0
        lines = [r for r in self.path.read_text().splitlines() if r.strip()]
        keep = [line for line, row in zip(lines, map(_parse, lines), strict=True) if row and row.get("step", 0) <= step]
        keep = keep[:keep_rows] if keep_rows is not None else keep
        self.rows = len(keep)
        if len(keep) == len(lines):
            return 0
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "w") as f:
                f.write("".join(r + "\n" for r in keep))
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise self._write_error(f"cannot rewrite {self.path} for the resume", e) from e
        os.replace(tmp, self.path)
        return len(lines) - len(keep)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.is_main:
            return
        row = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        if isinstance(row.get(COLLAPSE_LOG), (int, float)):
            message = self.collapse.update(step, float(row[COLLAPSE_LOG]))
            if message is not None:
                warnings.warn(message, CollapseWarning, stacklevel=2)
                self.summary({"collapse_step": step})
        self._append(json.dumps(row) + "\n", step)
        self.rows += 1
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)
        if self.bar is not None:
            shown = {k: f"{v:.4g}" for k, v in metrics.items() if k in ("loss", "lr", "img_per_s")}
            self.bar.set_postfix(shown, refresh=False)

    def _append(self, line: str, step: int) -> None:
        """One row, whole or not at all: a write that fails (a full disk, a quota) cuts the file
        back to its last complete row and stops the run with an error that says what is intact."""
        with open(self.path, "ab", buffering=0) as f:  # unbuffered: nothing left to fail at close
            end = f.seek(0, os.SEEK_END)
            try:
                data = line.encode()
                while data:
                    data = data[f.write(data):]
            except OSError as e:
                with contextlib.suppress(OSError):
                    f.truncate(end)
                raise self._write_error(f"cannot append step {step} to {self.path}", e) from e

    def _write_error(self, what: str, e: OSError) -> RunDirError:
        try:
            latest = latest_checkpoint(checkpoint_dir(self.run_dir))
        except RunDirError:
            latest = None
        free = shutil.disk_usage(self.run_dir).free / 2**20
        return RunDirError(
            f"{what} ({e.strerror or e}); {free:.1f} MiB free in {self.run_dir}. The last checkpoint, "
            f"{latest or 'none yet'}, is intact and metrics.jsonl ends with a complete row: free some "
            "space, then --resume auto continues from that checkpoint"
        )

    def advance(self, n: int = 1) -> None:
        self.step += n
        if self.bar is not None:
            self.bar.update(n)

    def image(self, key: str, path: Path, step: int) -> None:
        if self.wandb is not None:
            import wandb

            self.wandb.log({key: wandb.Image(str(path))}, step=step)

    def summary(self, values: dict[str, Any]) -> None:
        if self.wandb is not None:
            self.wandb.summary.update({k: _plain(v) for k, v in values.items()})

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.wandb is not None:
            self.wandb.finish()
            from selfsup.pretrain.loop.wandb_resume import mark_closed

            mark_closed(self.run_dir, self.wandb.id, self.step)
            self.wandb = None


def _parse(line: str) -> dict | None:
    try:
        return json.loads(line)
    except json.JSONDecodeError:  # the torn last line of a killed writer
        return None


def _plain(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v
