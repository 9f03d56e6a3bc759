"""Which W&B run a (re)started training process logs to, so that W&B's history agrees with
``metrics.jsonl`` after a resume.

``metrics.jsonl`` after a resume from a checkpoint at step ``k`` holds the rows ``step <= k`` and
then the resumed run's rows (``selfsup.pretrain.loop.runlog``). W&B keeps a run's history on its side
and ignores a re-logged step that is not beyond the last one it has, so continuing the same run
after a kill would keep the dead process's rows past ``k`` and drop the resumed ones. Worse, the
dead process's last records may never have reached W&B: wandb 0.31 writes an offline run's
``.wandb`` file every ``x_transaction_log_flush_interval`` = 15 s and a SIGKILL loses the rest
(checked: a run killed 3 s after ``wandb.init`` leaves a 7-byte file, header only), and online it
streams on an interval too. So:

* the previous process closed its W&B run (a clean SIGUSR1/SIGTERM stop, a requeue; RunLog marks
  this in ``run_dir/.wandb-closed``) at the checkpoint's step: the same run id,
  ``resume="allow"``: one W&B run for the whole training.
* otherwise (a kill, a crash), per ``log.wandb_resume``:
  - ``new`` (what ``auto`` does offline): a NEW run whose config carries
    ``resumed_from: {run_id, step}`` (the link to the old run) and into which the kept history
    (every ``metrics.jsonl`` row ``<= k``) is re-logged before training goes on, so the new run
    alone holds exactly the history ``metrics.jsonl`` holds, whatever the dead process flushed.
  - ``rewind`` (what ``auto`` does online): the same run id, rewound with
    ``wandb.init(resume_from="<id>?_step=<k>")``: W&B truncates the run after step ``k`` and
    appends from there; rows the dead process never delivered stay missing. Offline, wandb
    accepts this and records the rewind point in the new offline run's RunRecord
    (``branch_point``: run, ``_step``, ``k``), applied when the offline runs are synced in order;
    a server that refuses the rewind gets the ``new`` behaviour, with a warning on stderr.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

CLOSED = ".wandb-closed"


def open_run(init_kwargs: dict[str, Any], wandb_id: str | None, step: int, policy: str, run_dir: Path,
             history: Path):  # fmt: skip
    """``wandb.init`` for this process per the rules above; returns the run."""
    import wandb

    marker = run_dir / CLOSED
    closed = json.loads(marker.read_text()) if marker.is_file() else {}
    marker.unlink(missing_ok=True)  # from here on this process owns the run: a kill leaves no mark
    if wandb_id is None or closed == {"run_id": wandb_id, "step": step}:
        return wandb.init(**init_kwargs, id=wandb_id, resume="allow")
    if policy == "auto":
        policy = "new" if init_kwargs.get("mode") == "offline" else "rewind"
    if policy == "rewind":
        try:
            return wandb.init(**init_kwargs, resume_from=f"{wandb_id}?_step={step}")
        except Exception as e:  # noqa: BLE001 - a server without rewind: say so, use a linked new run
            print(f"selfsup: warning: W&B refused to rewind run {wandb_id} to step {step} ({e}); "
                  "starting a new run linked to it (config resumed_from) with the history re-logged",
                  file=sys.stderr, flush=True)  # fmt: skip
    config = {**init_kwargs.get("config", {}), "resumed_from": {"run_id": wandb_id, "step": step}}
    run = wandb.init(**{**init_kwargs, "config": config}, notes=f"resumed from W&B run {wandb_id} at step {step}")
    for row in read_rows(history):
        run.log({k: _number(v) for k, v in row.items() if k != "step"}, step=row["step"])
    return run


def mark_closed(run_dir: Path, wandb_id: str, step: int) -> None:
    """Called after ``run.finish()``: the W&B run holds every row up to ``step``."""
    (run_dir / CLOSED).write_text(json.dumps({"run_id": wandb_id, "step": step}))


def read_rows(path: Path) -> list[dict]:
    """The complete rows of a metrics.jsonl (a torn last line from a killed writer is left out)."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def _number(v: Any) -> Any:
    """metrics.jsonl writes non-finite floats as strings ("nan"); W&B gets the float back."""
    if isinstance(v, str) and v in ("nan", "inf", "-inf"):
        return float(v)
    return v
