"""Where numbers go: ``metrics.jsonl`` (always), W&B (online/offline/off) and a progress bar.

Only the main process writes. ``metrics.jsonl`` is the machine-readable history that does not
depend on W&B: one JSON object per logged step. On resume the rows after the checkpoint's step
are dropped first, so the file reads as one uninterrupted run. The W&B run id is kept in the
checkpoint so a resumed (or requeued) job continues the same W&B run.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

from selfsup.config import Config, to_dict


class RunLog:
    def __init__(
        self,
        run_dir: Path,
        cfg: Config,
        is_main: bool,
        total_steps: int,
        start_step: int,
        wandb_id: str | None,
    ) -> None:
        self.is_main = is_main
        self.path = run_dir / "metrics.jsonl"
        self.wandb = None
        self.wandb_id = wandb_id
        self.bar = None
        if not is_main:
            return
        self._truncate_after(start_step)
        if cfg.log.wandb != "off":
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            self.wandb = wandb.init(
                project=cfg.log.project,
                entity=cfg.log.entity,
                name=cfg.log.name or run_dir.name,
                tags=cfg.log.tags,
                dir=str(run_dir),
                mode=cfg.log.wandb,
                id=wandb_id,
                resume="allow",
                config=to_dict(cfg),
            )
            self.wandb_id = self.wandb.id
        if cfg.log.progress:
            # in a log file (SLURM, CI) a redraw every few seconds would bury the output
            interactive = sys.stderr.isatty()
            self.bar = tqdm(total=total_steps, initial=start_step, desc="pretrain", unit="step",
                            dynamic_ncols=True, mininterval=0.5 if interactive else 60)  # fmt: skip

    def _truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        rows = [r for r in self.path.read_text().splitlines() if r.strip()]
        keep = [r for r in rows if json.loads(r).get("step", 0) <= step]
        self.path.write_text("".join(r + "\n" for r in keep))

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.is_main:
            return
        row = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)
        if self.bar is not None:
            shown = {k: f"{v:.4g}" for k, v in metrics.items() if k in ("loss", "lr", "img_per_s")}
            self.bar.set_postfix(shown, refresh=False)

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def image(self, key: str, path: Path, step: int) -> None:
        if self.wandb is not None:
            import wandb

            self.wandb.log({key: wandb.Image(str(path))}, step=step)

    def summary(self, values: dict[str, Any]) -> None:
        if self.wandb is not None:
            self.wandb.summary.update({k: _plain(v) for k, v in values.items()})

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.wandb is not None:
            self.wandb.finish()


def _plain(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v
