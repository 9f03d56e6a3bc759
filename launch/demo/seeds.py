"""``selfsup demo --seeds N`` and ``selfsup demo --compare --seeds N``: one result is not a claim.

The same pipeline runs N times, run ``k`` (0-based) with ``train.seed=k`` and ``selfsup eval
--seed k`` (so the probes' own randomness and the random-init network change too, and the
raw-pixel column shows the noise of the probe itself), each into ``<out>/seed-<k>/``; the shards
are written once into ``<out>/data`` and shared. Then one table: every cell is the mean ± the
sample standard deviation (ddof = 1) over exactly the N runs, ``<out>/seeds.md`` and
``seeds.json`` (which also holds every run's value). Bold marks a cell whose mean minus its sd
beats the raw-pixel mean: a lead larger than the method's own spread.

CPU training repeats bitwise only on one machine, one CPU type and a fixed thread count; across
machines the spread over seeds is the honest error bar.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from selfsup.launch.demo.steps import DemoError

RAW_COLUMNS = ("raw pixels", "raw_pixels")
DEMO_ROWS = ("linear_top1", "linear_top5", "knn_top1_k20", "knn_top1_k200", "recall@1", "recall@5",
             "recall@10", "map@r", "anomaly_knn_auroc")  # every one: higher is better


def check_seeds(args: argparse.Namespace) -> None:
    if args.seeds < 1:
        raise DemoError(f"--seeds must be >= 1, got {args.seeds}")
    fixed = [o for o in args.overrides if o.startswith("train.seed=")]
    if fixed and args.seeds > 1:
        raise DemoError(f"{fixed[0]} and --seeds {args.seeds}: --seeds sets train.seed=0..N-1 itself")


def seeded(args: argparse.Namespace, out: Path, k: int) -> argparse.Namespace:
    """The arguments of run ``k``: its own folder (sharing ``<out>/data``) and seed."""
    run = copy.copy(args)
    run.seeds, run.out = 1, str(out / f"seed-{k}")
    run.overrides = [*args.overrides, f"train.seed={k}"]
    run.eval_extra = ("--seed", str(k))
    (out / "data").mkdir(parents=True, exist_ok=True)
    link = Path(run.out) / "data"
    if not link.exists():
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(Path("..") / "data", target_is_directory=True)
    return run


def aggregate(tables: list[dict[str, dict[str, float | None]]]) -> dict[str, dict[str, dict]]:
    """``column -> metric -> {mean, sd, n, values}`` over the runs' ``column -> metric -> value``
    tables; a metric missing from any run is left out (no mean over fewer runs than asked)."""
    columns = list(tables[0])
    if any(list(t) != columns for t in tables):
        raise DemoError(f"the runs have different columns: {[list(t) for t in tables]}")
    out: dict[str, dict[str, dict]] = {}
    for col in columns:
        out[col] = {}
        for metric in tables[0][col]:
            values = [t[col].get(metric) for t in tables]
            if any(not isinstance(v, (int, float)) for v in values):
                continue
            arr = np.asarray(values, dtype=float)
            sd = float(arr.std(ddof=1)) if len(arr) > 1 else 0.0
            out[col][metric] = {"mean": float(arr.mean()), "sd": sd, "n": len(arr), "values": values}
    return out


def markdown(agg: dict[str, dict[str, dict]], rows: list[str], higher_better: set[str]) -> str:
    """Rows = metrics, columns = the runs' columns; ``mean ± sd`` per cell."""
    from selfsup.tables import metric_name

    cols = list(agg)
    raw = next((agg[c] for c in cols if c in RAW_COLUMNS), {})
    lines = ["| Metric | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for row in rows:
        cells = []
        for c in cols:
            cell = agg[c].get(row)
            if cell is None:
                cells.append("–")
                continue
            digits = 3 if abs(cell["mean"]) <= 1 else (2 if row in higher_better else 0)
            text = f"{cell['mean']:.{digits}f} ± {cell['sd']:.{digits}f}"
            lead = (c not in RAW_COLUMNS and row in higher_better and row in raw
                    and cell["mean"] - cell["sd"] > raw[row]["mean"])  # fmt: skip
            cells.append(f"**{text}**" if lead else text)
        lines.append(f"| {metric_name(row)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write(out: Path, agg: dict, rows: list[str], higher_better: set[str], header: list[str]) -> Path:
    n = next(iter(next(iter(agg.values())).values()))["n"]
    (out / "seeds.json").write_text(json.dumps({"seeds": list(range(n)), "rows": rows, "table": agg}, indent=2))
    text = [*header, f"- **Seeds:** {n} (train.seed and eval --seed = 0..{n - 1}); cells: mean ± sd "
            "(ddof = 1) over exactly those runs; bold: mean − sd above the raw-pixel mean", "",
            markdown(agg, rows, higher_better), ""]  # fmt: skip
    path = out / "seeds.md"
    path.write_text("\n".join(text))
    return path


def run_seeds(args: argparse.Namespace, demo: Callable[[argparse.Namespace], tuple[Path, Path]]) -> int:
    """``demo --seeds N`` with or without ``--compare``; ``demo`` is the one-run pipeline
    (``command.demo``, handed in so that this module does not import its caller)."""
    from selfsup.launch.demo.compare import EVAL_ROWS, RUN_ROWS, compare

    started = time.monotonic()
    comparing = args.compare or args.methods is not None
    out = Path(args.out or ("runs/compare" if comparing else "runs/demo"))
    try:
        check_seeds(args)
        tables = []
        for k in range(args.seeds):
            print(f"\n##### seed {k} of 0..{args.seeds - 1} -> {out / f'seed-{k}'}", flush=True)
            run = seeded(args, out, k)
            if comparing:
                tables.append(compare(run)[0]["models"])
            else:
                _, report = demo(run)
                tables.append(json.loads(report.read_text())["models"])
        agg = aggregate(tables)
    except DemoError as e:
        print(f"\nselfsup demo --seeds: error: {e}", file=sys.stderr)
        return 1
    rows = [*EVAL_ROWS, *RUN_ROWS] if comparing else [r for r in DEMO_ROWS if r in next(iter(agg.values()))]
    what = "selfsup demo --compare" if comparing else "selfsup demo"
    path = write(out, agg, rows, set(DEMO_ROWS), [f"# {what} --seeds {args.seeds}", "",
                                           f"- **Command overrides:** {' '.join(args.overrides) or '(none)'}"
                                           f"; minutes: {args.minutes}"])  # fmt: skip
    print(f"\n=== {what} --seeds {args.seeds} finished in {(time.monotonic() - started) / 60:.1f} min\n")
    print(path.read_text())
    print(f"table    {path}\njson     {out / 'seeds.json'}")
    return 0
