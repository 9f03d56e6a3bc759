"""Write a source into shards with every core, split over a SLURM array, and join the parts.

``import_source(src, out, options, plan)`` writes the samples of ``src`` in a seeded permutation
(the same one ``shards.shuffled`` draws). With ``plan.workers > 1`` the decoding and resizing run
in a process pool while this process encodes, writes the tars and sums the pixels; results are
consumed in submission order, so the shards are byte-identical to a 1-worker import, and at most
``4 x workers`` chunks are in flight, so memory stays bounded however large the folder.

``plan.part, plan.parts = i, n`` writes only the ``i``-th of ``n`` contiguous slices of that
permutation into ``out/part-<i>-of-<n>/`` as a complete shard set of its own (shards
``<name>-p<i>-000000.tar``, its ``manifest.json`` with exact pixel sums, ``skipped.txt``). A part
whose manifest exists was finished and is skipped (after checking it was written with the same
options); an unfinished one is rewritten from scratch, its temporary output removed.
``join_parts(out)`` then checks that all ``n`` parts are there and agree, and writes
``out/manifest.json`` listing every part's shards in part order, with totals and mean/std
recomputed from the summed integers: the result reads exactly like a single run's set (same
samples, same order; shard boundaries differ).

Unreadable images: ``plan.on_bad_image="error"`` stops with an error naming the file;
``"skip"`` leaves them out, counts them in the manifest (``skipped``) and lists them, one
``path<TAB>reason`` per line, in ``skipped.txt`` next to it.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import sys
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from selfsup.pretrain.data.datasets import DatasetError, Sample
from selfsup.pretrain.data.pixel_stats import add_sums, mean_std
from selfsup.pretrain.data.shards import (
    MANIFEST,
    ShardOptions,
    ShardWriteError,
    temp_dir,
    write_shards,
)

BAD_IMAGE_POLICIES = ("error", "skip")
SKIPPED = "skipped.txt"
CHUNK = 16  # images per task sent to a worker process
# fields every part of one import must agree on (besides the "import" record itself)
_SAME = ("format", "split", "encoding", "extension", "image_size", "channels", "bits", "classes", "labelled")


@dataclass
class ImportPlan:
    workers: int = 1  # processes decoding images (1: in this process)
    part: int = 0  # write only slice `part` of `parts` (a SLURM array task)
    parts: int = 1
    on_bad_image: str = "error"  # error | skip
    seed: int = 0  # sample order
    shuffle: bool = True


@dataclass
class ImportResult:
    manifest: dict
    out: Path  # the folder written (``out`` itself, or the part folder)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    reused: bool = False  # a finished part found on disk, not rewritten


def available_cores() -> int:
    """CPU cores this process may use (the SLURM/cgroup allocation, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def parse_part(text: str) -> tuple[int, int]:
    """``"3/8"`` -> (3, 8): part 3 (counting from 0, as ``$SLURM_ARRAY_TASK_ID`` with --array=0-7)."""
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise DatasetError(f"--part must look like I/N (e.g. 3/8), got {text!r}") from None
    if n < 1 or not 0 <= i < n:
        raise DatasetError(f"--part {text}: need 0 <= I < N (parts count from 0)")
    return i, n


def _digits(parts: int) -> int:
    return max(3, len(str(parts - 1)))


def part_dir(out: str | Path, part: int, parts: int) -> Path:
    """``out/part-003-of-008``: where part 3 of 8 is written."""
    w = _digits(parts)
    return Path(out) / f"part-{part:0{w}d}-of-{parts:0{w}d}"


# ------------------------------------------------------------------------------- decoding
_worker_source = None


def _init_worker(src) -> None:
    global _worker_source
    _worker_source = src


def _load(src, i: int) -> tuple[Sample | None, tuple[str, str] | None]:
    try:
        return src.sample(i), None
    except DatasetError as e:
        files = getattr(src, "files", None)
        return None, (str(files[i]) if files is not None else str(i), str(e.__cause__ or e))


def _load_chunk(indices: list[int]) -> list:
    return [_load(_worker_source, i) for i in indices]


def _loaded(src, indices: np.ndarray, workers: int) -> Iterator[tuple[Sample | None, tuple[str, str] | None]]:
    """``_load`` of each index, in order; decoded by ``workers`` processes when > 1."""
    if workers <= 1 or not hasattr(src, "files"):  # in-memory sources gain nothing from a pool
        for i in indices:
            yield _load(src, int(i))
        return
    chunks = (indices[k : k + CHUNK].tolist() for k in range(0, len(indices), CHUNK))
    # forkserver: the workers fork from a fresh single-threaded server, not from this process (a
    # fork of a process that runs threads, e.g. torch's or W&B's, can deadlock the child on a lock
    # some thread held; seen when the import ran after an in-process W&B run); spawn elsewhere
    ctx = mp.get_context("forkserver" if sys.platform.startswith("linux") else "spawn")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(src,)) as pool:
        pending: deque = deque()
        for chunk in chunks:
            pending.append(pool.apply_async(_load_chunk, (chunk,)))
            if len(pending) >= 4 * workers:
                yield from pending.popleft().get()
        while pending:
            yield from pending.popleft().get()


