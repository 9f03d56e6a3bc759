"""After a kill -9 and ``--resume auto``, what ``metrics.jsonl`` and W&B hold (offline W&B, read
back from the ``.wandb`` files the runs wrote; see tests/wandb_records.py). The end-to-end case,
five seeded kills of a real training run, is in tests/test_faults.py.

A run killed after its checkpoint had logged rows past it. On resume ``metrics.jsonl`` keeps the
rows up to the checkpoint step, drops the dead run's later rows (and a torn last line), and reads
as one run. W&B must agree: the resumed process rewinds the same W&B run to the checkpoint step
(``resume_from``), or with ``log.wandb_rewind=false`` opens a new run linked to the old one with
the kept history re-logged."""

from __future__ import annotations

import json
import time
from pathlib import Path

from test_train import metrics
from wandb_records import complete, history, run_record


def _offline_files(run: Path) -> list[Path]:
    return sorted(run.glob("wandb/offline-run-*/run-*.wandb"))


def test_resume_drops_rows_past_the_checkpoint_and_a_torn_line(tmp_path: Path) -> None:
    """What a kill leaves in metrics.jsonl (rows past the checkpoint, a half-written last line),
    and what the resumed run's RunLog makes of it. The end-to-end kill, resume and W&B history
    check runs in tests/test_faults.py (seeded SIGKILLs, 1 process, offline W&B)."""
    rows = [f'{{"step": {s}, "loss": {s / 10}}}' for s in range(1, 8)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(rows) + '\n{"step": 8, "lo')
    before = (tmp_path / "metrics.jsonl").stat().st_ino
    log = _runlog(tmp_path, "log.wandb=off", start=4, wandb_id=None)
    log.close()
    assert (tmp_path / "metrics.jsonl").read_text() == "\n".join(rows[:4]) + "\n"
    assert (tmp_path / "metrics.jsonl").stat().st_ino != before  # replaced by a rename, not rewritten in place
    assert not list(tmp_path.glob(".metrics.jsonl.tmp-*"))


def _config(path: Path) -> dict:
    return {item.key: json.loads(item.value_json) for item in run_record(path).config.update}


def _old_run(tmp_path: Path, steps: int) -> str:
    """A real offline W&B run that logged ``steps`` rows, mirrored in metrics.jsonl, then died."""
    import wandb

    old = wandb.init(project="selfsup", dir=str(tmp_path), mode="offline")
    for s in range(1, steps + 1):
        old.log({"loss": 10.0 - s}, step=s)
        with open(tmp_path / "metrics.jsonl", "a") as f:
            f.write(f'{{"step": {s}, "loss": {10.0 - s}}}\n')
    old.finish()  # (a finished file, so the test can read it; a killed one may be empty)
    time.sleep(1.1)  # offline run folders are named by the second: keep the next one apart
    return old.id


def _runlog(tmp_path: Path, *overrides: str, start: int, wandb_id: str):
    from selfsup.config import load_config
    from selfsup.pretrain.loop.runlog import RunLog

    cfg = load_config(None, [f"run_dir={tmp_path}", "log.wandb=offline", "log.progress=false", *overrides])
    return RunLog(tmp_path, cfg, True, 10, start, wandb_id)


def test_new_run_rewind_or_same_run_by_how_the_last_process_ended(tmp_path: Path) -> None:
    # killed at step 7 after a checkpoint at 4, log.wandb_resume=new: a linked run, history re-logged
    old_id = _old_run(tmp_path / "a", 7)
    log = _runlog(tmp_path / "a", "log.wandb_resume=new", start=4, wandb_id=old_id)
    log.log(5, {"loss": 0.5})
    log.close()
    assert [m["step"] for m in metrics(tmp_path / "a")] == [1, 2, 3, 4, 5]
    assert log.wandb_id != old_id
    (new,) = (tmp_path / "a").glob(f"wandb/offline-run-*-{log.wandb_id}/run-*.wandb")
    complete(new)
    assert [(h["_step"], h["loss"]) for h in history(new)] == [(1, 9.0), (2, 8.0), (3, 7.0), (4, 6.0), (5, 0.5)]
    assert _config(new)["resumed_from"] == {"run_id": old_id, "step": 4}
    # the same with log.wandb_resume=rewind: the same run id, rewound to the checkpoint's step
    old_id = _old_run(tmp_path / "b", 7)
    log = _runlog(tmp_path / "b", "log.wandb_resume=rewind", start=4, wandb_id=old_id)
    log.log(5, {"loss": 0.5})
    log.close()
    assert log.wandb_id == old_id
    resumed = complete(_offline_files(tmp_path / "b")[-1])
    bp = run_record(resumed).branch_point
    assert (bp.run, bp.metric, bp.value) == (old_id, "_step", 4.0)
    assert [h["_step"] for h in history(resumed)] == [5]
    # a process that closed its run at the checkpoint's step (SIGUSR1 stop): plain continuation
    log = _runlog(tmp_path / "c", start=0, wandb_id=None)
    log.log(1, {"loss": 1.0})
    log.advance()
    log.close()
    time.sleep(1.1)
    again = _runlog(tmp_path / "c", start=1, wandb_id=log.wandb_id)
    again.log(2, {"loss": 2.0})
    again.close()
    assert again.wandb_id == log.wandb_id
    last = complete(_offline_files(tmp_path / "c")[-1])
    assert not run_record(last).branch_point.run and [h["_step"] for h in history(last)] == [2]
