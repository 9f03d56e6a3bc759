"""``selfsup demo``: the whole pipeline on the embedded data, through the real subcommands.

embedded Fashion-MNIST subset -> shards -> pretraining (SimCLR with a reconstruction term, small
ResNet; one process per GPU,
else 2 CPU processes when the machine has >= 2 cores) -> views grid -> evaluation (linear probe,
kNN, retrieval, anomaly AUROC, 2-D plot, raw-pixel and random-init baselines; plus the properties
protocol when the shards carry generating factors) -> export. Shards already in ``<out>/data/train``
and ``<out>/data/test`` are used as they are, e.g. ``selfsup shards --source shapes`` sets.

Every step runs as a subprocess of the same Python (``python -m selfsup.launch.cli <cmd>``, or
``torch.distributed.run`` for several training processes), so the demo exercises exactly what a
user types, and a failing step stops the demo with its command and exit code. Output is streamed.

By default the demo trains for the recipe's ``train.epochs`` (55 epochs of the embedded set in
``configs/simclr_ae_demo.yaml``: about 9 minutes on 2 AVX-512 CPU cores, about 30 on 2 AVX2-only
ones), so its table is reproducible: training on CPU is deterministic. With ``--minutes M`` it instead measures this machine's
training speed with a few steps of the same command and sizes ``train.max_steps`` to M minutes,
so the learning rate still anneals to zero inside the budget (most of SimCLR's gain comes as the
rate falls); ``train.max_steps=...`` or ``train.epochs=...`` overrides skip the measurement.

``--compare`` (``--methods a,b``) runs every demo recipe through these steps and writes one table;
that lives in ``launch/demo/compare.py``, this module only dispatches to it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from selfsup.launch.demo.steps import (
    CLI,
    DEFAULT_CONFIG,
    DemoError,
    Runner,
    Step,
    calibrated_length,
    eval_step,
    pretrain_step,
    resolve_processes,
    shard_steps,
    sized_by_minutes,
    summary_table,
)

EPILOG = """\
examples:
  selfsup demo                                    simclr_ae, the recipe's 55 epochs, into runs/demo
  selfsup demo --minutes 3 --config configs/vae_demo.yaml
  selfsup demo --compare --minutes 5              every method, 5 minutes each, into runs/compare
  selfsup demo --compare --methods simclr,byol,ae --out runs/cmp train.max_steps=300
  selfsup demo --seeds 3                          three seeds, mean ± sd per row in runs/demo/seeds.md
  selfsup demo --compare --seeds 3 --minutes 2    every method x 3 seeds, runs/compare/seeds.md

--compare runs every method with a recipe configs/<name>_demo.yaml (or the --methods subset)
through the same steps (shards once, then per method: speed measurement and pretraining, eval) and
writes one table, <out>/compare.md, compare.json and the bar chart compare.png. Without --minutes
each recipe trains for its own train.epochs, so the methods get different budgets; with --minutes
every method gets the same wall-clock budget. A method whose eval report exists in <out>/<name>/
is reused, so an interrupted compare continues where it stopped; --overwrite reruns the chosen
methods (the shards in <out>/data are kept).
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument(
        "--out", default=None, help="folder for everything the demo writes (default: runs/demo, "
        "with --compare runs/compare)"
    )
    parser.add_argument(
        "--minutes",
        type=float,
        default=None,
        help="size pretraining to this many minutes on this machine (measured first) instead of "
        "the recipe's train.epochs; with --compare, the same budget for every method",
    )
    parser.add_argument(
        "--compare", action="store_true",
        help="run every demo method (configs/<name>_demo.yaml) and write one comparison table",
    )
    parser.add_argument(
        "--methods", default=None, metavar="A,B,...",
        help="compare only these methods (the <name> of configs/<name>_demo.yaml; implies "
        "--compare)",
    )
    parser.add_argument(
        "--seeds", type=int, default=1, metavar="N",
        help="train N seeds (train.seed and eval --seed = 0..N-1, into <out>/seed-<k>/) and report "
        "mean ± sd per row in <out>/seeds.md (default 1: one run, as make demo)",
    )
    parser.add_argument(
        "--processes",
        default="auto",
        help="training processes: auto (one per GPU, else 2 when >= 2 cores) or a number",
    )
    parser.add_argument(
        "--config", default=None, help="pretraining recipe (default: configs/simclr_ae_demo.yaml; configs/<method>_demo.yaml "
        "for the others)"
    )
    parser.add_argument(
        "--wandb",
        choices=("offline", "online", "off"),
        default="offline",
        help="W&B mode for pretraining (default: offline, needs no network; 'wandb sync' later)",
    )
    parser.add_argument(
        "--overwrite", action="store_true",
        help="replace a previous demo run in --out (with --compare: rerun the chosen methods)",
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="extra config overrides for pretraining"
    )


