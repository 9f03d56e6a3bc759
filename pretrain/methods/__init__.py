"""Method registry: ``build_method(cfg, info)`` constructs the method named by ``cfg.method.name``.

Each entry imports its module only when asked for, so a method whose module (or optional
dependency) is broken or missing does not stop the others from being built.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from torch import nn

if TYPE_CHECKING:
    from selfsup.config import Config
    from selfsup.pretrain.methods.base import DataInfo


def _simclr() -> type[nn.Module]:
    from selfsup.pretrain.methods.simclr import SimCLR

    return SimCLR


def _mae() -> type[nn.Module]:
    from selfsup.pretrain.methods.mae import MAE

    return MAE


def _dae() -> type[nn.Module]:
    from selfsup.pretrain.methods.dae import DAE

    return DAE


# name -> loader returning the method class (constructed as ``Method(cfg, info)``)
METHODS: dict[str, Callable[[], type[nn.Module]]] = {"simclr": _simclr, "mae": _mae, "dae": _dae}


def build_method(cfg: Config, info: DataInfo) -> nn.Module:
    """The method module for ``cfg.method.name``, built for data described by ``info``."""
    name = cfg.method.name
    if name not in METHODS:
        raise ValueError(
            f"method.name: unknown method '{name}' (known: {', '.join(sorted(METHODS))})"
        )
    return METHODS[name]()(cfg, info)
