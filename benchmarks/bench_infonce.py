"""InfoNCE forward+backward: plain full logit matrix vs row-chunked, time and peak memory (CPU).

    .venv/bin/python benchmarks/bench_infonce.py [--sizes 1024 4096 16384] [--chunk 1024]

``N`` is the global batch of images (``2N`` embeddings of dimension ``D``, one process, so the
logit matrix is ``2N x 2N``). Peak memory is the process's resident-set high-water mark
(``VmHWM`` in /proc/self/status, reset before each measurement by writing 5 to
/proc/self/clear_refs) minus the resident set just before the call, i.e. everything the loss and
its backward allocated on top of the inputs. On Linux, glibc serves allocations this large with
mmap and returns them on free, so the resident set follows torch's live tensors closely; the
number is what the operating system saw, not an estimate. glibc's mmap threshold is pinned to
64 KiB (the script re-executes itself with ``MALLOC_MMAP_THRESHOLD_``): otherwise it adapts
upwards to 32 MiB after the first large free, and blocks below that are served from heap pages
that are already resident and would not show up in the high-water mark. Time is wall clock of forward +
backward (best of ``--repeats``; one run at the largest size).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

from selfsup.pretrain.methods.simclr import info_nce

STATUS = Path("/proc/self/status")


def _kib(field: str) -> int:
    for line in STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in {STATUS}")


def _available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def measure(n: int, d: int, chunk: int, tau: float, seed: int = 0):
    """(seconds, extra peak bytes, loss, grads) of one forward+backward."""
    g = torch.Generator().manual_seed(seed)
    z1 = torch.randn(n, d, generator=g).requires_grad_(True)
    z2 = torch.randn(n, d, generator=g).requires_grad_(True)
    Path("/proc/self/clear_refs").write_text("5")
    base = _kib("VmRSS")
    t0 = time.perf_counter()
    loss = info_nce(z1, z2, tau, chunk=chunk).loss
    loss.backward()
    seconds = time.perf_counter() - t0
    peak = (_kib("VmHWM") - base) * 1024
    return seconds, peak, loss.item(), (z1.grad, z2.grad)


def main() -> int:
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096, 16384])
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--chunk", type=int, default=1024, help="anchor rows per chunk")
    ap.add_argument("--tau", type=float, default=0.2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, D={args.dim}, "
        f"chunk={args.chunk} rows, fp32"
    )
    print(
        "| N (images) | logits | plain s | plain peak MiB | chunked s | chunked peak MiB "
        "| mem ratio | time ratio | max |grad diff| |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for n in args.sizes:
        m = 2 * n
        repeats = 1 if n >= 16384 else args.repeats
        need = 3.5 * 4 * m * m  # logits, log-softmax kept for backward, its gradient (+ slack)
        rows = {}
        for name, chunk in (("plain", 0), ("chunked", args.chunk)):
            if chunk == 0 and need > 0.8 * _available_bytes():
                rows[name] = None
                continue
            runs = [measure(n, args.dim, chunk, args.tau) for _ in range(repeats)]
            rows[name] = (min(r[0] for r in runs), max(r[1] for r in runs), runs[0][2], runs[0][3])
        c = rows["chunked"]
        p = rows["plain"]
        if p is None:
            print(
                f"| {n} | {m}x{m} | skipped (needs ~{need / 2**30:.0f} GiB) | | "
                f"{c[0]:.2f} | {c[1] / 2**20:.0f} | | | |"
            )
            continue
        diff = max((a - b).abs().max().item() for a, b in zip(p[3], c[3], strict=True))
        print(
            f"| {n} | {m}x{m} | {p[0]:.2f} | {p[1] / 2**20:.0f} | {c[0]:.2f} | "
            f"{c[1] / 2**20:.0f} | {c[1] / p[1]:.3f} | {c[0] / p[0]:.2f} | {diff:.1e} |"
        )
        assert abs(p[2] - c[2]) <= 1e-4 * abs(p[2]), (p[2], c[2])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
