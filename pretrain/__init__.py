"""Pretraining: data/ (sources, shards, streaming), models/ (backbones), methods/ (one file each),
the loop (train.py), the run directory (rundir.py) and export.

The package is also callable: ``selfsup.pretrain(config, **overrides)`` is ``selfsup.api.pretrain``
(a package and a function cannot share the name otherwise; see selfsup/api.py).
"""

import sys
import types


class _CallablePackage(types.ModuleType):
    def __call__(self, *args, **kwargs):
        from selfsup.api import pretrain

        return pretrain(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
