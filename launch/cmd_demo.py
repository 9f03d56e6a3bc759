"""``selfsup demo``: the whole pipeline on the embedded data, through the real subcommands.

embedded Fashion-MNIST subset -> shards -> SimCLR pretraining (small ResNet; one process per GPU,
else 2 CPU processes when the machine has >= 2 cores) -> views grid -> evaluation (linear probe,
kNN, retrieval, anomaly AUROC, 2-D plot, raw-pixel and random-init baselines; plus the properties
protocol when the shards carry generating factors) -> export. Shards already in ``<out>/data/train``
and ``<out>/data/test`` are used as they are, e.g. ``selfsup shards --source shapes`` sets.

Every step runs as a subprocess of the same Python (``python -m selfsup.launch.cli <cmd>``, or
``torch.distributed.run`` for several training processes), so the demo exercises exactly what a
user types, and a failing step stops the demo with its command and exit code. Output is streamed.

By default the demo trains for the recipe's ``train.epochs`` (45 epochs of the embedded set in
``configs/simclr_demo.yaml``, about 7.5 minutes on 2 CPU cores), so its table is reproducible:
training on CPU is deterministic. With ``--minutes M`` it instead measures this machine's
training speed with a few steps of the same command and sizes ``train.max_steps`` to M minutes,
so the learning rate still anneals to zero inside the budget (most of SimCLR's gain comes as the
rate falls); ``train.max_steps=...`` or ``train.epochs=...`` overrides skip the measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "simclr_demo.yaml"
CLI = [sys.executable, "-m", "selfsup.launch.cli"]
CALIBRATION_STEPS = 12  # the first logged interval includes warm-up; later ones are steady state
CALIBRATION_LOG_EVERY = 4


class DemoError(RuntimeError):
    """A demo step failed or cannot start; the message says which and what to do."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="folder for everything the demo writes")
    parser.add_argument(
        "--minutes",
        type=float,
        default=None,
        help="size pretraining to this many minutes on this machine (measured first) instead of "
        "the recipe's train.epochs",
    )
    parser.add_argument(
        "--processes",
        default="auto",
        help="training processes: auto (one per GPU, else 2 when >= 2 cores) or a number",
    )
    parser.add_argument(
        "--config", default=str(DEFAULT_CONFIG), help="pretraining recipe (default: simclr_demo)"
    )
    parser.add_argument(
        "--wandb",
        choices=("offline", "online", "off"),
        default="offline",
        help="W&B mode for pretraining (default: offline, needs no network; 'wandb sync' later)",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace a previous demo run in --out"
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="extra config overrides for pretraining"
    )


def resolve_processes(value: str) -> int:
    """``auto``: one process per GPU, else 2 on a machine with >= 2 cores, else 1."""
    if value != "auto":
        try:
            n = int(value)
        except ValueError as e:
            raise DemoError(f"--processes: expected 'auto' or a number, got '{value}'") from e
        if n < 1:
            raise DemoError(f"--processes: must be >= 1, got {n}")
        return n
    import torch

    if torch.cuda.is_available():
        return torch.cuda.device_count()
    return 2 if (os.cpu_count() or 1) >= 2 else 1


@dataclass
class Step:
    name: str
    command: list[str]
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class Runner:
    """Runs steps in order with numbered headers and streamed output; stops at the first failure."""

    total: int
    done: int = 0
    seconds: dict[str, float] = field(default_factory=dict)

    def __call__(self, step: Step) -> None:
        self.done += 1
        print(f"\n=== [{self.done}/{self.total}] {step.name}", flush=True)
        print(f"    $ {shlex.join(step.command)}", flush=True)
        start = time.monotonic()
        try:
            code = subprocess.run(step.command, env={**os.environ, **step.env}).returncode
        except OSError as e:
            raise DemoError(f"step '{step.name}' could not start: {e}") from e
        if code != 0:
            raise DemoError(
                f"step '{step.name}' failed with exit code {code} (its output is above).\n"
                f"  command: {shlex.join(step.command)}"
            )
        self.seconds[step.name] = time.monotonic() - start
        print(f"=== {step.name}: done in {self.seconds[step.name]:.0f} s", flush=True)


