"""The ``selfsup`` command: one entry point, one module per subcommand.

Each subcommand lives in its own module (``MODULES``: ``selfsup.launch.cli.<name>``, the demo in
``selfsup.launch.demo.command``) and defines
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
    "demo": "the whole pipeline on the embedded data: shards, pretrain, eval, export "
    "(--compare: every method, one table)",
}


MODULES = {name: f"selfsup.launch.cli.{name}" for name in SUBCOMMANDS}
MODULES["demo"] = "selfsup.launch.demo.command"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="selfsup",
        description="Distributed self-supervised pretraining for images. "
        "Run 'selfsup <command> --help' for the options of one command.",
    )
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for name, help_text in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in SUBCOMMANDS:
        build_parser().parse_args(argv)  # prints help or the "invalid choice" error
        build_parser().print_help()
        return 2
    name = argv[0]
    module = importlib.import_module(MODULES[name])
    parser = argparse.ArgumentParser(prog=f"selfsup {name}", description=SUBCOMMANDS[name])
    module.add_arguments(parser)
    # intermixed: options may come before or after key=value overrides
    return int(module.run(parser.parse_intermixed_args(argv[1:])) or 0)


if __name__ == "__main__":
    sys.exit(main())
