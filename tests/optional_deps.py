"""Optional test dependencies that may be installed but unusable here.

``pytest.importorskip`` only skips on ImportError; torchvision built for another torch raises a
RuntimeError at import (``operator torchvision::nms does not exist``), which would fail the test
instead of skipping it. ``import_or_skip`` skips on both, with the real reason.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import pytest


def import_or_skip(name: str, missing: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ImportError:
        pytest.skip(missing)
    except Exception as e:  # noqa: BLE001 - installed, but does not load beside this torch
        import torch

        pytest.skip(f"{name} is installed but cannot be loaded beside torch {torch.__version__}: "
                    f"{type(e).__name__}: {e}")  # fmt: skip
