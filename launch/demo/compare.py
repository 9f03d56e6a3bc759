"""``selfsup demo --compare``: every demo method through the demo's pipeline, then one table.

The methods are the recipes ``configs/<name>_demo.yaml`` whose ``method.name`` is a registered
method (``--methods`` picks a subset by ``<name>``), so the list follows the files. The embedded
shards are written once into ``<out>/data``; then, per method, in ``<out>/<name>/``: the demo's
speed measurement and pretraining sized to ``--minutes`` (``demo_steps.calibrated_length``; without
``--minutes`` each recipe runs its own ``train.epochs``), ``pretrain.json`` (steps, seconds,
images/s and the settings it was made with), and ``selfsup eval`` into ``run/eval``. The baseline
columns come from the same eval code, once: raw pixels from one method's eval, random init from
one eval per backbone (the others run with ``--no-baselines``).

A method whose eval report exists is reused, so a compare killed midway continues where it
stopped (one that finished pretraining only runs its eval); ``--overwrite`` reruns the chosen
methods. Results made with other settings (recipe text, overrides, ``--minutes``, processes) are
an error rather than a silent mix. Writes ``<out>/compare.md``, ``compare.json``, ``compare.png``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from selfsup.launch.demo.steps import (
    DEFAULT_CONFIG,
    DemoError,
    Runner,
    calibrated_length,
    eval_step,
    measured_images_per_s,
    pretrain_step,
    resolve_processes,
    shard_steps,
    sized_by_minutes,
)

CONFIGS = DEFAULT_CONFIG.parent
RECIPE_SUFFIX = "_demo.yaml"
EVAL_ROWS = ("linear_top1", "knn_top1_k20", "knn_top1_k200", "recall@1", "map@r",
             "anomaly_knn_auroc")  # fmt: skip
RUN_ROWS = {"images_per_s": "Pretraining speed (images/s, median of logged intervals)",
            "steps": "Pretraining steps", "pretrain_s": "Pretraining time (s, start-up included)"}
RAW = "raw pixels"
RECORD = "pretrain.json"
RESERVED = ("run_dir=", "data.train=", "data.test=")  # set per method / shared by the compare


def demo_methods(configs: Path = CONFIGS) -> dict[str, Path]:
    """``<name> -> recipe`` for every ``configs/<name>_demo.yaml`` naming a registered method."""
    from selfsup.pretrain.methods import METHODS

    return {path.name[: -len(RECIPE_SUFFIX)]: path for path in sorted(configs.glob(f"*{RECIPE_SUFFIX}"))
            if recipe_method(path) in METHODS}  # fmt: skip


def recipe_method(recipe: Path) -> str | None:
    """The ``method.name`` a recipe names (None when it names none or is not YAML)."""
    import yaml

    try:
        method = (yaml.safe_load(recipe.read_text()) or {}).get("method") or {}
    except (yaml.YAMLError, AttributeError):
        return None
    return method.get("name") if isinstance(method, dict) else None


def pick_methods(spec: str | None, available: dict[str, Path]) -> dict[str, Path]:
    """The ``--methods`` subset in the order given; an unknown name is an error. Without
    ``--methods``: every recipe except those whose method needs another run (``Method.needs``, e.g.
    ``distill`` learns the demo's exported backbone: name it in ``--methods`` after ``make demo``)."""
    if spec is None:
        from selfsup.pretrain.methods import METHODS

        needs = {n: METHODS[recipe_method(p)].cls.needs for n, p in available.items()}
        for n, what in needs.items():
            if what:
                print(f"demo --compare: leaving out {n}: it needs {what}; name it in --methods to include it",
                      flush=True)  # fmt: skip
        return {n: p for n, p in available.items() if not needs[n]}
    names = list(dict.fromkeys(n.strip() for n in spec.split(",") if n.strip()))
    unknown = [n for n in names if n not in available]
    if unknown or not names:
        raise DemoError(
            f"--methods: unknown method(s) {', '.join(unknown) or '(none given)'}; available: "
            f"{', '.join(available)} (the <name> of each {CONFIGS}/<name>{RECIPE_SUFFIX})"
        )
    return {n: available[n] for n in names}


@dataclass
class Entry:
    """One method of the comparison and where its work lives (``<out>/<name>/``)."""

    name: str
    recipe: Path
    folder: Path
    backbone: str
    model_key: str  # the resolved model section: same key, same random-init network
    batch_size: int
    state: str = "new"  # new | trained (pretrain.json written) | done (eval report too)
    baselines: tuple[str, ...] = ()  # the baseline columns its eval computes

    @property
    def run_dir(self) -> Path:
        return self.folder / "run"

    @property
    def report(self) -> Path:
        return self.run_dir / "eval" / "report.json"

    @property
    def record(self) -> Path:
        return self.folder / RECORD

    def models(self) -> dict[str, dict[str, Any]]:
        return json.loads(self.report.read_text()).get("models", {})


def _read_json(path: Path) -> dict | None:
    """The file's JSON object, or None when it is missing or torn (a writer killed midway)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def plan(args: argparse.Namespace, out: Path, processes: int) -> tuple[list[Entry], dict]:
    """Check every chosen recipe with the overrides and what ``out`` already holds, before
    anything runs (``--overwrite`` removes the chosen methods' earlier work); returns the entries
    (their state set) and the settings their results must share."""
    from selfsup.config import ConfigError, load_config, to_dict

    chosen = pick_methods(args.methods, demo_methods())
    reserved = [o for o in args.overrides if o.startswith(RESERVED)]
    if reserved:
        raise DemoError(f"{', '.join(reserved)}: the compare sets these itself (each method's "
                        "run in <out>/<name>/run, the shards in <out>/data/train|test, where "
                        "shards already there are used as they are); choose --out instead")  # fmt: skip
    data = [f"data.train={out / 'data' / 'train'}", f"data.test={out / 'data' / 'test'}"]
    entries, recipes = [], {}
    for name, recipe in chosen.items():
        folder = out / name
        try:
            cfg = load_config(recipe, [f"run_dir={folder / 'run'}", *data, *args.overrides])
        except ConfigError as e:
            raise DemoError(f"method '{name}' ({recipe}): config: {e}") from e
        model = json.dumps(to_dict(cfg.model), sort_keys=True)
        entries.append(Entry(name, recipe, folder, cfg.model.backbone, model, cfg.data.batch_size))
        recipes[name] = hashlib.sha256(recipe.read_bytes()).hexdigest()[:16]
    settings = {"minutes": args.minutes, "overrides": list(args.overrides), "processes": processes}
    for e in entries:
        if args.overwrite:
            shutil.rmtree(e.folder, ignore_errors=True)
        record = _read_json(e.record)
        if record is None:
            continue  # pretraining never finished: the method starts again from scratch
        made = record.get("settings")
        want = {**settings, "recipe_sha256": recipes[e.name]}
        if made != want:
            diff = ", ".join(f"{k}: then {(made or {}).get(k)!r}, now {v!r}" for k, v in want.items()
                             if (made or {}).get(k) != v)  # fmt: skip
            raise DemoError(f"{e.folder} was made with other settings ({diff}): pass --overwrite "
                            "to rerun it, or choose another --out")  # fmt: skip
        e.state = "done" if _read_json(e.report) is not None else "trained"
    return entries, settings | {"recipes": recipes}


def assign_baselines(entries: list[Entry]) -> dict[str, Entry]:
    """Who computes which baseline column, preferring reports that already hold it: raw pixels
    once, random init once per model config. Returns ``column label -> entry``."""

    def has(e: Entry, baseline: str) -> bool:
        return e.state == "done" and baseline in e.models()

    groups: dict[str, list[Entry]] = {}
    for e in entries:
        groups.setdefault(e.model_key, []).append(e)
    holders = {}
    names = [g[0].backbone for g in groups.values()]
    for members in groups.values():
        h = next((e for e in members if has(e, "random_init")), members[0])
        h.baselines += ("random_init",)
        unique = names.count(h.backbone) == 1
        holders[f"random init ({h.backbone}{'' if unique else ', as ' + h.name})"] = h
    raw = next((e for e in entries if has(e, "raw_pixels")), next(iter(holders.values())))
    raw.baselines = ("raw_pixels", *raw.baselines)
    for e in entries:
        if e.state == "done" and not set(e.baselines) <= set(e.models()):
            e.state = "trained"  # its report lacks a baseline it now has to provide: eval again
    return {RAW: raw, **holders}


def run_method(e: Entry, run_step: Runner, args: argparse.Namespace, out: Path, processes: int,
               settings: dict) -> None:  # fmt: skip
    """Pretrain (when not done already) and evaluate one method in ``<out>/<name>``."""
    train, test = out / "data" / "train", out / "data" / "test"
    if e.state == "new":
        shutil.rmtree(e.folder, ignore_errors=True)
        e.folder.mkdir(parents=True)
        common = [f"data.train={train}", f"data.test={test}", *args.overrides]
        length, measured = [], None
        if sized_by_minutes(args.minutes, args.overrides):
            length, measured = calibrated_length(
                run_step, e.recipe, processes, common, e.folder / "calibration", args.minutes,
                e.batch_size, train, label=f"{e.name}: ")  # fmt: skip
        step = pretrain_step(
            f"{e.name}: pretrain ({processes} process{'es' if processes > 1 else ''})", processes,
            ["--config", str(e.recipe), f"run_dir={e.run_dir}", f"log.wandb={args.wandb}",
             *common, *length])  # fmt: skip
        run_step(step)
        metrics = e.run_dir / "metrics.jsonl"
        rows = [json.loads(r) for r in metrics.read_text().splitlines() if r.strip()]
        record = {"steps": rows[-1]["step"], "pretrain_s": run_step.seconds[step.name],
                  "images_per_s": measured_images_per_s(metrics, keep_warmup=True),
                  "calibration_images_per_s": measured, "length": length,
                  "settings": {k: settings[k] for k in ("minutes", "overrides", "processes")}
                  | {"recipe_sha256": settings["recipes"][e.name]}}  # fmt: skip
        e.record.write_text(json.dumps(record, indent=2))
    extra = ("--baselines", ",".join(e.baselines)) if e.baselines else ("--no-baselines",)
    extra += tuple(getattr(args, "eval_extra", ()))  # --seeds: the eval's own seed
    what = " + ".join(b.replace("_", " ") for b in e.baselines) or "no baselines"
    run_step(eval_step(f"{e.name}: evaluate ({what})", e.run_dir, train, test, extra))
    e.state = "done"


def comparison(entries: list[Entry], baselines: dict[str, Entry], meta: dict) -> dict:
    """compare.json: ``models[column][metric]``, columns = methods, raw pixels, random init(s)."""
    models: dict[str, dict[str, Any]] = {}
    sources: dict[str, str] = {}
    for e in entries:
        pre = e.models().get("pretrained", {})
        record = json.loads(e.record.read_text())
        models[e.name] = {k: pre.get(k) for k in EVAL_ROWS} | {k: record[k] for k in RUN_ROWS}
        sources[e.name] = str(e.report)
    for label, e in baselines.items():
        key = "raw_pixels" if label == RAW else "random_init"
        models[label] = {k: e.models()[key].get(k) for k in EVAL_ROWS}
        sources[label] = f"{e.report} ({key})"
    return {"columns": list(models), "methods": [e.name for e in entries],
            "rows": [*EVAL_ROWS, *RUN_ROWS], "models": models, "sources": sources,
            "baselines_from": {label: e.name for label, e in baselines.items()},
            "meta": meta}  # fmt: skip


def markdown(result: dict) -> str:
    """The table (rows = metrics, columns = methods then baselines); bold beats raw pixels."""
    from selfsup.tables import fmt_value, metric_name

    cols, models, raw = result["columns"], result["models"], result["models"][RAW]
    lines = ["| Metric | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for k in result["rows"]:
        cells = []
        for c in cols:
            v = models[c].get(k)
            cell = fmt_value(v) if k in EVAL_ROWS or v is None else f"{v:.0f}"
            better = c in result["methods"] and k in EVAL_ROWS and None not in (v, raw.get(k))
            cells.append(f"**{cell}**" if better and v > raw[k] else cell)
        lines.append(f"| {RUN_ROWS.get(k) or metric_name(k)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_outputs(result: dict, out: Path) -> dict[str, Path]:
    from selfsup.launch.demo.compare_plot import plot_comparison

    meta = result["meta"]
    budget = (f"{meta['minutes']:g} min of pretraining per method (steps sized by a speed "
              "measurement)" if meta["sized_by_minutes"] else
              "each recipe's own length (train.epochs, or the length overrides)")  # fmt: skip
    lines = ["# selfsup demo --compare", "", f"- **Budget:** {budget}",
             f"- **Processes:** {meta['processes']}; **overrides:** "
             f"{' '.join(meta['overrides']) or '(none)'}",
             f"- **Shards:** {meta['train_shards']} / {meta['test_shards']}",
             "- **Baselines** (each computed once, by one method's eval): " + ", ".join(
                 f"{c} by {m}'s" for c, m in result["baselines_from"].items()),
             "", markdown(result), "",
             "Bold: better than raw pixels. Per-method reports: `<out>/<method>/run/eval/`.",
             "", "![comparison](compare.png)", ""]  # fmt: skip
    paths = {"table": out / "compare.md", "json": out / "compare.json", "chart": out / "compare.png"}
    paths["json"].write_text(json.dumps(result, indent=2))
    paths["table"].write_text("\n".join(lines))
    plot_comparison(result, paths["chart"])
    return paths


def compare(args: argparse.Namespace) -> tuple[dict, dict[str, Path]]:
    if args.config is not None:
        raise DemoError("--config and --compare: the compare runs the configs/<name>_demo.yaml "
                        "recipes; pick them with --methods")  # fmt: skip
    out = Path(args.out or "runs/compare")
    processes = resolve_processes(args.processes)
    entries, settings = plan(args, out, processes)  # every check before anything runs
    if args.overwrite:
        for name in ("compare.md", "compare.json", "compare.png"):
            (out / name).unlink(missing_ok=True)
    baselines = assign_baselines(entries)
    train, test = out / "data" / "train", out / "data" / "test"
    out.mkdir(parents=True, exist_ok=True)
    calibrate = sized_by_minutes(args.minutes, args.overrides)
    shards = shard_steps(train, test)
    per_new = 2 + (1 if calibrate else 0)
    run_step = Runner(total=len(shards) + sum({"new": per_new, "trained": 1, "done": 0}[e.state]
                                               for e in entries))  # fmt: skip
    for step in shards:
        run_step(step)
    for e in entries:
        if e.state == "done":
            print(f"\n=== {e.name}: reused (its eval report exists: {e.report}; --overwrite "
                  "reruns it)", flush=True)  # fmt: skip
            continue
        try:
            run_method(e, run_step, args, out, processes, settings)
        except DemoError as err:
            done = [d.name for d in entries if d.state == "done"]
            raise DemoError(
                f"method '{e.name}' ({e.recipe}) failed: {err}\n  finished: "
                f"{', '.join(done) or 'none'}; run the same command again to continue "
                f"from '{e.name}' (finished methods are reused)"
            ) from err
    meta = {"out": str(out), "minutes": args.minutes, "sized_by_minutes": calibrate,
            "processes": processes, "overrides": list(args.overrides),
            "train_shards": str(train), "test_shards": str(test),
            "recipes": {e.name: str(e.recipe) for e in entries}}  # fmt: skip
    result = comparison(entries, baselines, meta)
    return result, write_outputs(result, out)


def run_compare(args: argparse.Namespace) -> int:
    started = time.monotonic()
    try:
        result, paths = compare(args)
    except DemoError as e:
        print(f"\nselfsup demo --compare: error: {e}", file=sys.stderr)
        return 1
    minutes = (time.monotonic() - started) / 60
    print(f"\n=== selfsup demo --compare finished in {minutes:.1f} min\n")
    print(markdown(result) + "\n\n(bold: better than raw pixels)\n")
    for what, path in paths.items():
        print(f"{what:8s} {path}")
    for name in result["methods"]:
        print(f"{name:8s} {result['sources'][name]}")
    return 0
