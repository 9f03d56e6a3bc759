"""Reading images for training: this package's shard reader vs a plain folder of PNG files.

Same images, same batch size, same DataLoader worker count, one run:

  (a) ``ShardLoader(ShardStream(...))`` over tar shards written by
      ``selfsup.pretrain.data.shards.write_shards``, with ``raw`` (uint8 bytes) and ``png`` payloads;
  (b) a folder ``root/<class>/<key>.png`` read by a map-style ``Dataset`` that opens each file
      with PIL, through ``DataLoader(shuffle=True)`` (what torchvision's ImageFolder does).

PNGs are written with the same encoder settings in (a) and (b) (PIL, ``compress_level=1``, what
the shard writer uses), so the png rows differ only in the container: one tar stream per 1000
samples vs one file per image. Datasets: the embedded Fashion-MNIST train subset (28x28x1) and
procedural shapes (``selfsup.pretrain.data.datasets.shapes``, RGB). Both readers shuffle, both drop
the last partial batch.

Reported per row: images/s over one full pass, wall clock from ``iter()`` to the last batch (so
worker start-up counts: it is part of every epoch since neither loader keeps workers alive), best
of ``--repeats`` passes run round-robin across the readers so that load from other users of the
machine falls on all of them alike; and the bytes each format occupies (file sizes, and the
blocks the file system allocated: small files each round up to a block).

    .venv/bin/python benchmarks/bench_reader.py                      # ~2.5 min on 2 busy cores
    .venv/bin/python benchmarks/bench_reader.py --n 20000 --workers 0 2 4 --repeats 5

``--decode-table`` (the measurement behind ``--encoding auto``, docs/data.md) instead prints bytes
per image and decode µs per image for raw/PNG/JPEG q95 at 28/32/64/96/224 px, grey and RGB, on
synthetic images with natural-image statistics (1/f amplitude spectrum: PNG/JPEG compress them
about as well as photographs, unlike the flat procedural shapes). ``--overhead`` times one shard
reader worker (``ShardStream``, workers=0, batches collated) against a bare PIL decode loop over
the same payload bytes at 96 and 224 px RGB, in interleaved pairs of passes, in CPU time, and
prints the median of reader/bare over the pairs with the lowest and highest pair (on a shared
machine single passes moved by +-20 %; for a figure that does not move, count instructions with
``valgrind --tool=cachegrind``, docs/data.md):

    .venv/bin/python benchmarks/bench_reader.py --decode-table --overhead --repeats 3
"""

from __future__ import annotations

import argparse
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from selfsup.pretrain.data.datasets import ArraySource, embedded, shapes
from selfsup.pretrain.data.shards import ShardOptions, encode_image, shuffled, write_shards
from selfsup.pretrain.data.stream import ShardLoader, ShardSet, ShardStream
from selfsup.pretrain.data.tar_reader import tar_samples

READERS = ("shards-raw", "shards-png", "png-folder")


class PNGFolder(Dataset):
    """(b): one PNG file per image, decoded with PIL in ``__getitem__``."""

    def __init__(self, root: Path, classes: list[str], channels: int) -> None:
        self.files = [
            (p, c) for c in range(len(classes)) for p in sorted((root / str(c)).glob("*.png"))
        ]
        self.mode = "L" if channels == 1 else "RGB"
        if not self.files:
            raise FileNotFoundError(f"{root}: no PNG files")

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.files[i]
        with Image.open(path) as im:
            arr = np.array(im.convert(self.mode), dtype=np.uint8)  # writable, as torchvision
        if arr.ndim == 2:
            arr = arr[..., None]
        return torch.from_numpy(arr).permute(2, 0, 1), label


def write_png_folder(src: ArraySource, root: Path) -> None:
    """``root/<label>/<key>.png`` with the shard writer's PNG settings."""
    for s in src:
        folder = root / str(s.label)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{s.key}.png").write_bytes(encode_image(s.image, "png"))


def disk_bytes(paths: Iterable[Path]) -> tuple[int, int]:
    """(sum of file sizes, bytes allocated on disk) of the regular files under ``paths``."""
    size = alloc = 0
    for top in paths:
        for p in [top] if top.is_file() else top.rglob("*"):
            if p.is_file():
                st = p.stat()
                size += st.st_size
                alloc += st.st_blocks * 512
    return size, alloc


def one_pass(make: Callable[[], Iterable], image_key: int | str) -> tuple[int, float]:
    """(images, seconds) for one full pass; the loader is built inside the timed region."""
    t0 = time.perf_counter()
    n = 0
    for batch in make():
        n += batch[image_key].shape[0]
    return n, time.perf_counter() - t0


