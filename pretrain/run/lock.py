"""One writer per run directory: ``<run_dir>/.lock``, held by rank 0 of the run that writes.

The lock is an exclusive POSIX record lock (``fcntl.lockf``) on ``.lock`` plus what is written
inside it: the holder's host, pid, process start time, start time and ``SLURM_JOB_ID`` /
``SLURM_RESTART_COUNT`` (JSON). The kernel drops the lock when its process dies, so on one machine
a crashed holder never blocks anyone. A record lock and not a ``flock``: a flock is shared with
every forked child (DataLoader workers, W&B's service), which outlive a SIGKILLed trainer by
seconds and would keep its lock; record locks are not inherited, and network file systems carry
them more often. A clean exit also empties the file. What the next writer does (below, "flock"
means this lock):

* flock refused: a live process holds it (on this host, or on another one where the shared file
  system carries flocks): ``RunLockError`` naming the holder; ``selfsup pretrain`` exits 2 before
  touching anything in the folder.
* flock granted, the file empty: a fresh or cleanly ended run: the lock is taken.
* flock granted, the file names a holder on THIS host whose pid is dead (or is now another
  process): a crashed run; taken over with a warning on stderr.
* same host, pid alive with the recorded start time: the file system does not honour flock
  (some network file systems grant every flock); the holder is running: error.
* the holder is on ANOTHER host: from here nobody can tell whether it is still running (many
  shared file systems keep flocks per node), so it is an error that explains ``--break-lock`` —
  except for the SLURM requeue of the same job (same ``SLURM_JOB_ID``, a higher
  ``SLURM_RESTART_COUNT``): SLURM starts a requeued job only after the old one was ended, so the
  lock is taken over with a warning.

``--break-lock`` removes the lock file and takes a new one whatever it says. It is dangerous: if
the old holder is in fact alive (a job still running on another node), both runs write the same
``metrics.jsonl`` and checkpoints and each overwrites the other's ``latest``.

Eval and export only read a run directory and take no lock.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

LOCK_FILE = ".lock"
_HELD: set[Path] = set()  # run directories this process holds


class RunLockError(RuntimeError):
    """Another writer holds the run directory (``selfsup pretrain`` exits 2)."""


def _proc_stat(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (state first), or None."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _proc_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc/<pid>/stat field 22), or None."""
    stat = _proc_stat(pid)
    return stat[19] if stat else None


def _alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    stat = _proc_stat(pid)
    if stat and stat[0] == "Z":  # a zombie (killed, not yet reaped) holds no lock and writes nothing
        return False
    now = stat[19] if stat else None
    return start is None or now is None or now == start


def describe(holder: dict) -> str:
    if not holder:
        return "another process (it has not written its details yet)"
    job = f", SLURM job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else ""
    return (f"pid {holder.get('pid')} on host {holder.get('host')} (started {holder.get('started')}"
            f"{job})")  # fmt: skip


def _me() -> dict:
    return {
        "host": socket.gethostname(), "pid": os.getpid(), "pid_start": _proc_start(os.getpid()),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "slurm_restart_count": int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0),
    }  # fmt: skip


def _read(fd: int) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = b""
    while chunk := os.read(fd, 65536):
        raw += chunk
    try:
        holder = json.loads(raw) if raw.strip() else {}
    except json.JSONDecodeError:
        return {"host": "?", "pid": "?", "started": f"unreadable lock file: {raw[:80]!r}"}
    return holder if isinstance(holder, dict) else {}


def _warn(message: str) -> None:
    print(f"selfsup: warning: {message}", file=sys.stderr, flush=True)


class RunLock:
    """``RunLock.acquire(run_dir)``; ``release()`` empties and unlocks (also on process death)."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path, self.fd = path, fd

    @classmethod
    def acquire(cls, run_dir: str | Path, break_lock: bool = False) -> RunLock:
        run_dir = Path(run_dir)
        path = run_dir / LOCK_FILE
        run_dir.mkdir(parents=True, exist_ok=True)
        if break_lock and path.exists():
            fd = os.open(path, os.O_RDWR)
            old = _read(fd)
            os.close(fd)
            path.unlink(missing_ok=True)  # a holder that lives on keeps its flock on the old inode
            _warn(f"--break-lock: removed the lock of {describe(old)} on {run_dir}; if that run is still "
                  "running, both now write this folder")  # fmt: skip
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            cls._take(fd, path, run_dir, break_lock)
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd)

    @staticmethod
    def _take(fd: int, path: Path, run_dir: Path, break_lock: bool) -> None:
        try:
            if path.resolve() in _HELD:  # record locks are per process: this one already writes here
                raise BlockingIOError(errno.EWOULDBLOCK, "held by this process")
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunLockError(f"{path}: cannot lock the run directory ({e})") from e
            holder = {}
            for _ in range(20):  # the holder writes its details right after taking the lock
                if holder := _read(fd):
                    break
                time.sleep(0.05)
            raise RunLockError(
                f"{run_dir} is in use: {path} is held by {describe(holder)}. One run directory has one "
                "writer: wait for that run, stop it, or choose another run_dir"
            ) from None
        holder, me = _read(fd), _me()
        if holder and not break_lock:
            same_host = holder.get("host") == me["host"]
            requeued = (holder.get("slurm_job_id") and holder.get("slurm_job_id") == me["slurm_job_id"]
                        and int(holder.get("slurm_restart_count") or 0) < me["slurm_restart_count"])  # fmt: skip
            if same_host and isinstance(holder.get("pid"), int) and holder["pid"] != me["pid"] \
                    and _alive(holder["pid"], holder.get("pid_start")):
                raise RunLockError(
                    f"{run_dir} is in use: {describe(holder)} is alive and named in {path} (this file "
                    "system did not refuse the second flock, so the lock file is all there is)"
                )
            if same_host or requeued:
                why = "the same SLURM job, requeued" if requeued and not same_host else "its process is gone"
                _warn(f"taking over the stale lock {path} of {describe(holder)}: {why} (a crashed run; "
                      "--resume auto continues from its last checkpoint)")  # fmt: skip
            else:
                raise RunLockError(
                    f"{run_dir} was locked by {describe(holder)}, on another host: from {me['host']} "
                    "it cannot be told whether that run is still alive. If it is surely dead (its job "
                    "ended, its node crashed), start again with `selfsup pretrain --break-lock ...`. "
                    "That is dangerous if it is alive: both runs would write the same metrics.jsonl "
                    "and checkpoints and overwrite each other's 'latest'"
                )
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, (json.dumps(me) + "\n").encode())
        os.fsync(fd)
        _HELD.add(path.resolve())

    def release(self) -> None:
        """Empty the file (a clean end: the next run needs no take-over) and drop the flock."""
        if self.fd < 0:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(self.fd, 0)
        with contextlib.suppress(OSError):
            fcntl.lockf(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        _HELD.discard(self.path.resolve())
        self.fd = -1
