"""``selfsup shards``: write a dataset once into WebDataset tar shards with a manifest."""

from __future__ import annotations

import argparse
import json

from selfsup.pretrain.data.datasets import DatasetError
from selfsup.pretrain.data.folders import LABEL_MODES
from selfsup.pretrain.data.import_parallel import (
    BAD_IMAGE_POLICIES,
    SKIPPED,
    ImportPlan,
    available_cores,
    import_source,
    join_parts,
    parse_part,
)
from selfsup.pretrain.data.shards import DEFAULT_ENCODING, ENCODINGS, ShardOptions, ShardWriteError
from selfsup.pretrain.data.sources import SOURCES, open_source

EXAMPLES = """examples:
  # a folder of photos, flat or nested, no labels (pretraining needs none)
  selfsup shards --source folder --path photos/ --size 96 --out data/photos
  # labelled by sub-folder, root/<class>/<image> (auto-detected; --labels folders insists)
  selfsup shards --source folder --path ~/pets --labels folders --size 96 --out data/pets
  # a list file: one path per line, optionally a label after a tab or a comma;
  # relative paths are resolved against the list file's folder
  selfsup shards --source list --path /data/files.txt --size 128 --out data/mine
  # leave unreadable images out (they are listed in data/photos/skipped.txt) instead of stopping
  selfsup shards --source folder --path photos/ --on-bad-image skip --out data/photos
  # a SLURM array of 8 tasks (rerun the array after a crash: finished parts are skipped), then join
  sbatch --array=0-7 --cpus-per-task 8 --wrap \\
      'selfsup shards --source folder --path /big --out /scratch/big --part $SLURM_ARRAY_TASK_ID/8'
  selfsup shards --join /scratch/big

built-in and downloaded sets:
  selfsup shards --source embedded --split train --out data/fmnist-train
  selfsup shards --source fashion-mnist --path /usr/share/datasets/fashion-mnist --split test --out data/fm-test
  selfsup shards --source cifar --path ~/cifar-10-batches-py --out data/c10-train --encoding png
  selfsup shards --source shapes --count 100000 --size 32 --out data/shapes-train   (records factors)
  selfsup shards --source embedded --exclude-classes 8 9 --out data/normal   # anomaly detection
  selfsup shards --verify data/fmnist-train        # re-check sizes and sha256 of an existing set

Images are converted as a viewer shows them (EXIF rotation applied, transparency on white, CMYK
and 16-bit converted), resized so the shorter side is --size and centre-cropped. --workers
processes decode them (default: every core this job may use); the shards are the same bytes for
any number of workers. A folder of images can also go straight to 'selfsup pretrain
data.train=photos/', which writes these shards into a cache folder first.
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = EXAMPLES
    p.add_argument("--source", choices=SOURCES, default="embedded", help="dataset kind (default: embedded)")
    p.add_argument("--path", help="input: a folder (folder, fashion-mnist, cifar) or a list file (list)")
    p.add_argument("--labels", choices=LABEL_MODES, default="auto",
                   help="folder: 'folders' = the first-level sub-folder is the class; 'none' = no labels; "
                   "'auto' (default) = folders when every image is in a sub-folder. list: auto | none")
    p.add_argument("--split", default="train", help="train or test (default: train)")
    p.add_argument("--out", help="output folder for NAME-000000.tar ... and manifest.json")
    p.add_argument("--name", default=None, help="shard file prefix (default: the split)")
    p.add_argument("--encoding", choices=["auto", *ENCODINGS], default=DEFAULT_ENCODING,
                   help=f"image encoding inside the tar (default: {DEFAULT_ENCODING}: raw up to 64x64 px, "
                        "JPEG q95 above for RGB, PNG above for grey; docs/data.md)")
    p.add_argument("--per-shard", type=int, default=1000, help="samples per shard (default: 1000)")
    p.add_argument("--max-mb", type=float, default=0, help="also cap each shard at this many MB")
    p.add_argument("--size", type=int, default=64, help="folder/list/shapes: output side in pixels (default: 64)")
    p.add_argument("--gray", action="store_true", help="folder/list: store grayscale instead of RGB")
    p.add_argument("--multichannel", action="store_true",
                   help="folder/list: keep every channel (1..16) of .npy [H, W, C] arrays, TIFF pages, PNG-16")
    p.add_argument("--keep-depth", action="store_true",
                   help="with --multichannel: keep 16-bit pixels as 16 bits (default: scaled to 8)")
    p.add_argument("--on-bad-image", choices=BAD_IMAGE_POLICIES, default="error",
                   help=f"an unreadable image: stop with an error naming it (default), or skip it and list it in OUT/{SKIPPED}")
    p.add_argument("--workers", type=int, default=None,
                   help="folder/list: processes decoding images (default: every core this job may use)")
    p.add_argument("--part", metavar="I/N", default=None,
                   help="write only part I of N (from 0) into OUT/part-I-of-N/, e.g. $SLURM_ARRAY_TASK_ID/8; "
                   "a finished part is skipped; then --join OUT")
    p.add_argument("--join", metavar="DIR", help="join the finished parts in DIR into DIR/manifest.json")
    p.add_argument("--count", type=int, default=10000, help="shapes: number of images (default: 10000)")
    p.add_argument("--seed", type=int, default=0, help="sample order (and shapes content) seed")
    p.add_argument("--exclude-classes", type=int, nargs="+", default=[], metavar="ID",
                   help="leave these class ids out (a 'normal classes only' set to pretrain an anomaly "
                   "detector on; the manifest records them and eval scores them as the anomalies)")
    p.add_argument("--no-shuffle", action="store_true", help="keep the source order (default: seeded shuffle)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing shard set in --out")
    p.add_argument("--verify", metavar="DIR", help="only verify an existing shard set and print its manifest summary")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _summary(m: dict) -> str:
    return json.dumps({k: m.get(k) for k in ("num_samples", "image_size", "channels", "encoding", "labelled",
                                             "mean", "std", "skipped")})  # fmt: skip


def run(args: argparse.Namespace) -> int:
    try:
        if args.verify or args.join:
            return _verify_or_join(args)
        if not args.out:
            print("error: --out is required (the folder to write the shards into)")
            return 2
        part, parts = parse_part(args.part) if args.part else (0, 1)
        src = open_source(args.source, path=args.path, split=args.split, size=args.size,
                          mode="any" if args.multichannel else "L" if args.gray else "RGB", count=args.count,
                          seed=args.seed, labels=args.labels, keep_depth=args.keep_depth)  # fmt: skip
        if args.keep_depth and not args.multichannel:
            raise DatasetError("--keep-depth needs --multichannel (RGB/grey imports are 8-bit)")
        if hasattr(src, "describe"):
            print(src.describe(), flush=True)
        bad = [c for c in args.exclude_classes if not 0 <= c < len(src.classes)]
        if bad:
            raise ShardWriteError(f"--exclude-classes: {bad} are not class ids of {args.source} "
                                  f"(0..{len(src.classes) - 1})")
        opts = ShardOptions(
            name=args.name or args.split, split=args.split, encoding=args.encoding,
            samples_per_shard=args.per_shard, max_bytes=int(args.max_mb * 2**20),
            overwrite=args.overwrite, progress=not args.quiet,
            exclude_classes=tuple(args.exclude_classes),
        )
        plan = ImportPlan(workers=args.workers or available_cores(), part=part, parts=parts,
                          on_bad_image=args.on_bad_image, seed=args.seed, shuffle=not args.no_shuffle)
        res = import_source(src, args.out, opts, plan, source=f"{args.source}:{args.path or ''}")
    except (DatasetError, ShardWriteError) as e:
        print(f"error: {e}")
        return 2
    m = res.manifest
    what = f"part {part}/{parts}: " if parts > 1 else ""
    if res.reused:
        print(f"{what}already written in {res.out} ({m['num_samples']} samples): skipped")
    else:
        print(f"{what}wrote {len(m['shards'])} shards to {res.out}: {_summary(m)}")
    if res.skipped:
        print(f"skipped {len(res.skipped)} unreadable images, listed in {res.out / SKIPPED}")
    if parts > 1:
        print(f"when all {parts} parts are written: selfsup shards --join {args.out}")
    return 0


def _verify_or_join(args: argparse.Namespace) -> int:
    from selfsup.pretrain.data.stream import ShardError, ShardSet

    try:
        if args.join:
            m = join_parts(args.join)
            print(f"joined {m['import']['joined']} parts into {args.join}/manifest.json: {_summary(m)}")
            return 0
        ss = ShardSet.open(args.verify, verify_hashes=True)
    except (ShardError, ShardWriteError) as e:
        print(f"error: {e}")
        return 2
    labels = f"{len(ss.classes)} classes" if ss.labelled else "unlabelled"
    print(f"ok: {ss.num_samples} samples in {len(ss.shards)} shards, {ss.shape}, "
          f"{labels}, encoding {ss.manifest['encoding']}")
    return 0
