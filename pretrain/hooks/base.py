"""What the training loop hands to the hooks a command gives it (periodic evaluation, pictures).

The loop does not know what a hook does: ``selfsup pretrain`` passes the periodic kNN evaluation
(eval/periodic.py) and the reconstruction grid (pretrain/hooks/recon.py); a user's script can pass its
own. Hooks run on every rank; a hook that writes files does so where ``ctx.is_main``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from selfsup.pretrain.methods.base import Method


@dataclass
class HookContext:
    method: Method  # the unwrapped method (its backbone is what eval measures)
    step: int  # optimiser steps done
    epoch: int  # epochs done
    total_steps: int
    device: torch.device
    is_main: bool
    run_dir: Path
    log: Any  # pretrain.runlog.RunLog: log(step, row), image(key, path, step)


class TrainHook:
    """No-op defaults; override what you need."""

    def on_epoch_end(self, ctx: HookContext) -> None:
        """After every completed epoch (all ranks wait for each other afterwards)."""

    def on_end(self, ctx: HookContext) -> None:
        """Once, after the final checkpoint."""
