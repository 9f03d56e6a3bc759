"""One writer per run directory (pretrain/run/lock.py), on real processes and real flocks: two
``selfsup pretrain`` started at once into one folder (exactly one exits 2 naming the lock, the
other's metrics.jsonl has one row per step), a stale lock of a dead pid taken over, a live holder
refused, a holder on another host refused until ``--break-lock``, the SLURM requeue of the same
job taken over."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_train import ENV, SMALL, metrics

from selfsup.pretrain.run.lock import LOCK_FILE, RunLock, RunLockError, _proc_start


def _cmd(run: Path, shards: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "selfsup.launch.cli", "pretrain", f"data.train={shards}", f"run_dir={run}",
            *SMALL, "log.wandb=off", "train.checkpoint_every=0", *extra]  # fmt: skip


def _holder(path: Path) -> dict:
    return json.loads(path.read_text())


def test_two_concurrent_runs_one_exits_2_the_other_logs_every_step(tmp_path: Path, small_shards: str) -> None:
    run = tmp_path / "run"
    procs = [subprocess.Popen(_cmd(run, small_shards, "train.max_steps=12"), env=ENV, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(2)]  # fmt: skip
    outs = [p.communicate(timeout=600)[0] for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], outs
    loser = outs[[p.returncode for p in procs].index(2)]
    winner = procs[[p.returncode for p in procs].index(0)]
    assert "is in use" in loser and LOCK_FILE in loser and f"pid {winner.pid}" in loser, loser
    assert [r["step"] for r in metrics(run)] == list(range(1, 13))  # one row per step, no interleaving
    assert (run / LOCK_FILE).read_text() == ""  # released on a clean end


def test_a_live_holder_is_refused_and_a_dead_one_taken_over(tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    code = ("import sys, time; from selfsup.pretrain.run.lock import RunLock; RunLock.acquire(sys.argv[1]); "
            "print('held', flush=True); time.sleep(600)")  # fmt: skip
    holder = subprocess.Popen([sys.executable, "-c", code, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunLockError, match=f"held by pid {holder.pid} on host {socket.gethostname()}"):
            RunLock.acquire(run)
    finally:
        holder.kill()
        holder.wait()
    # the killed holder's flock is gone with it; its details stay in the file: a stale lock
    assert _holder(run / LOCK_FILE)["pid"] == holder.pid
    lock = RunLock.acquire(run)
    err = capfd.readouterr().err
    assert "taking over the stale lock" in err and f"pid {holder.pid}" in err, err
    assert _holder(run / LOCK_FILE)["pid"] == os.getpid()
    with pytest.raises(RunLockError, match="is in use"):  # a second writer inside this same process
        RunLock.acquire(run)
    lock.release()
    # a SIGKILLed holder whose forked child lives on (as DataLoader workers outlive a killed
    # trainer): the child does not keep the lock
    code = ("import os, sys, time; from selfsup.pretrain.run.lock import RunLock; RunLock.acquire(sys.argv[1]); "
            "os.fork() or time.sleep(600); print('held', flush=True); time.sleep(600)")  # fmt: skip
    holder = subprocess.Popen([sys.executable, "-c", code, str(run)], stdout=subprocess.PIPE, text=True,
                              start_new_session=True)  # fmt: skip
    assert holder.stdout.readline().strip() == "held"
    holder.kill()
    holder.wait()
    try:
        RunLock.acquire(run).release()
    finally:
        os.killpg(holder.pid, 9)


def test_a_file_system_without_flock_still_sees_a_live_holder(tmp_path: Path) -> None:
    """The flock is granted (nobody holds one), but the file names a live process of this host with
    its recorded start time, as on a file system that grants every flock: refused."""
    parent = os.getppid()
    (tmp_path / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": parent,
                                                  "pid_start": _proc_start(parent), "started": "x"}))  # fmt: skip
    with pytest.raises(RunLockError, match=f"pid {parent} .* is alive"):
        RunLock.acquire(tmp_path)
    # the same pid with another start time is a reused pid: the holder is gone
    (tmp_path / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": parent,
                                                  "pid_start": "1", "started": "x"}))  # fmt: skip
    RunLock.acquire(tmp_path).release()


def test_a_killed_holder_not_yet_reaped_is_dead(tmp_path: Path) -> None:
    """A SIGKILLed trainer stays in the process table (a zombie) until its parent reaps it; it holds
    no lock and writes nothing, so it is taken over, and it is refused again once it is running."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        def write_holder() -> None:
            (tmp_path / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": child.pid,
                                                          "pid_start": _proc_start(child.pid), "started": "x"}))  # fmt: skip

        write_holder()
        with pytest.raises(RunLockError, match=f"pid {child.pid} .* is alive"):  # running: refused
            RunLock.acquire(tmp_path)
        os.kill(child.pid, 9)
        deadline = time.monotonic() + 30
        while Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
            assert time.monotonic() < deadline, "the killed child never became a zombie"
            time.sleep(0.01)
        write_holder()  # still in the process table, not reaped: os.kill(pid, 0) succeeds on it
        os.kill(child.pid, 0)
        RunLock.acquire(tmp_path).release()
    finally:
        child.kill()
        child.wait()


def test_other_host_needs_break_lock_except_a_requeue_of_the_same_job(
    tmp_path: Path, small_shards: str, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    other = {"host": "node-elsewhere", "pid": 4242, "started": "2026-12-03T10:00:00", "slurm_job_id": "77",
             "slurm_restart_count": 0}  # fmt: skip
    (run / LOCK_FILE).write_text(json.dumps(other))
    r = subprocess.run(_cmd(run, small_shards, "train.max_steps=2"), env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 2 and "node-elsewhere" in r.stdout and "--break-lock" in r.stdout, r.stdout + r.stderr
    assert sorted(p.name for p in run.iterdir()) == [LOCK_FILE]  # nothing touched
    assert _holder(run / LOCK_FILE) == other
    # the same job, requeued by SLURM (higher restart count): the old incarnation is over
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    lock = RunLock.acquire(run)
    assert "requeued" in capfd.readouterr().err
    lock.release()
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")  # the same job id, same incarnation: not a requeue
    (run / LOCK_FILE).write_text(json.dumps(other))
    with pytest.raises(RunLockError, match="another host"):
        RunLock.acquire(run)
    monkeypatch.delenv("SLURM_JOB_ID")
    monkeypatch.delenv("SLURM_RESTART_COUNT")
    t0 = time.monotonic()
    r = subprocess.run(_cmd(run, small_shards, "train.max_steps=2", "--break-lock"), env=ENV, capture_output=True,
                       text=True, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    assert "--break-lock: removed the lock of pid 4242 on host node-elsewhere" in r.stderr
    assert [m["step"] for m in metrics(run)] == [1, 2] and time.monotonic() - t0 < 300
