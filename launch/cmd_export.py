"""``selfsup export``: turn a run's latest checkpoint into a folder a user can keep and share."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HELP = "export a run's backbone as safetensors + config + model card"


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
        "--onnx",
        action="store_true",
        help="also write backbone.onnx, checked against PyTorch (needs selfsup[onnx])",
    )


def run(args: argparse.Namespace) -> int:
    from selfsup.pretrain.export import ExportError, export_run

    run_path = Path(args.run)
    run_dir = run_path.parent.parent if run_path.suffix == ".pt" else run_path
    out = Path(args.out) if args.out else run_dir / "export"
    try:
        paths = export_run(run_path, out, onnx=args.onnx)
    except ExportError as e:
        print(f"selfsup export: error: {e}", file=sys.stderr)
        return 1
    for kind, path in paths.items():
        print(f"{kind:8s} {path}")
    return 0
