"""The evaluation goes into the W&B run of the pretraining it evaluates, so one run holds the
whole story: the training history, then the eval summary, the report table and the pictures.

``selfsup eval`` on a run directory (or a checkpoint in one) reopens that run by the id its
checkpoint recorded (``wandb.init(id=..., resume="allow")``, the run's own ``log.*`` settings,
offline by default), writes ``eval/<model>/<metric>`` summary keys and the ``eval/report`` table,
and logs the report's figures and the run's pictures (views grid, reconstructions, VAE samples)
as W&B images. ``metrics.jsonl`` and ``eval/report.json`` stay the machine-readable record; W&B is
where a person looks. Export folders have no W&B run; neither do runs with ``log.wandb=off``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from selfsup.pretrain.run import rundir
from selfsup.tables import metric_name


def run_pictures(run_dir: Path) -> list[Path]:
    """The PNGs pretraining left in the run directory (reconstructions, samples, views, ...)."""
    return sorted(run_dir.glob("*.png"))


def log_to_training_run(report: dict[str, Any], where: rundir.Resolved, out_dir: Path) -> str | None:
    """Log ``report`` into the pretraining's W&B run; returns its id, or None when there is none."""
    if where.run_dir is None or os.environ.get("WANDB_MODE") == "disabled":
        return None
    cfg = rundir.read_config(where.run_dir)
    if cfg.log.wandb == "off":
        return None
    wandb_id = rundir.load_checkpoint(where.checkpoint).get("wandb_id")
    if not wandb_id:
        return None
    import wandb

    os.environ.setdefault("WANDB_SILENT", "true")
    run = wandb.init(project=cfg.log.project, entity=cfg.log.entity, id=wandb_id, resume="allow",
                     dir=str(where.run_dir), mode=cfg.log.wandb, name=cfg.log.name or where.run_dir.name,
                     tags=cfg.log.tags, job_type="pretrain", reinit="finish_previous")  # fmt: skip
    try:
        models = report["models"]
        for name, metrics in models.items():
            for k, v in metrics.items():
                run.summary[f"eval/{name}/{k}"] = v
        keys = list(dict.fromkeys(k for m in models.values() for k in m))
        table = wandb.Table(columns=["metric", *models])
        for k in keys:
            table.add_data(metric_name(k), *[models[n].get(k) for n in models])
        images = {f"eval/{Path(f).stem}": wandb.Image(str(out_dir / f))
                  for f in report["meta"].get("figures", []) if (out_dir / f).is_file()}  # fmt: skip
        images |= {f"pictures/{p.stem}": wandb.Image(str(p)) for p in run_pictures(where.run_dir)}
        run.log({"eval/report": table, **images})
    finally:
        run.finish()
    return wandb_id
