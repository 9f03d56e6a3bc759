"""``selfsup export``: turn a run's latest checkpoint into a folder a user can keep and share."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--run",
        required=True,
        help="run directory (uses checkpoints/latest) or one checkpoint file inside it",
    )
    parser.add_argument(
        "--out", default=None, help="export folder to write (default: <run dir>/export)"
    )
    parser.add_argument(
        "--network",
        default="backbone",
        help="which backbone of the checkpoint, by state-dict prefix: backbone (default; what the "
        "method evaluates) or target_backbone (BYOL's EMA target network)",
    )
    parser.add_argument(
        "--onnx",
        action="store_true",
        help="also write backbone.onnx, checked against PyTorch (needs selfsup[onnx])",
    )


def run(args: argparse.Namespace) -> int:
    from selfsup.pretrain.run.export import export_run
    from selfsup.pretrain.run.rundir import EXPORT_DIR, RunDirError, resolve

    try:  # as selfsup.api.export, printing every file written
        where = resolve(args.run)
        out = Path(args.out) if args.out else where.home / EXPORT_DIR
        paths = export_run(where.path, out, onnx=args.onnx, network=args.network)
    except RunDirError as e:
        print(f"selfsup export: error: {e}", file=sys.stderr)
        return 1
    for kind, path in paths.items():
        print(f"{kind:8s} {path}")
    return 0
