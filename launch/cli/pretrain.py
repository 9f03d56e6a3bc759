"""``selfsup pretrain``: train a backbone with one of the methods on a shard set."""

from __future__ import annotations

import argparse
import errno
import os
import sys

EXAMPLES = """The config is a recipe under configs/ plus key.sub=value overrides, checked before any data is
read (an unknown key or a wrong type is an error that names it). The global batch
(data.batch_size) is split over all processes; the process group comes from the launcher:

  selfsup pretrain --config configs/simclr_demo.yaml data.train=data/train run_dir=runs/a
  ACCELERATE_USE_CPU=1 torchrun --standalone --nproc_per_node 2 -m selfsup.launch.cli pretrain \\
      --config configs/simclr_demo.yaml data.train=data/train run_dir=runs/b
  accelerate launch --multi_gpu --num_processes 8 -m selfsup.launch.cli pretrain --config ...
  srun ... python -m selfsup.launch.cli pretrain --config ...   (see SLURM.md)

data.train may also be a folder of images (no manifest.json): it is written once into shards
under <run_dir>/../.shard-cache/ (or $SELFSUP_CACHE) at data.folder_size px, and reused:
  selfsup pretrain --config configs/simclr_demo.yaml data.train=photos/ data.folder_size=96

Starting from weights (local files only; the key report goes to <run_dir>/init.json):
  selfsup pretrain ... model.init=runs/demo/export            an export folder of this project
  selfsup pretrain ... model.backbone=resnet50 model.stem=imagenet model.init=/w/resnet50.pth
  selfsup pretrain ... model.backbone=vit_small model.patch_size=16 \\
      model.init=timm:vit_small_patch16_224:/w/vit_s.safetensors
model.init_strict=false loads what fits and keeps the rest random (docs/start_from_weights.md).

Stopping: SIGUSR1 or SIGTERM -> checkpoint at the end of the current step, exit 0.
Resuming: --resume auto continues from run_dir/checkpoints/latest (same W&B run).
One writer per run_dir: a second `selfsup pretrain` into a folder in use exits 2 naming the holder.
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = EXAMPLES
    p.add_argument("--config", help="recipe YAML (e.g. configs/simclr_demo.yaml); defaults if omitted")
    p.add_argument("--resume", default=None, metavar="auto|PATH",
                   help="'auto': continue from the latest checkpoint if there is one; or a checkpoint file")
    p.add_argument("--break-lock", action="store_true",
                   help="take the run directory's lock even if it names another host's run: DANGEROUS if "
                        "that run is alive (both would write the same files); see docs/run_directory.md")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")


def run(args: argparse.Namespace) -> int:
    import yaml

    from selfsup.config import ConfigError, load_config, to_dict

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}")
        return 2
    if args.print_config:
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        return 0
    if not cfg.data.train:
        print("config error: data.train is empty: point it at a shard set (selfsup shards --out DIR)")
        return 2

    from selfsup.api import pretrain_config
    from selfsup.pretrain.data.shard_cache import CacheError
    from selfsup.pretrain.data.stream import ShardError
    from selfsup.pretrain.loop.train import TrainingError
    from selfsup.pretrain.run.lock import RunLockError
    from selfsup.pretrain.run.rundir import RunDirError

    try:
        pretrain_config(cfg, resume=args.resume, break_lock=args.break_lock)
    except RunLockError as e:  # before anything was written: exit 2 like a usage error
        print(f"error: {e}", flush=True)
        return 2
    except ConfigError as e:
        print(f"config error: {e}", flush=True)
        return 2
    except (CacheError, ShardError, RunDirError, TrainingError) as e:
        print(f"error: {e}", flush=True)
        if _disk_full(e):  # W&B's service died with the disk; its exit hook would wait for ever
            sys.stderr.flush()
            os._exit(1)
        return 1
    except Exception as e:
        from selfsup.pretrain.loop.peers import diagnose, is_collective_failure

        if not is_collective_failure(e):
            raise
        message = f"error: lost a process of the job: {diagnose(e)}"
        print(message, flush=True)
        print(message, file=sys.stderr, flush=True)
        return 1
    return 0



def _disk_full(e: BaseException | None) -> bool:
    while e is not None:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        e = e.__cause__ or e.__context__
    return False
