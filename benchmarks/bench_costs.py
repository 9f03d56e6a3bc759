"""Cost curves: how each part of the pipeline grows with the work (issue 28, part 3).

One table per part, printed as markdown (and written as JSON with ``--json``):

* ``plan``: shard planning vs number of shards and samples (10 → 10,000 shards, 10k → 10M
  samples). A synthetic manifest plus empty shard files (the manifest carries no ``bytes``, so
  ``ShardSet.open`` only stats them): the real ``ShardSet.open`` and ``plan_epoch`` of one rank
  of a 64-rank × 8-worker job, time and peak Python memory (tracemalloc) per rank.
* ``readers``: below the rule "shards ≥ ranks × workers": the reader splits the epoch's sample
  sequence, not the shards, so several workers share a shard and each parses it from its start up
  to the end of its segment (``ShardStream._raw``). Read amplification = samples parsed / samples
  used, computed from every rank's real plan; plus a run's first-batch latency on a small real
  shard set (raw 32 px) for the first and the last rank.
* ``eval``: FAISS flat vs IVF vs HNSW at 100k and 1M synthetic vectors (a clustered Gaussian
  mixture, so neighbours mean something): build time, search time per query, recall@10 against
  flat, with the settings ``eval`` uses for its automatic index (``eval/knn.py``).
* ``ckpt``: checkpoint size and write time (the real atomic ``save_checkpoint``: temp file,
  fsync, rename, ``latest``) for SimCLR ResNet-18/50 (LARS) and DINO ViT-S/B (AdamW), with the
  optimiser state after one step.
* ``step``: SimCLR ResNet-18 training step on CPU (views, forward, backward, LARS) vs batch and
  image size (32 px CIFAR stem; 96 and 224 px ImageNet stem), bf16 autocast + channels_last.

The machine these were measured on had 2 cores shared by several agents: read the ratios
between rows, not the absolute speeds.

    .venv/bin/python benchmarks/bench_costs.py                         # every part, ~10-15 min
    .venv/bin/python benchmarks/bench_costs.py --parts plan readers    # ~1-2 min
    .venv/bin/python benchmarks/bench_costs.py --parts eval --sizes 100000 1000000
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _costs_models import ckpt_part, step_part, write_image_shards_per  # noqa: E402

from selfsup.eval.knn import build_index, search  # noqa: E402
from selfsup.eval.run import AUTO_IVF  # noqa: E402
from selfsup.pretrain.data.shards import FORMAT, MANIFEST  # noqa: E402
from selfsup.pretrain.data.shardset import ShardSet  # noqa: E402
from selfsup.pretrain.data.stream import ShardLoader, ShardStream, plan_epoch  # noqa: E402

PARTS = ("plan", "readers", "eval", "ckpt", "step")


def table(title: str, head: list[str], rows: list[list]) -> str:
    out = [f"\n### {title}\n", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


# ------------------------------------------------------------------------------------- planning
def synthetic_manifest(folder: Path, shards: int, samples: int) -> None:
    """A manifest of ``shards`` near-equal shards holding ``samples`` in all, and empty files."""
    folder.mkdir(parents=True, exist_ok=True)
    base, extra = divmod(samples, shards)
    entries = [{"file": f"train-{i:06d}.tar", "num_samples": base + (i < extra)} for i in range(shards)]
    for e in entries:
        (folder / e["file"]).touch()
    manifest = {"format": FORMAT, "encoding": "raw", "extension": "u8", "image_size": [224, 224],
                "channels": 3, "classes": ["a"], "num_samples": samples, "shards": entries}
    (folder / MANIFEST).write_text(json.dumps(manifest))


def plan_part(args, tmp: Path) -> dict:
    rows, out = [], []
    world, workers, batch = args.world, args.workers, args.batch
    for shards in (10, 100, 1000, 10000):
        for samples in (10_000, 100_000, 1_000_000, 10_000_000):
            if samples < shards * 10 or samples < world * batch:
                continue
            folder = tmp / f"plan-{shards}-{samples}"
            synthetic_manifest(folder, shards, samples)
            tracemalloc.start()
            t0 = time.perf_counter()
            ss = ShardSet.open(folder)
            t1 = time.perf_counter()
            plans, n_batches = plan_epoch(ss.counts, batch, world - 1, world, workers, seed=0, epoch=3)
            t2 = time.perf_counter()
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            segs = max(len(p.segments) for p in plans)
            r = {"shards": shards, "samples": samples, "open_ms": 1e3 * (t1 - t0),
                 "plan_ms": 1e3 * (t2 - t1), "peak_mib": peak / 2**20, "batches": n_batches,
                 "max_segments_per_worker": segs,
                 "manifest_kib": (folder / MANIFEST).stat().st_size / 1024}
            out.append(r)
            rows.append([shards, f"{samples:,}", f"{r['manifest_kib']:.0f}", f"{r['open_ms']:.1f}",
                         f"{r['plan_ms']:.2f}", f"{r['peak_mib']:.2f}", n_batches, segs])
    print(table(f"Planning, one rank of {world} ranks × {workers} workers, per-rank batch {batch} "
                "(ShardSet.open + plan_epoch)",
                ["shards", "samples", "manifest KiB", "open ms", "plan ms", "peak MiB (Python)",
                 "batches/rank", "max segments/worker"], rows))
    return {"rows": out, "world": world, "workers": workers, "batch": batch}


def amplification(counts: list[int], world: int, workers: int, batch: int) -> tuple[float, int]:
    """(samples parsed / samples used, most readers of one shard) over every rank's real plan:
    a worker parses a shard from its start to the end of its segment (``ShardStream._raw``)."""
    parsed = used = 0
    readers = np.zeros(len(counts), dtype=np.int64)
    for rank in range(world):
        plans, _ = plan_epoch(counts, batch, rank, world, workers, seed=0, epoch=0)
        for p in plans:
            for shard, lo, hi in p.segments:
                parsed += hi
                used += hi - lo
                readers[shard] += 1
    return parsed / max(used, 1), int(readers.max())


def first_batch_ms(folder: Path, world: int, rank: int, workers: int, batch: int) -> float:
    loader = ShardLoader(ShardStream(ShardSet.open(folder), batch, rank, world, workers, seed=0))
    loader.set_epoch(0)
    t = time.perf_counter()
    next(iter(loader))
    return 1e3 * (time.perf_counter() - t)


def readers_part(args, tmp: Path) -> dict:
    out: dict = {"amplification": [], "first_batch": []}
    rows = []
    shards, per = 64, 1000
    counts = [per] * shards
    for world, workers in ((8, 4), (8, 8), (16, 8), (64, 8), (256, 8), (512, 8)):
        amp, most = amplification(counts, world, workers, batch=16)
        out["amplification"].append({"shards": shards, "ranks": world, "workers": workers,
                                     "readers": world * workers, "amplification": amp,
                                     "max_readers_per_shard": most})
        rows.append([shards, world, workers, world * workers, f"{amp:.2f}", most])
    print(table(f"Below the rule: {shards} shards of {per} samples, per-rank batch 16 "
                "(samples parsed / samples used, from every rank's plan)",
                ["shards", "ranks", "workers", "ranks×workers", "read amplification",
                 "max readers of one shard"], rows))
    rows = []
    n = 8192
    for n_shards in (4, 32, 256):
        folder = write_image_shards_per(tmp / f"real-{n_shards}", n, 32, n // n_shards)
        for world, rank in ((4, 0), (4, 3)):
            ms = [first_batch_ms(folder, world, rank, 2, 64) for _ in range(args.repeats)]
            r = {"shards": n_shards, "samples": n, "world": world, "rank": rank, "workers": 2,
                 "batch": 64, "first_batch_ms": float(np.median(ms))}
            out["first_batch"].append(r)
            rows.append([n_shards, n // n_shards, f"{rank} of {world}", f"{r['first_batch_ms']:.0f}"])
    print(table(f"First-batch latency on a real shard set ({n} raw 32 px RGB images, 2 workers, "
                f"batch 64; median of {args.repeats}, DataLoader start included)",
                ["shards", "samples/shard", "rank", "first batch ms"], rows))
    return out


# ----------------------------------------------------------------------------------- evaluation
def mixture(n: int, d: int, centres: np.ndarray, rng: np.random.Generator, sigma: float) -> np.ndarray:
    c = centres[rng.integers(len(centres), size=n)]
    return (c + sigma * rng.standard_normal((n, d), dtype=np.float32)).astype(np.float32)


def recall(exact_ids: np.ndarray, ids: np.ndarray) -> float:
    found = sum(len(set(e.tolist()) & set(a.tolist()) - {-1}) for e, a in zip(exact_ids, ids, strict=True))
    return 100.0 * found / exact_ids.size


def eval_part(args, _tmp: Path) -> dict:
    rng = np.random.default_rng(0)
    d, k, q = args.dim, 10, args.queries
    centres = rng.standard_normal((1000, d), dtype=np.float32) / np.sqrt(d)
    out, rows = [], []
    for n in args.sizes:
        x = mixture(n, d, centres, rng, args.sigma / np.sqrt(d))
        queries = mixture(q, d, centres, rng, args.sigma / np.sqrt(d))
        exact_ids = None
        kinds = ["flat", "ivf"] + (["hnsw"] if n <= args.hnsw_max else [])
        for kind in kinds:
            t0 = time.perf_counter()
            index = build_index(x, kind=kind, seed=0, **(AUTO_IVF if kind == "ivf" else {}))
            t1 = time.perf_counter()
            _, ids = search(index, queries, k)
            t2 = time.perf_counter()
            if kind == "flat":
                exact_ids = ids
            r = {"n": n, "dim": d, "index": kind, "build_s": t1 - t0, "search_ms_per_query": 1e3 * (t2 - t1) / q,
                 "recall@10": recall(exact_ids, ids), "queries": q,
                 "nlist": getattr(index, "nlist", None)}
            out.append(r)
            rows.append([f"{n:,}", kind, f"{r['build_s']:.1f}", f"{r['search_ms_per_query']:.3f}",
                         f"{r['recall@10']:.1f}"])
            del index
    print(table(f"FAISS index vs N ({d}-d Gaussian mixture, 1000 centres, noise/centre norm {args.sigma}, {q} queries, k=10; "
                f"ivf: {AUTO_IVF})",
                ["N", "index", "build s", "search ms/query", "recall@10 vs flat (%)"], rows))
    return {"rows": out}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    ap.add_argument("--world", type=int, default=64, help="plan: ranks (default 64)")
    ap.add_argument("--workers", type=int, default=8, help="plan: DataLoader workers per rank (default 8)")
    ap.add_argument("--batch", type=int, default=64, help="plan: per-rank batch (default 64)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000], help="eval: database sizes")
    ap.add_argument("--dim", type=int, default=128, help="eval: feature dimension (default 128)")
    ap.add_argument("--sigma", type=float, default=1.0,
                    help="eval: noise norm / centre norm of the mixture (default 1: clusters overlap)")
    ap.add_argument("--queries", type=int, default=1000, help="eval: queries (default 1000)")
    ap.add_argument("--hnsw-max", type=int, default=100_000, help="eval: largest N that gets an HNSW row")
    ap.add_argument("--models", nargs="+", default=["resnet18", "resnet50", "vit_small", "vit_base"])
    ap.add_argument("--step-sizes", type=int, nargs="+", default=[32, 96, 224])
    ap.add_argument("--step-batches", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--steps", type=int, default=3, help="step: timed steps per row (after one warm-up)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)
    fns = {"plan": plan_part, "readers": readers_part, "eval": eval_part, "ckpt": ckpt_part, "step": step_part}
    results: dict = {"machine": "2 shared CPU cores (several agents at once): read ratios"}
    with tempfile.TemporaryDirectory(prefix="bench_costs-") as tmp:
        for part in args.parts:
            t = time.perf_counter()
            results[part] = fns[part](args, Path(tmp))
            print(f"\n({part}: {time.perf_counter() - t:.0f} s)", flush=True)
            if args.json:
                args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