def pretrain_step(name: str, processes: int, pretrain_args: list[str]) -> Step:
    """The pretraining command a user would type: torch.distributed.run for several processes."""
    import torch

    env = {"WANDB_SILENT": "true"}
    if not torch.cuda.is_available():
        env["ACCELERATE_USE_CPU"] = "1"  # Accelerate's multi-CPU (gloo) mode; see DESIGN.md
    if processes == 1:
        return Step(name, [*CLI, "pretrain", *pretrain_args], env)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    return Step(
        name,
        [*launcher, f"--nproc_per_node={processes}", "-m", "selfsup.launch.cli", "pretrain",
         *pretrain_args],
        env,
    )  # fmt: skip


def measured_images_per_s(metrics: Path) -> float:
    """Steady-state training speed from a calibration run's metrics.jsonl (first row = warm-up)."""
    try:
        rows = [json.loads(r) for r in metrics.read_text().splitlines() if r.strip()]
    except (OSError, json.JSONDecodeError) as e:
        raise DemoError(f"speed measurement: cannot read {metrics} ({e})") from e
    speeds = [float(r["img_per_s"]) for r in rows[1:] if r.get("img_per_s", 0) > 0]
    if not speeds:
        raise DemoError(f"speed measurement: no img_per_s rows after warm-up in {metrics}")
    return statistics.median(speeds)


def summary_table(report: dict) -> str:
    """The eval report's table (metrics x models) as a person reads it in a terminal."""
    from selfsup.eval.report import markdown_table

    models = report.get("models")
    if not isinstance(models, dict) or not models:
        return "(the eval report has no 'models' table)"
    return markdown_table(models)


def eval_protocols(train_shards: Path) -> str:
    """The eval's default protocols, plus ``properties`` when the shards record factors."""
    from selfsup.eval.run import DEFAULT_PROTOCOLS

    manifest = json.loads((train_shards / "manifest.json").read_text())
    return ",".join((*DEFAULT_PROTOCOLS, "properties") if "factors" in manifest else DEFAULT_PROTOCOLS)


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
    config = Path(args.config)
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
    user_length = any(o.startswith(("train.max_steps=", "train.epochs=")) for o in args.overrides)
    calibrate = args.minutes is not None and not user_length

    shard_steps = [
        Step(f"shards ({split}): embedded Fashion-MNIST subset",
             [*CLI, "shards", "--source", "embedded", "--split", split, "--out", str(folder),
              "--quiet"])
        for split, folder in (("train", train_shards), ("test", test_shards))
        if not (folder / "manifest.json").is_file()
    ]  # fmt: skip
    run_step = Runner(total=len(shard_steps) + (5 if calibrate else 4))
    for step in shard_steps:
        run_step(step)

    length: list[str] = []
    if calibrate:
        shutil.rmtree(calib_dir, ignore_errors=True)
        run_step(
            pretrain_step(
                f"measure training speed ({CALIBRATION_STEPS} steps, {processes} processes)",
                processes,
                ["--config", str(config), f"run_dir={calib_dir}", *common, "log.wandb=off",
                 "log.progress=false", f"train.max_steps={CALIBRATION_STEPS}",
                 f"train.log_every={CALIBRATION_LOG_EVERY}", "train.checkpoint_every=0"],
            )
        )  # fmt: skip
        speed = measured_images_per_s(calib_dir / "metrics.jsonl")
        shutil.rmtree(calib_dir)
        steps = max(1, round(args.minutes * 60 * speed / cfg.data.batch_size))
        n_train = json.loads((train_shards / "manifest.json").read_text())["num_samples"]
        print(
            f"    {speed:.0f} images/s -> {steps} steps of {cfg.data.batch_size} images "
            f"(~{steps * cfg.data.batch_size / n_train:.1f} epochs) in {args.minutes:g} min",
            flush=True,
        )
        length = [f"train.max_steps={steps}"]

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
    run_step(
        Step("evaluate (pretrained vs raw pixels vs random init)",
             [*CLI, "eval", "--checkpoint", str(run_dir), "--train-shards", str(train_shards),
              "--test-shards", str(test_shards), "--protocols", eval_protocols(train_shards)])
    )  # fmt: skip
    run_step(Step("export", [*CLI, "export", "--run", str(run_dir), "--out", str(out / "export")]))
    return run_dir, run_dir / "eval" / "report.json"


def run(args: argparse.Namespace) -> int:
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