# ------------------------------------------------------------------------------- one import
def _order(n: int, plan: ImportPlan) -> np.ndarray:
    return np.random.default_rng(plan.seed).permutation(n) if plan.shuffle else np.arange(n)


def import_source(src, out: str | Path, options: ShardOptions, plan: ImportPlan, source: str = "") -> ImportResult:
    """Write ``src`` (``len`` + ``sample(i)``) or its part ``plan.part`` into shards; see the module
    docstring. ``source`` is recorded in the manifest (and must match across parts)."""
    if plan.on_bad_image not in BAD_IMAGE_POLICIES:
        raise DatasetError(f"on_bad_image must be one of {', '.join(BAD_IMAGE_POLICIES)}, got {plan.on_bad_image!r}")
    if plan.workers < 1:
        raise DatasetError(f"workers must be >= 1, got {plan.workers}")
    n = len(src)
    if plan.parts > n:
        raise DatasetError(f"{plan.parts} parts but the source has only {n} images")
    lo, hi = plan.part * n // plan.parts, (plan.part + 1) * n // plan.parts
    record = {"part": plan.part, "parts": plan.parts, "seed": plan.seed, "shuffle": plan.shuffle,
              "source": source, "source_samples": n, "on_bad_image": plan.on_bad_image,
              "samples_per_shard": options.samples_per_shard, "max_bytes": options.max_bytes,
              "jpeg_quality": options.jpeg_quality, "labels": getattr(src, "how", "")}  # fmt: skip
    dest = Path(out)
    opts = options
    if plan.parts > 1:
        dest = part_dir(out, plan.part, plan.parts)
        # shards data-p003-000000.tar ...: names stay unique if the parts are ever moved together
        opts = replace(options, name=f"{options.name}-p{plan.part:0{_digits(plan.parts)}d}", overwrite=True)
        done = _finished_part(dest, record)
        if done is not None:
            return ImportResult(done, dest, reused=True)
    skipped: list[tuple[str, str]] = []

    def samples() -> Iterator[Sample]:
        for sample, bad in _loaded(src, _order(n, plan)[lo:hi], plan.workers):
            if bad is None:
                yield sample  # type: ignore[misc]
            elif plan.on_bad_image == "skip":
                skipped.append(bad)
            else:
                raise DatasetError(f"cannot read image {bad[0]}: {bad[1]} (--on-bad-image skip leaves such files out)")
        _write_skipped(dest, skipped)  # before the manifest: a finished set always has its list

    def extra() -> dict:
        return {"skipped": len(skipped), "import": record}

    try:
        manifest = write_shards(samples(), dest, src.classes, opts, total=hi - lo, source=source, extra=extra,
                                factors=getattr(src, "factor_specs", None))
    except BaseException:
        shutil.rmtree(temp_dir(dest, opts.name), ignore_errors=True)
        raise
    return ImportResult(manifest, dest, skipped)


def _write_skipped(dest: Path, skipped: list[tuple[str, str]]) -> None:
    path = dest / SKIPPED
    if not skipped:
        path.unlink(missing_ok=True)  # a stale list from an earlier run would mislead
        return
    dest.mkdir(parents=True, exist_ok=True)
    tmp = dest / f".{SKIPPED}.tmp"
    tmp.write_text("".join(f"{p}\t{' '.join(reason.split())}\n" for p, reason in skipped))
    tmp.replace(path)


