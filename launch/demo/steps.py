"""The steps ``selfsup demo`` and ``selfsup demo --compare`` are made of, shared by both.

Each step is a subprocess of the same Python running a real subcommand (``python -m
selfsup.launch.cli <cmd>``, or ``torch.distributed.run`` for several training processes), run by
``Runner`` with a numbered header and streamed output; a failing step raises ``DemoError`` with its
command and exit code. ``calibrated_length`` is the speed measurement that sizes
``train.max_steps`` to a number of minutes.
"""

from __future__ import annotations

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

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "simclr_ae_demo.yaml"
CLI = [sys.executable, "-m", "selfsup.launch.cli"]
CALIBRATION_STEPS = 12  # the first logged interval includes warm-up; later ones are steady state
CALIBRATION_LOG_EVERY = 4


class DemoError(RuntimeError):
    """A demo step failed or cannot start; the message says which and what to do."""


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


def measured_images_per_s(metrics: Path, keep_warmup: bool = False) -> float:
    """Steady-state training speed from a run's metrics.jsonl (median over the logged intervals;
    the first includes warm-up and counts only when it is the only one and ``keep_warmup``)."""
    try:
        rows = [json.loads(r) for r in metrics.read_text().splitlines() if r.strip()]
    except (OSError, json.JSONDecodeError) as e:
        raise DemoError(f"speed measurement: cannot read {metrics} ({e})") from e
    speeds = [float(r["img_per_s"]) for r in rows if r.get("img_per_s", 0) > 0]
    steady = speeds[1:] or (speeds if keep_warmup else [])
    if not steady:
        raise DemoError(f"speed measurement: no img_per_s rows after warm-up in {metrics}")
    return statistics.median(steady)


def shard_steps(train_shards: Path, test_shards: Path) -> list[Step]:
    """Writing the embedded set's splits, for those not already in place (kept between runs)."""
    return [
        Step(f"shards ({split}): embedded Fashion-MNIST subset",
             [*CLI, "shards", "--source", "embedded", "--split", split, "--out", str(folder),
              "--quiet"])
        for split, folder in (("train", train_shards), ("test", test_shards))
        if not (folder / "manifest.json").is_file()
    ]  # fmt: skip


def sized_by_minutes(minutes: float | None, overrides: list[str]) -> bool:
    """Whether the run length comes from a speed measurement (``--minutes`` and no length override)."""
    user_length = any(o.startswith(("train.max_steps=", "train.epochs=")) for o in overrides)
    return minutes is not None and not user_length


def calibrated_length(
    run_step: Runner, config: Path, processes: int, common: list[str], calib_dir: Path,
    minutes: float, batch_size: int, train_shards: Path, label: str = "",
) -> tuple[list[str], float]:
    """Measure this machine's speed with a few steps of the same pretraining command and size
    ``train.max_steps`` to ``minutes``: returns (the override, measured images/s)."""
    shutil.rmtree(calib_dir, ignore_errors=True)
    run_step(
        pretrain_step(
            f"{label}measure training speed ({CALIBRATION_STEPS} steps, {processes} process{'es' if processes > 1 else ''})",
            processes,
            ["--config", str(config), f"run_dir={calib_dir}", *common, "log.wandb=off",
             "log.progress=false", f"train.max_steps={CALIBRATION_STEPS}",
             f"train.log_every={CALIBRATION_LOG_EVERY}", "train.checkpoint_every=0"],
        )
    )  # fmt: skip
    speed = measured_images_per_s(calib_dir / "metrics.jsonl")
    shutil.rmtree(calib_dir)
    steps = max(1, round(minutes * 60 * speed / batch_size))
    n_train = json.loads((train_shards / "manifest.json").read_text())["num_samples"]
    print(
        f"    {speed:.0f} images/s -> {steps} steps of {batch_size} images "
        f"(~{steps * batch_size / n_train:.1f} epochs) in {minutes:g} min",
        flush=True,
    )
    return [f"train.max_steps={steps}"], speed


def eval_step(
    name: str, run_dir: Path, train_shards: Path, test_shards: Path, extra: tuple[str, ...] = ()
) -> Step:
    """``selfsup eval`` of a run on the test shards (report in ``<run_dir>/eval``)."""
    return Step(name, [*CLI, "eval", "--checkpoint", str(run_dir), "--train-shards",
                       str(train_shards), "--test-shards", str(test_shards), "--protocols",
                       eval_protocols(train_shards), *extra])  # fmt: skip


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
