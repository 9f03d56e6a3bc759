"""Helpers for benchmarks/gpu_check.py: the library entry points it uses, timing, memory, host-sync
counting, deadlines, subprocesses, synthetic shards.

Every ``selfsup`` import of the GPU check is in the block below (and in the sibling benchmarks
``bench_augment`` / ``bench_infonce``, whose helpers it reuses): when a module moves, fix it here.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

# ---- the library, in one place ---------------------------------------------------------------
from selfsup import load_backbone
from selfsup.augment.views import build_views
from selfsup.config import load_config
from selfsup.data_info import DataInfo
from selfsup.pretrain.build import build_method
from selfsup.pretrain.data.datasets import Sample, shapes
from selfsup.pretrain.data.shards import ShardOptions, write_shards
from selfsup.pretrain.loop.optim import build_optimizer
from selfsup.pretrain.methods.simclr import info_nce

# used by gpu_parts.py; the CLI (`selfsup demo`, `selfsup pretrain`) is reached through CLI below
__all__ = ["DataInfo", "build_method", "build_optimizer", "build_views", "info_nce",
           "load_backbone", "load_config"]  # fmt: skip

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "selfsup.launch.cli"]  # the `selfsup` command of this Python
CONFIGS = ROOT / "configs"
MIB = 2**20


# ---- device: timing, memory, host syncs ------------------------------------------------------
@dataclass
class Device:
    """The device the in-process parts run on. ``cuda`` False = the dry run's CPU path: the same
    measurements, with perf_counter instead of CUDA events and the RSS high-water mark instead of
    the caching allocator's peak."""

    cuda: bool

    @property
    def torch(self) -> torch.device:
        return torch.device("cuda" if self.cuda else "cpu")

    @property
    def type(self) -> str:
        return "cuda" if self.cuda else "cpu"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def time_ms(self, fn: Callable[[], object], reps: int, warmup: int = 1) -> dict:
        """Per-call milliseconds of ``fn`` (median, min) over ``reps`` calls after ``warmup``.

        On CUDA each call is bracketed by CUDA events on the current stream: GPU time from the
        first kernel to the last, which includes any time the GPU idled while the host was
        blocked by a sync inside ``fn``. ``wall_ms`` is host time over all calls / reps."""
        for _ in range(warmup):
            fn()
        self.sync()
        t0 = time.perf_counter()
        if self.cuda:
            events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                      for _ in range(reps)]  # fmt: skip
            for start, end in events:
                start.record()
                fn()
                end.record()
            torch.cuda.synchronize()
            ms = [start.elapsed_time(end) for start, end in events]
        else:
            ms = []
            for _ in range(reps):
                t = time.perf_counter()
                fn()
                ms.append(1000 * (time.perf_counter() - t))
        wall = 1000 * (time.perf_counter() - t0) / reps
        return {"ms": float(np.median(ms)), "min_ms": min(ms), "wall_ms": wall, "reps": reps}

    def mem_reset(self) -> float:
        """Start a peak-memory window; returns the MiB in use at its start."""
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return torch.cuda.memory_allocated() / MIB
        with contextlib.suppress(OSError):  # Linux: writing 5 resets VmHWM to the current RSS
            Path("/proc/self/clear_refs").write_text("5")
        return _proc_kib("VmRSS") / 1024

    def mem_peak(self) -> float:
        """Peak MiB since ``mem_reset``: torch.cuda.max_memory_allocated, or on CPU the resident
        set's high-water mark (approximate: freed heap pages stay resident)."""
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() / MIB
        return _proc_kib("VmHWM") / 1024

    def free(self) -> None:
        if self.cuda:
            torch.cuda.empty_cache()


def _proc_kib(field_name: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return float(line.split()[1])
    return float("nan")


class SyncCounter:
    """Counts host<->device synchronisations inside the block (CUDA only).

    Uses ``torch.cuda.set_sync_debug_mode("warn")``: every synchronising CUDA call (``.item()``,
    a blocking copy such as ``torch.tensor(list, device="cuda")``, ``nonzero``, ...) then emits
    a warning, recorded here with the Python line that made it. On CPU ``count`` stays None."""

    MESSAGE = "called a synchronizing"

    def __init__(self, dev: Device):
        self.dev = dev
        self.count: int | None = None
        self.where: dict[str, int] = {}

    def __enter__(self) -> SyncCounter:
        if self.dev.cuda:
            torch.cuda.synchronize()
            self._catch = warnings.catch_warnings(record=True)
            self._records = self._catch.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc) -> None:
        if not self.dev.cuda:
            return
        torch.cuda.set_sync_debug_mode("default")
        self._catch.__exit__(*exc)
        hits = [r for r in self._records if self.MESSAGE in str(r.message)]
        self.count = len(hits)
        where = Counter(f"{Path(r.filename).parent.name}/{Path(r.filename).name}:{r.lineno}"
                        for r in hits)  # fmt: skip
        self.where = dict(where.most_common(8))


def is_oom(e: BaseException) -> bool:
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", ())
    return isinstance(e, oom) or "out of memory" in str(e).lower()


def catch_oom(fn: Callable[[], dict], dev: Device) -> dict:
    """``fn()``, or ``{"oom": True, "error": ...}`` when it runs out of memory (memory freed)."""
    try:
        return fn()
    except (RuntimeError, MemoryError) as e:
        if not is_oom(e):
            raise
        message = str(e).splitlines()[0][:300]
    dev.free()  # outside the except block: the traceback's frames (and tensors) are gone
    return {"oom": True, "error": message}


