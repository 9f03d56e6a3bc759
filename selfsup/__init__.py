"""selfsup: distributed self-supervised pretraining for images.

``selfsup.load_backbone(path)`` is the one-call loader for an export folder or a run directory;
it is imported on first use so that ``import selfsup`` (and the CLI's start-up) stays light.
"""

from __future__ import annotations

from typing import Any

from selfsup._version import __version__

__all__ = ["__version__", "load_backbone"]


def __getattr__(name: str) -> Any:
    if name == "load_backbone":
        from selfsup.pretrain.export import load_backbone

        return load_backbone
    raise AttributeError(f"module 'selfsup' has no attribute '{name}'")
