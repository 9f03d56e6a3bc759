"""``selfsup views``: a PNG grid of a few shard images and several augmented views of each.

The views come from exactly the code a training run uses (``build_views`` with the run's
``augment`` section), so the picture shows what the model will see.
"""

from __future__ import annotations

import argparse

import torch

from selfsup.augment.grid import save_grid, to_unit
from selfsup.augment.pixels import to_unit as pixels_unit
from selfsup.augment.views import build_views
from selfsup.config import ConfigError, load_config
from selfsup.data_info import DataInfo
from selfsup.pretrain.data.stream import ShardError, ShardSet, ShardStream

EXAMPLES = """examples:
  selfsup views --shards data/fmnist-train --out views.png
  selfsup views --shards data/shapes-train --out byol.png augment.recipe=byol augment.size=64
  selfsup views --shards data/c10-train --config configs/simclr_cifar.yaml --n-views 8 --seed 3
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = EXAMPLES
    p.add_argument("--shards", required=True, help="shard set folder (with manifest.json)")
    p.add_argument("--out", default="views.png", help="output PNG (default: views.png)")
    p.add_argument("--n-images", type=int, default=8, help="source images = grid rows (default: 8)")
    p.add_argument("--n-views", type=int, default=6, help="views per image (default: 6)")
    p.add_argument("--config", default=None, help="recipe YAML whose augment section is used")
    p.add_argument("--seed", type=int, default=0, help="seed of the random view parameters")
    p.add_argument("--channels", type=int, nargs="+", default=None, metavar="K",
                   help="images with C other than 1 or 3: the 1 or 3 channels to show (default: 0 1 2)")
    p.add_argument(
        "--tile", type=int, default=96, help="side of each grid tile in pixels (default: 96)"
    )
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key.sub=value",
        help="config overrides, e.g. augment.recipe=mae",
    )


def first_images(shardset: ShardSet, n: int) -> torch.Tensor:
    """The first ``n`` images in manifest order (reads only as many shards as needed)."""
    stream = ShardStream(
        shardset, batch_size=n, shuffle=False, drop_last=False, max_corrupt_fraction=0.0
    )
    return next(iter(stream))["images"]


def run(args: argparse.Namespace) -> int:
    for name in ("n_images", "n_views", "tile"):
        if getattr(args, name) < 1:
            print(f"error: --{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
            return 2
    try:
        cfg = load_config(args.config, args.overrides)
        shardset = ShardSet.open(args.shards)
        info = DataInfo(
            shardset.channels, shardset.image_size, tuple(shardset.mean), tuple(shardset.std)
        )
        views = build_views(cfg.augment, info)
    except (ConfigError, ShardError, ValueError) as e:
        print(f"error: {e}")
        return 2
    images = first_images(shardset, min(args.n_images, shardset.num_samples))
    generator = torch.Generator().manual_seed(args.seed)
    drawn = views(images, n_views=args.n_views, generator=generator)
    per_view = [to_unit(v, views.mean, views.std) for v in drawn]
    source = pixels_unit(images)  # uint8 / 255, or 16-bit / 65535: scaled for display
    rows = [[source[i]] + [v[i] for v in per_view] for i in range(len(images))]
    labels = ["source"] + [f"view {k + 1}" for k in range(args.n_views)]
    try:
        out = save_grid(rows, args.out, tile=args.tile, col_labels=labels, channels=args.channels)
    except ValueError as e:
        print(f"error: --channels: {e}")
        return 2
    print(f"wrote {out}: {len(rows)} images x {args.n_views} views ({cfg.augment.recipe} recipe)")
    return 0