def _finished_part(dest: Path, record: dict) -> dict | None:
    """The manifest of a part finished earlier with the same options, else None (rewrite it)."""
    mpath = dest / MANIFEST
    if not mpath.is_file():
        return None
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError:
        return None  # not ours to trust: rewrite
    old = manifest.get("import", {})
    diff = sorted(k for k in record if old.get(k) != record[k])
    if diff:
        raise ShardWriteError(
            f"{dest} was written with other options ({', '.join(f'{k}: {old.get(k)!r} now {record[k]!r}' for k in diff)}); "
            "remove that folder to rewrite it, or run with the same options"
        )
    from selfsup.pretrain.data.stream import ShardError, ShardSet

    try:
        ShardSet.open(dest)  # every shard there with its recorded size
    except ShardError:
        return None
    return manifest


# ------------------------------------------------------------------------------- join
def join_parts(out: str | Path) -> dict:
    """Check the parts under ``out`` and write ``out/manifest.json`` (and ``out/skipped.txt``)."""
    from selfsup.pretrain.data.stream import ShardError, ShardSet

    out = Path(out)
    found = sorted(out.glob("part-*-of-*"))
    if not found:
        raise ShardWriteError(f"{out}: no part-I-of-N folders to join (write them with --part I/N)")
    parts = {int(p.name.split("-")[-1]) for p in found}
    if len(parts) != 1:
        raise ShardWriteError(f"{out}: parts of different splits ({sorted(parts)} parts); keep one")
    n = parts.pop()
    manifests, missing = [], []
    for i in range(n):
        d = part_dir(out, i, n)
        if not (d / MANIFEST).is_file():
            missing.append(i)
            continue
        try:
            manifests.append(ShardSet.open(d).manifest)
        except ShardError as e:
            raise ShardWriteError(f"part {i}: {e}") from e
    if missing:
        raise ShardWriteError(
            f"{out}: {len(missing)} of {n} parts not finished ({', '.join(map(str, missing[:10]))}"
            f"{', ...' if len(missing) > 10 else ''}): no {part_dir(out, missing[0], n).name}/{MANIFEST}; "
            "run those parts (finished ones are skipped), then join again"
        )
    first = manifests[0]
    for i, m in enumerate(manifests):
        rec = {k: v for k, v in m.get("import", {}).items() if k != "part"}
        ref = {k: v for k, v in first.get("import", {}).items() if k != "part"}
        diff = [k for k in _SAME if m.get(k) != first.get(k)] + sorted(k for k in ref if rec.get(k) != ref[k])
        if diff or m.get("import", {}).get("part") != i:
            raise ShardWriteError(f"part {i} disagrees with part 0 on {', '.join(diff) or 'its part number'}")
    sums = add_sums([m["pixel_sums"] for m in manifests])
    mean, std = mean_std(sums, (1 << int(first.get("bits", 8))) - 1)
    shards = [{**s, "file": f"{part_dir(out, i, n).name}/{s['file']}"}
              for i, m in enumerate(manifests) for s in m["shards"]]  # fmt: skip
    manifest = {
        **{k: first[k] for k in ("format", "split", "source", "encoding", "extension", "image_size", "channels", "classes", "labelled")},
        "name": first["name"].rsplit("-p", 1)[0],
        **({"bits": first["bits"]} if "bits" in first else {}),
        "num_samples": sum(m["num_samples"] for m in manifests),
        "mean": mean, "std": std, "pixel_sums": sums,
        "shards": shards,
        "skipped": sum(m.get("skipped", 0) for m in manifests),
        "import": {**{k: v for k, v in first["import"].items() if k != "part"}, "joined": n},
    }  # fmt: skip
    lines = []
    for i in range(n):
        f = part_dir(out, i, n) / SKIPPED
        if f.is_file():
            lines.append(f.read_text())
    if lines:
        (out / f".{SKIPPED}.tmp").write_text("".join(lines))
        (out / f".{SKIPPED}.tmp").replace(out / SKIPPED)
    else:
        (out / SKIPPED).unlink(missing_ok=True)
    tmp = out / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    tmp.replace(out / MANIFEST)
    return manifest
