"""selfsup: distributed self-supervised pretraining for images.

The Python API (selfsup/api.py), imported on first use so that ``import selfsup`` (and the CLI's
start-up) stays light:

- ``selfsup.pretrain(config, **overrides) -> run_dir`` (``train__max_steps=10`` is ``train.max_steps=10``)
- ``selfsup.evaluate(run_or_export, **options) -> report``
- ``selfsup.export(run, out=None) -> export folder``
- ``selfsup.load_backbone(path) -> backbone`` for an export folder, a run directory or a checkpoint
"""

from __future__ import annotations

import importlib
from typing import Any

from selfsup._version import __version__

__all__ = ["__version__", "evaluate", "export", "load_backbone", "pretrain"]


def __getattr__(name: str) -> Any:
    if name == "load_backbone":
        from selfsup.pretrain.run.export import load_backbone

        return load_backbone
    if name in ("evaluate", "export"):
        from selfsup import api

        return getattr(api, name)
    if name == "pretrain":  # the subpackage, which is callable as selfsup.api.pretrain
        return importlib.import_module("selfsup.pretrain")
    raise AttributeError(f"module 'selfsup' has no attribute '{name}'")