def _check_out(out: Path, overwrite: bool) -> None:
    """Refuse to mix a new demo with an old one unless asked; shards are reused (deterministic)."""
    previous = [out / "run", out / "export", out / "views.png"]
    if any(p.exists() for p in previous):
        if not overwrite:
            raise DemoError(
                f"{out} holds a previous demo run: pass --overwrite to replace it "
                f"(the shards in {out / 'data'} are kept), or choose another --out"
            )
        for p in previous:
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()


def demo(args: argparse.Namespace) -> tuple[Path, Path]:
    """Run every step; returns (run directory, eval report path)."""
    from selfsup.config import ConfigError, load_config

    out = Path(args.out)
    config = Path(args.config or DEFAULT_CONFIG)
    if not config.is_file():
        raise DemoError(f"--config: recipe not found: {config}")
    processes = resolve_processes(args.processes)
    train_shards, test_shards = out / "data" / "train", out / "data" / "test"
    run_dir, calib_dir = out / "run", out / "calibration"
    wandb_mode = f"log.wandb={args.wandb}"
    common = [f"data.train={train_shards}", f"data.test={test_shards}", *args.overrides]
    try:  # a bad recipe or override fails here, before any data is written
        cfg = load_config(config, [f"run_dir={run_dir}", wandb_mode, *common])
    except ConfigError as e:
        raise DemoError(f"config: {e}") from e
    _check_out(out, args.overwrite)
    out.mkdir(parents=True, exist_ok=True)
    calibrate = sized_by_minutes(args.minutes, args.overrides)

    shards = shard_steps(train_shards, test_shards)
    run_step = Runner(total=len(shards) + (5 if calibrate else 4))
    for step in shards:
        run_step(step)
    length: list[str] = []
    if calibrate:
        length, _ = calibrated_length(run_step, config, processes, common, calib_dir, args.minutes,
                                      cfg.data.batch_size, train_shards)  # fmt: skip

    run_step(
        pretrain_step(
            f"pretrain {cfg.method.name} ({processes} process{'es' if processes > 1 else ''})",
            processes,
            ["--config", str(config), f"run_dir={run_dir}", wandb_mode, *common, *length],
        )
    )
    run_step(
        Step("views grid",
             [*CLI, "views", "--shards", str(train_shards), "--config", str(config),
              "--out", str(out / "views.png")])
    )  # fmt: skip
    run_step(eval_step("evaluate (pretrained vs raw pixels vs random init)", run_dir,
                       train_shards, test_shards, tuple(getattr(args, "eval_extra", ()))))  # fmt: skip
    run_step(Step("export", [*CLI, "export", "--run", str(run_dir), "--out", str(out / "export")]))
    return run_dir, run_dir / "eval" / "report.json"


def run(args: argparse.Namespace) -> int:
    if args.seeds != 1:
        from selfsup.launch.demo.seeds import run_seeds

        return run_seeds(args, demo)
    if args.compare or args.methods is not None:
        from selfsup.launch.demo.compare import run_compare

        return run_compare(args)
    args.out = args.out or "runs/demo"
    started = time.monotonic()
    try:
        run_dir, report_path = demo(args)
    except DemoError as e:
        print(f"\nselfsup demo: error: {e}", file=sys.stderr)
        return 1
    out = Path(args.out)
    print(f"\n=== selfsup demo finished in {(time.monotonic() - started) / 60:.1f} min\n")
    if report_path.is_file():
        print(summary_table(json.loads(report_path.read_text())) + "\n")
    written = {
        "shards": out / "data",
        "run directory": run_dir,
        "metrics": run_dir / "metrics.jsonl",
        "views grid": out / "views.png",
        "eval report": report_path,
        "eval report (md)": report_path.with_suffix(".md"),
        "export": out / "export",
    }
    written.update({f"plot {p.stem}": p for p in sorted((run_dir / "eval").glob("*.png"))})
    for what, path in written.items():
        print(f"{what:18s} {path}{'' if path.exists() else '  (missing)'}")
    return 0
