"""``selfsup shards``: write a dataset once into WebDataset tar shards with a manifest."""

from __future__ import annotations

import argparse
import json

from selfsup.pretrain.data.datasets import SOURCES, DatasetError, open_source
from selfsup.pretrain.data.shards import (
    DEFAULT_ENCODING,
    ENCODINGS,
    ShardOptions,
    ShardWriteError,
    shuffled,
    write_shards,
)
from selfsup.pretrain.data.stream import ShardError, ShardSet

EXAMPLES = """examples:
  selfsup shards --source embedded --split train --out data/fmnist-train
  selfsup shards --source fashion-mnist --path /usr/share/datasets/fashion-mnist --split test --out data/fm-test
  selfsup shards --source cifar --path ~/cifar-10-batches-py --out data/c10-train --encoding png
  selfsup shards --source folder --path ~/images --size 96 --out data/imgs --max-mb 256
  selfsup shards --source shapes --count 100000 --size 32 --out data/shapes-train
  selfsup shards --source embedded --exclude-classes 8 9 --out data/normal   # anomaly detection
  selfsup shards --verify data/fmnist-train        # re-check sizes and sha256 of an existing set
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = EXAMPLES
    p.add_argument("--source", choices=SOURCES, default="embedded", help="dataset kind (default: embedded)")
    p.add_argument("--path", help="input folder for fashion-mnist / cifar / folder sources")
    p.add_argument("--split", default="train", help="train or test (default: train)")
    p.add_argument("--out", help="output folder for NAME-000000.tar ... and manifest.json")
    p.add_argument("--name", default=None, help="shard file prefix (default: the split)")
    p.add_argument("--encoding", choices=list(ENCODINGS), default=DEFAULT_ENCODING,
                   help=f"image encoding inside the tar (default: {DEFAULT_ENCODING}, fastest to decode)")
    p.add_argument("--per-shard", type=int, default=1000, help="samples per shard (default: 1000)")
    p.add_argument("--max-mb", type=float, default=0, help="also cap each shard at this many MB")
    p.add_argument("--size", type=int, default=64, help="folder/shapes: output side in pixels (default: 64)")
    p.add_argument("--gray", action="store_true", help="folder: store grayscale instead of RGB")
    p.add_argument("--count", type=int, default=10000, help="shapes: number of images (default: 10000)")
    p.add_argument("--seed", type=int, default=0, help="sample order (and shapes content) seed")
    p.add_argument("--exclude-classes", type=int, nargs="+", default=[], metavar="ID",
                   help="leave these class ids out (a 'normal classes only' set to pretrain an anomaly "
                   "detector on; the manifest records them and eval scores them as the anomalies)")
    p.add_argument("--no-shuffle", action="store_true", help="keep the source order (default: seeded shuffle)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing shard set in --out")
    p.add_argument("--verify", metavar="DIR", help="only verify an existing shard set and print its manifest summary")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    try:
        if args.verify:
            ss = ShardSet.open(args.verify, verify_hashes=True)
            print(f"ok: {ss.num_samples} samples in {len(ss.shards)} shards, {ss.shape}, "
                  f"{len(ss.classes)} classes, encoding {ss.manifest['encoding']}")
            return 0
        if not args.out:
            print("error: --out is required (the folder to write the shards into)")
            return 2
        src = open_source(args.source, path=args.path, split=args.split, size=args.size,
                          mode="L" if args.gray else "RGB", count=args.count, seed=args.seed)
        bad = [c for c in args.exclude_classes if not 0 <= c < len(src.classes)]
        if bad:
            raise ShardWriteError(f"--exclude-classes: {bad} are not class ids of {args.source} "
                                  f"(0..{len(src.classes) - 1})")
        samples = iter(src) if args.no_shuffle else shuffled(src, args.seed)
        opts = ShardOptions(
            name=args.name or args.split, split=args.split, encoding=args.encoding,
            samples_per_shard=args.per_shard, max_bytes=int(args.max_mb * 2**20),
            overwrite=args.overwrite, progress=not args.quiet,
            exclude_classes=tuple(args.exclude_classes),
        )
        m = write_shards(samples, args.out, src.classes, opts, total=len(src), source=f"{args.source}:{args.path or ''}")
    except (DatasetError, ShardWriteError, ShardError) as e:
        print(f"error: {e}")
        return 2
    summary = {k: m[k] for k in ("num_samples", "image_size", "channels", "encoding", "mean", "std")}
    print(f"wrote {len(m['shards'])} shards to {args.out}: {json.dumps(summary)}")
    return 0