def bf16_step(method: torch.nn.Module, opt: torch.optim.Optimizer, images: torch.Tensor, dev: Device) -> torch.Tensor:
    """One training step of ``method`` on a uint8 batch under bf16 autocast: forward (views
    included), backward, optimiser step, gradients cleared. Returns the loss (not synced)."""
    with torch.autocast(dev.type, dtype=torch.bfloat16):
        loss, _ = method(images)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


# ---- deadlines and results --------------------------------------------------------------------
class Deadline:
    """A part's time cap, checked between measurements (a running measurement is not cut)."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def allows(self, estimate_s: float = 0.0) -> bool:
        return self.left() > estimate_s


@dataclass
class Part:
    """What one part has measured so far; ``skip`` notes a measurement left out for time."""

    name: str
    deadline: Deadline
    save: Callable[[], None]  # writes the whole JSON (called after every measurement)
    results: dict = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)

    def put(self, key: str, value) -> None:
        self.results[key] = value
        self.save()

    def due(self, key: str, estimate_s: float = 0.0) -> bool:
        """True if there is time for measurement ``key`` (estimated cost ``estimate_s``)."""
        if self.deadline.allows(estimate_s):
            return True
        self.skipped.append(key)
        self.save()
        return False


def error_summary(e: BaseException, frames: int = 6) -> dict:
    tb = traceback.extract_tb(e.__traceback__)[-frames:]
    return {
        "type": type(e).__name__,
        "message": str(e)[:2000],
        "traceback": [f"{Path(f.filename).name}:{f.lineno} in {f.name}: {f.line}" for f in tb],
    }


def write_json(path: Path, data: dict) -> None:
    """Atomic write (a killed run leaves the previous complete file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=_plain) + "\n")
    os.replace(tmp, path)


def _plain(v):
    if isinstance(v, (np.generic,)):
        return v.item()
    if isinstance(v, Path):
        return str(v)
    return repr(v)


# ---- subprocesses ----------------------------------------------------------------------------
@dataclass
class Proc:
    code: int | None  # None: stopped at the deadline
    seconds: float
    lines: list[tuple[float, str]]  # (seconds since start, line) of stdout+stderr

    @property
    def text(self) -> str:
        return "\n".join(line for _, line in self.lines)

    def tail(self, n: int = 40) -> str:
        return "\n".join(line for _, line in self.lines[-n:])


def run_streaming(cmd: list[str], env: dict, timeout: float, echo: str | None = None) -> Proc:
    """Run ``cmd`` (from the repository root) with its output collected line by line (and echoed
    with prefix ``echo``); past ``timeout`` s its process group gets SIGTERM, then SIGKILL."""
    start = time.monotonic()
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env={**os.environ, **env}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, bufsize=1, start_new_session=True,
    )  # fmt: skip
    lines: list[tuple[float, str]] = []

    def read() -> None:
        for line in proc.stdout:
            line = line.rstrip("\n")
            lines.append((time.monotonic() - start, line))
            if echo is not None:
                print(f"{echo}{line}", flush=True)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        code: int | None = proc.wait(timeout=max(timeout, 1.0))
    except subprocess.TimeoutExpired:
        code = None
        for sig, grace in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
            try:
                os.killpg(proc.pid, sig)  # the group of the child started above, nothing else
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=grace)
                break
            except subprocess.TimeoutExpired:
                continue
    reader.join(timeout=5)
    return Proc(code, time.monotonic() - start, lines)


def device_env(dev: Device) -> dict[str, str]:
    """Environment for a `selfsup` subprocess on the same device as the in-process parts."""
    env = {"WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1"}
    if not dev.cuda:  # the dry run stays on the CPU even on a GPU node; 1 thread (busy cores)
        env.update(ACCELERATE_USE_CPU="1", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    return env


def metrics_rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(r) for r in path.read_text().splitlines() if r.strip()]


# ---- synthetic data ----------------------------------------------------------------------------
def _base_images(n: int, size: int, unique: int, seed: int):
    """``min(n, unique)`` procedural shapes drawn at 1/4 or 1/2 of ``size`` when that divides
    (drawing costs ~15 ms per 224-px image) and scaled up by pixel repetition; + labels, classes."""
    factor = next((f for f in (4, 2) if size % f == 0 and size // f >= 16), 1)
    src = shapes(min(n, unique), size=size // factor, seed=seed)
    return src.images.repeat(factor, axis=1).repeat(factor, axis=2), src.labels, src.classes


def make_images(n: int, size: int, unique: int = 512, seed: int = 0) -> np.ndarray:
    """``n`` uint8 RGB images ``[n, size, size, 3]``: ``unique`` synthetic ones, tiled. Content
    does not change the cost of decoding or of the views."""
    base, _, _ = _base_images(n, size, unique, seed)
    return base[np.arange(n) % len(base)]


def write_image_shards(out: Path, n: int, size: int, unique: int = 512) -> Path:
    """A shard set of ``n`` synthetic RGB images of ``size`` px (raw encoding); reused if present."""
    if (out / "manifest.json").is_file():
        return out
    base, labels, classes = _base_images(n, size, unique, seed=0)

    def samples() -> Iterator[Sample]:
        for i in range(n):
            j = i % len(base)
            yield Sample(base[j], int(labels[j]), f"synthetic-{i:08d}")

    per_shard = max(64, -(-n // 16))  # 16 shards: enough for every DataLoader worker
    opts = ShardOptions(name="train", samples_per_shard=per_shard, progress=False)
    write_shards(samples(), out, classes, opts, total=n, source=f"gpu_check synthetic {size}px")
    return out
