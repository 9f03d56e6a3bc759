"""The ``selfsup`` command: one entry point, one module per subcommand.

Each subcommand lives in ``selfsup.launch.cmd_<name>`` and defines ``HELP`` (one line),
``add_arguments(parser)`` and ``run(args) -> int``. Modules are imported only when their
subcommand runs, so ``selfsup --help`` stays fast and a broken optional piece cannot break the rest.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = {
    "shards": "write a dataset into WebDataset tar shards with a manifest",
    "views": "draw a PNG grid of augmented views of a few shard images",
    "pretrain": "pretrain a backbone (SimCLR / MAE / DAE) on a shard set",
    "eval": "evaluate a checkpoint or export: linear probe, kNN, retrieval, anomaly AUROC, plot",
    "export": "export a run's backbone as safetensors + config + model card",
    "demo": "the whole pipeline on the embedded data: shards, pretrain, eval, export",
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="selfsup",
        description="Distributed self-supervised pretraining for images. "
        "Run 'selfsup <command> --help' for the options of one command.",
    )
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    wanted = argv[0] if argv and argv[0] in SUBCOMMANDS else None
    for name, help_text in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == wanted:
            module = importlib.import_module(f"selfsup.launch.cmd_{name}")
            module.add_arguments(p)
            p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return int(args._module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
