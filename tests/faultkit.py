"""Real faults for tests: damaged images inside real tar shards, truncated shards, corrupt
checkpoints. Nothing here is a mock: each helper rewrites real files the way disks, copies and
crashes damage them."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import webdataset as wds

from selfsup.pretrain.data.shards import MANIFEST


def copy_set(src: str | Path, dst: Path) -> Path:
    """A private copy of a shard set (session fixtures are shared and must stay intact)."""
    shutil.copytree(src, dst)
    return dst


def damage_samples(shard_dir: Path, shard: int, indices: list[int], rebuild_manifest: bool = True) -> list[str]:
    """Replace the image payload of samples ``indices`` (positions in shard ``shard``) by bytes
    that do not decode, rewriting the tar. With ``rebuild_manifest`` the manifest's size and sha256
    are updated (the set then passes every open-time check, as one re-hashed after a bad copy
    would); without, the shard's size/sha256 entries are removed (a set whose manifest cannot
    vouch for the bytes, like a URL set). Returns the damaged keys."""
    manifest = json.loads((shard_dir / MANIFEST).read_text())
    entry = manifest["shards"][shard]
    path = shard_dir / entry["file"]
    ext = manifest["extension"]
    samples = list(wds.tariterators.tarfile_samples([{"url": str(path)}]))
    keys = []
    for i in indices:
        size = len(samples[i][ext])
        samples[i][ext] = (b"\x89PNG broken" * size)[: max(size - 1, 1)]  # wrong length and not an image
        keys.append(samples[i]["__key__"])
    with wds.TarWriter(str(path), mtime=0, user="selfsup", group="selfsup") as w:
        for s in samples:
            w.write({k: v for k, v in s.items() if k in ("__key__", ext, "cls")})
    if rebuild_manifest:
        entry["bytes"] = path.stat().st_size
        entry["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    else:
        entry.pop("bytes", None)
        entry.pop("sha256", None)
    (shard_dir / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return keys


def truncate_shard(shard_dir: Path, shard: int, keep_fraction: float = 0.5) -> Path:
    """Cut a shard file short, as an interrupted copy leaves it (the manifest is left alone)."""
    manifest = json.loads((shard_dir / MANIFEST).read_text())
    path = shard_dir / manifest["shards"][shard]["file"]
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep_fraction)])
    return path


@contextlib.contextmanager
def size_limited_disk(parent: Path, size: str):
    """A real tmpfs of ``size`` (e.g. "2m") mounted under ``parent`` (root only; skips the test
    otherwise), unmounted afterwards: a disk that really fills up."""
    import uuid

    import pytest

    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a size-limited tmpfs needs root")
    mnt = parent / f"disk-{uuid.uuid4().hex[:6]}"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"mount -t tmpfs refused here: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


# ------------------------------------------------------------------------------ processes
ENV = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}


def start(cmd: list[str], env: dict | None = None, **kw) -> subprocess.Popen:
    """A process in its own session, so the whole tree (launcher + ranks + W&B service) can be
    killed at once the way a node crash or a SLURM kill does."""
    return subprocess.Popen(cmd, env=env or ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, **kw)  # fmt: skip


def kill_tree(proc: subprocess.Popen) -> str:
    """SIGKILL the process and every descendant at once (torchrun starts its ranks in sessions of
    their own, so the process group alone is not enough); return what they printed."""
    import psutil

    try:
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    for p in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    out, _ = proc.communicate(timeout=60)
    psutil.wait_procs(tree, timeout=60)  # the ranks too: a next run must not meet them still alive
    return out or ""


def last_step(run: Path) -> int:
    """The highest step in metrics.jsonl (0 if none; a torn line is ignored)."""
    path = run / "metrics.jsonl"
    if not path.exists():
        return 0
    steps = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            steps.append(json.loads(line)["step"])
    return max(steps, default=0)


def wait_step(run: Path, proc: subprocess.Popen, step: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while last_step(run) < step:
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before step {step}:\n{proc.stdout.read()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no step {step} within {timeout}s")
        time.sleep(0.01)
