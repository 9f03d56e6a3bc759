"""The methods, one file each, registered on import (``registry.py``); the contract is ``base.py``.

Adding a method: write ``pretrain/methods/<name>.py`` with a ``Method`` subclass decorated by
``@register_method("<name>", <Name>Config)`` and import it below. Nothing else changes: the config
gets a ``method.<name>`` section, ``method.name=<name>`` selects it, and the loop, eval and export
treat it like every other method.
"""

from selfsup.pretrain.methods import (  # noqa: F401  (registers them)
    ae,
    barlow_twins,
    beta_vae,
    byol,
    cae,
    dae,
    dino,
    distill,
    mae,
    mocov3,
    simclr,
    simclr_ae,
    simsiam,
    sparse_ae,
    vae,
    vicreg,
)
from selfsup.pretrain.methods.base import Method, StepContext
from selfsup.pretrain.methods.registry import METHODS, MethodEntry, method_entry, register_method

__all__ = ["METHODS", "Method", "MethodEntry", "StepContext", "method_entry", "register_method"]