def readers(
    folders: dict[str, Path], classes: list[str], channels: int, batch: int, workers: int, seed: int
) -> dict[str, tuple[Callable[[], Iterable], int | str]]:
    def shard_loader(path: Path) -> Callable[[], Iterable]:
        ss = ShardSet.open(path)
        return lambda: ShardLoader(ShardStream(ss, batch, workers=workers, seed=seed))

    png = PNGFolder(folders["png-folder"], classes, channels)

    def folder_loader() -> Iterable:
        return DataLoader(
            png, batch_size=batch, shuffle=True, drop_last=True, num_workers=workers,
            prefetch_factor=4 if workers else None, generator=torch.Generator().manual_seed(seed),
        )  # fmt: skip

    return {
        "shards-raw": (shard_loader(folders["shards-raw"]), "images"),
        "shards-png": (shard_loader(folders["shards-png"]), "images"),
        "png-folder": (folder_loader, 0),
    }


def prepare(name: str, src: ArraySource, tmp: Path, per_shard: int) -> dict[str, Path]:
    folders = {r: tmp / name / r for r in READERS}
    for enc in ("raw", "png"):
        opts = ShardOptions(name="train", encoding=enc, samples_per_shard=per_shard, progress=False)
        write_shards(shuffled(src, 0), folders[f"shards-{enc}"], src.classes, opts, total=len(src))
    write_png_folder(src, folders["png-folder"])
    return folders


def natural(n: int, size: int, channels: int, seed: int = 0) -> np.ndarray:
    """``n`` uint8 images ``[size, size, channels]`` with a 1/f amplitude spectrum (natural-image-like)."""
    rng = np.random.default_rng(seed)
    f = np.hypot(*np.meshgrid(np.fft.fftfreq(size), np.fft.rfftfreq(size), indexing="ij"))
    f[0, 0] = 1.0
    out = np.empty((n, size, size, channels), np.uint8)
    for i in range(n):
        spec = (rng.normal(size=(channels, *f.shape)) + 1j * rng.normal(size=(channels, *f.shape))) / f
        img = np.fft.irfft2(spec, s=(size, size)).transpose(1, 2, 0)
        img = (img - img.mean()) / (img.std() + 1e-9)
        out[i] = np.clip(128 + 48 * img, 0, 255).astype(np.uint8)
    return out


def bare_decode(payload: bytes, enc: str, shape: tuple[int, int, int]) -> np.ndarray:
    """What a decode-only worker does: bytes -> uint8 HWC (PIL; ``draft`` for JPEG, a no-op at full size)."""
    if enc == "raw":
        return np.frombuffer(payload, np.uint8).reshape(shape).copy()  # an owned array, as a worker returns
    with Image.open(io.BytesIO(payload)) as im:
        if enc == "jpeg":
            im.draft(im.mode, shape[:2])
        return np.asarray(im)


def decode_table(sizes: list[int], n: int, repeats: int) -> None:
    print(f"\nbytes/img and decode µs/img (best of {repeats}; {n} synthetic 1/f images per cell)")
    print(f"{'px':>5}{'ch':>4}" + "".join(f"{e + ' B':>11}{e + ' µs':>10}" for e in ("raw", "png", "jpeg")))
    for size in sizes:
        for ch in (1, 3):
            imgs = natural(n, size, ch)
            cells = []
            for enc in ("raw", "png", "jpeg"):
                payloads = [encode_image(im, enc) for im in imgs]
                best = float("inf")
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    for b in payloads:
                        bare_decode(b, enc, imgs.shape[1:])
                    best = min(best, (time.perf_counter() - t0) / n)
                cells.append(f"{np.mean([len(b) for b in payloads]):>11,.0f}{best * 1e6:>10.1f}")
            print(f"{size:>5}{ch:>4}" + "".join(cells), flush=True)


