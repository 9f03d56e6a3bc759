"""One report per evaluation: ``report.json`` for machines, ``report.md`` for people, W&B if active.

The Markdown table puts the pretrained model next to the raw-pixel and random-init baselines, one
row per metric, so the reader sees in one glance what pretraining bought.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from selfsup.tables import fmt_value, markdown_table, metric_name  # noqa: F401  (re-exported)


def render_markdown(report: dict[str, Any]) -> str:
    meta = report.get("meta", {})
    parts = ["# Evaluation report", ""]
    for label, key in (
        ("Checkpoint", "checkpoint"), ("Train shards", "train_shards"),
        ("Test shards", "test_shards"), ("Train / test images", "sizes"),
        ("Classes", "classes"), ("Protocols", "protocols"), ("Representation", "representation"),
    ):
        if key in meta:
            value = meta[key]
            if isinstance(value, list):
                value = ", ".join(map(str, value))
            parts.append(f"- **{label}:** {value}")
    parts += ["", markdown_table(display_models(report["models"])), ""]
    if report.get("properties"):
        from selfsup.eval.properties_report import render_properties

        parts += render_properties(report["properties"])
    per_class = report.get("anomaly_per_class", {})
    if per_class:
        parts += ["## Anomaly AUROC per held-out class", ""]
        cols = {f"{m} ({s})": v for m, d in per_class.items() for s, v in d.items()}
        classes = meta.get("classes", [])
        ids = sorted({int(c) for v in cols.values() for c in v})
        parts.append("| Class | " + " | ".join(cols) + " |")
        parts.append("|---|" + "---:|" * len(cols))
        for c in ids:
            name = classes[c] if c < len(classes) else str(c)
            parts.append(f"| {name} | " + " | ".join(
                fmt_value(v.get(str(c), v.get(c))) for v in cols.values()) + " |")
        parts.append("")
    for fig in meta.get("figures", []):
        parts += [f"![{Path(fig).stem}]({fig})", ""]
    notes = meta.get("notes", [])
    if notes:
        parts += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    if "timings_s" in meta:
        t = ", ".join(f"{k} {v:.1f}s" for k, v in meta["timings_s"].items())
        parts += [f"Timings: {t}", ""]
    return "\n".join(parts)


def display_models(models: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The table's cells: a metric with a ``<key>_sd`` companion shows as ``mean ± sd`` (one row),
    low-shot keys get readable names."""
    from selfsup.eval.lowshot import display_name

    out: dict[str, dict[str, Any]] = {}
    for model, metrics in models.items():
        row: dict[str, Any] = {}
        for k, v in metrics.items():
            if k.endswith("_sd") and k[:-3] in metrics:
                continue
            sd = metrics.get(f"{k}_sd")
            cell = v if sd is None else f"{fmt_value(v)} ± {fmt_value(sd)}"
            row[display_name(k, metric_name) or k] = cell
        out[model] = row
    return out


def write_report(report: dict[str, Any], out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``report.json`` and ``report.md`` into ``out_dir``; log to W&B when a run is active."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "report.json"
    md_path = out / "report.md"
    json_path.write_text(json.dumps(report, indent=2, default=str))
    md_path.write_text(render_markdown(report))
    log_wandb(report)
    return json_path, md_path


def log_wandb(report: dict[str, Any]) -> bool:
    """Summary keys ``eval/<model>/<metric>`` and an ``eval/report`` table, if a W&B run is active."""
    wandb = sys.modules.get("wandb")  # no import (~1 s): without it no run can be active
    if wandb is None or wandb.run is None:
        return False
    models = report["models"]
    for name, metrics in models.items():
        for k, v in metrics.items():
            wandb.run.summary[f"eval/{name}/{k}"] = v
    keys = sorted({k for m in models.values() for k in m})
    table = wandb.Table(columns=["metric", *models])
    for k in keys:
        table.add_data(metric_name(k), *[models[n].get(k) for n in models])
    wandb.log({"eval/report": table})
    return True