def overhead(sizes: list[int], n: int, batch: int, repeats: int, tmp: Path) -> None:
    """Shard reader (one worker) vs the bare decode loop over the same bytes, in pairs: each repeat
    times one reader pass then one bare pass, in CPU seconds of this process (``time.process_time``:
    time the scheduler gives to other users of a shared machine does not count), and the overhead is
    the median over the pairs of reader/bare - 1, with the lowest and highest pair beside it."""
    print(f"\nreader vs bare decode, one worker, RGB, {n} images, batch {batch}, {repeats} interleaved pairs, "
          "CPU time")
    print(f"{'px':>5}{'enc':>6}{'B/img':>9}{'reader µs/img':>15}{'bare µs/img':>13}{'overhead':>10}{'pairs min..max':>17}")
    for size in sizes:
        imgs = natural(n, size, 3)
        src = ArraySource(f"n{size}", imgs, np.zeros(n, np.int64), ["x"])
        for enc in ("raw", "jpeg", "png"):
            out = tmp / f"ov-{size}-{enc}"
            opts = ShardOptions(name="train", encoding=enc, samples_per_shard=1000, progress=False)
            write_shards(iter(src), out, src.classes, opts, total=n)
            ss = ShardSet.open(out)
            payloads = [encode_image(im, enc) for im in imgs]
            rd, bare, ratios = [], [], []
            for _ in range(repeats):
                t0 = time.process_time()
                k = sum(b["images"].shape[0] for b in ShardLoader(ShardStream(ss, batch, workers=0, seed=0)))
                rd.append((time.process_time() - t0) / k)
                t0 = time.process_time()
                for b in payloads:
                    bare_decode(b, enc, imgs.shape[1:])
                bare.append((time.process_time() - t0) / n)
                ratios.append(rd[-1] / bare[-1] - 1)
            print(f"{size:>5}{enc:>6}{np.mean([len(b) for b in payloads]):>9,.0f}{np.median(rd) * 1e6:>15.1f}"
                  f"{np.median(bare) * 1e6:>13.1f}{np.median(ratios):>9.1%}"
                  f"{f'{min(ratios):.0%}..{max(ratios):.0%}':>17}", flush=True)


def one_part(folder: str, enc: str, part: str, batch: int, passes: int) -> None:
    """``passes`` passes of ``part`` over a written set (``reader``, ``bare``, or ``none``: only load
    the payloads, the part the other two share, once): the process ``--instructions`` counts."""
    ss = ShardSet.open(folder)
    payloads = [s[ss.extension] for url in ss.urls for s in tar_samples(url)]
    for _ in range(passes if part != "none" else 0):
        if part == "reader":
            sum(b["images"].shape[0] for b in ShardLoader(ShardStream(ss, batch, workers=0, seed=0)))
        elif part == "bare":
            for b in payloads:
                bare_decode(b, enc, (ss.height, ss.width, ss.channels))


def instructions(sizes: list[int], n: int, batch: int, passes: int, tmp: Path) -> None:
    """Instructions per image of the reader and of the bare decode (valgrind cachegrind: user space
    only, system calls not counted), each over ``passes`` passes minus a process that only loads the
    payloads. Not exactly repeatable: a process's start-up (imports) moved by ~20M instructions from
    run to run, which the passes spread over passes x n images (+-3k per image at 4 x 1024, about
    +-0.3 point of overhead); the hash seed is fixed. Time on this machine moves by +-20 %."""
    if shutil.which("valgrind") is None:
        print("\n--instructions needs valgrind (apt install valgrind)")
        return
    print(f"\nreader vs bare decode, instructions per image (thousands), RGB, {n} images x {passes} passes, "
          f"batch {batch}")
    print(f"{'px':>5}{'enc':>6}{'reader kinstr':>15}{'bare kinstr':>13}{'overhead':>10}")
    for size in sizes:
        imgs = natural(n, size, 3)
        src = ArraySource(f"n{size}", imgs, np.zeros(n, np.int64), ["x"])
        for enc in ("jpeg", "png"):
            out = tmp / f"ir-{size}-{enc}"
            write_shards(iter(src), out, src.classes,
                         ShardOptions(name="train", encoding=enc, samples_per_shard=1000, progress=False), total=n)  # fmt: skip
            procs = {part: subprocess.Popen(
                ["valgrind", "--tool=cachegrind", "--cache-sim=no", "--cachegrind-out-file=/dev/null",
                 sys.executable, __file__, "--part", str(out), enc, part, "--batch", str(batch), "--instr-passes", str(passes)],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONHASHSEED": "0"}) for part in ("none", "reader", "bare")}  # fmt: skip
            count = {}
            for part, proc in procs.items():
                err = proc.communicate()[1]
                found = re.search(r"I\s+refs:\s+([\d,]+)", err)
                if proc.returncode != 0 or found is None:
                    raise SystemExit(f"valgrind {part} failed:\n{err[-2000:]}")
                count[part] = int(found.group(1).replace(",", ""))
            rd, bare = ((count[k] - count["none"]) / (n * passes) for k in ("reader", "bare"))
            print(f"{size:>5}{enc:>6}{rd / 1e3:>15,.0f}{bare / 1e3:>13,.0f}{rd / bare - 1:>9.1%}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=10000, help="shapes images (the embedded set has 10000)")
    p.add_argument("--shapes-size", type=int, default=64, help="side of the RGB shapes images")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="DataLoader worker counts")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--per-shard", type=int, default=1000, help="samples per tar shard")
    p.add_argument("--repeats", type=int, default=2, help="passes per reader (best one reported)")
    p.add_argument("--datasets", nargs="+", default=["fmnist", "shapes"], choices=["fmnist", "shapes"])
    p.add_argument("--tmp", default=None, help="scratch folder (default: a fresh temporary one)")
    p.add_argument("--decode-table", action="store_true", help="bytes and decode µs per encoding and size")
    p.add_argument("--overhead", action="store_true", help="shard reader vs bare decode at --overhead-sizes")
    p.add_argument("--table-sizes", type=int, nargs="+", default=[28, 32, 64, 96, 224])
    p.add_argument("--overhead-sizes", type=int, nargs="+", default=[96, 224])
    p.add_argument("--overhead-n", type=int, default=2048, help="images per --overhead set")
    p.add_argument("--instructions", action="store_true",
                   help="reader vs bare decode in instructions per image (valgrind) at --overhead-sizes")
    p.add_argument("--instr-passes", type=int, default=4, help="passes per --instructions count")
    p.add_argument("--part", nargs=3, metavar=("FOLDER", "ENC", "PART"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.part:
        one_part(*args.part, args.batch, args.instr_passes)
        return
    if args.instructions:
        with tempfile.TemporaryDirectory(dir=args.tmp) as tmpdir:
            instructions(args.overhead_sizes, args.overhead_n, args.batch, args.instr_passes, Path(tmpdir))
        if not (args.decode_table or args.overhead):
            return
    if args.decode_table or args.overhead:
        print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} cores")
        if args.decode_table:
            decode_table(args.table_sizes, 200, args.repeats)
        if args.overhead:
            with tempfile.TemporaryDirectory(dir=args.tmp) as tmpdir:
                overhead(args.overhead_sizes, args.overhead_n, args.batch, args.repeats, Path(tmpdir))
        print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        return

    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} cores; "
          f"torch threads {torch.get_num_threads()}; batch {args.batch}; best of {args.repeats}")
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmpdir:
        tmp = Path(tmpdir)
        results: dict[tuple[str, int, str], float] = {}
        sizes: dict[tuple[str, str], tuple[int, int]] = {}
        for ds in args.datasets:
            t0 = time.perf_counter()
            if ds == "fmnist":
                src = embedded("train")
            else:
                src = shapes(args.n, size=args.shapes_size, seed=0)
            folders = prepare(ds, src, tmp, args.per_shard)
            h, w, c = src.images.shape[1:]
            label = f"{ds} {len(src)}x{h}x{w}x{c}"
            print(f"\n[{label}] written in {time.perf_counter() - t0:.1f} s")
            for r in READERS:
                sizes[(label, r)] = disk_bytes([folders[r]])
            for wk in args.workers:
                rs = readers(folders, src.classes, c, args.batch, wk, seed=0)
                best = dict.fromkeys(READERS, 0.0)
                for _ in range(args.repeats):
                    for r in READERS:
                        n, sec = one_pass(*rs[r])
                        best[r] = max(best[r], n / sec)
                for r in READERS:
                    results[(label, wk, r)] = best[r]
                print(f"  workers {wk}: " + ", ".join(f"{r} {best[r]:,.0f} img/s" for r in READERS), flush=True)

        labels = list(dict.fromkeys(k[0] for k in results))
        print(f"\nimages/s (best of {args.repeats} passes; one pass = one epoch, worker start-up included)")
        head = f"{'data':<24}{'workers':>8}" + "".join(f"{r:>13}" for r in READERS)
        head += f"{'raw/folder':>12}{'png/folder':>12}{'raw/png':>9}"
        print(head)
        print("-" * len(head))
        for label in labels:
            for wk in args.workers:
                v = {r: results[(label, wk, r)] for r in READERS}
                print(
                    f"{label:<24}{wk:>8}" + "".join(f"{v[r]:>13,.0f}" for r in READERS)
                    + f"{v['shards-raw'] / v['png-folder']:>11.2f}x{v['shards-png'] / v['png-folder']:>11.2f}x"
                    + f"{v['shards-raw'] / v['shards-png']:>8.2f}x"
                )
        print("\ndisk: file bytes / allocated bytes (MiB)")
        print(f"{'data':<24}" + "".join(f"{r:>22}" for r in READERS))
        for label in labels:
            cells = [f"{s / 2**20:.2f} / {a / 2**20:.2f}" for s, a in (sizes[(label, r)] for r in READERS)]
            print(f"{label:<24}" + "".join(f"{c:>22}" for c in cells))
    print(f"\nload average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
