"""The Python API, for notebooks and sweeps: the same code paths as the CLI, returning paths and
reports instead of printing them.

```python
import selfsup

run = selfsup.pretrain("configs/simclr_demo.yaml", data__train="data/train",
                       data__test="data/test", run_dir="runs/nb", train__max_steps=200)
report = selfsup.evaluate(run)                     # dict, as eval/report.json
print(report["models"]["pretrained"]["linear_top1"], report["models"]["raw_pixels"]["linear_top1"])
folder = selfsup.export(run)                       # runs/nb/export
model = selfsup.load_backbone(folder)
```

Overrides are keyword arguments with ``__`` for the dots of ``key.sub=value`` (``train__max_steps=200``
is ``train.max_steps=200``), or CLI-style strings in ``overrides=[...]``; both go through the same
typed checks as the command line, so a wrong key or type is a ``ConfigError`` naming it. Training
runs in this process (one process); for several, launch the CLI under torchrun/accelerate/srun.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from selfsup.config import Config, config_from_dict, load_config, to_dict


def settings_to_overrides(settings: dict[str, Any]) -> list[str]:
    """``{"train__max_steps": 10, "augment__scale": (0.2, 1.0)}`` -> CLI override strings."""
    out = []
    for key, value in settings.items():
        if isinstance(value, tuple):
            value = list(value)
        text = yaml.safe_dump(value, default_flow_style=True, width=1 << 30).strip()
        text = text[: -len("...")].strip() if text.endswith("...") else text
        out.append(f"{key.replace('__', '.')}={text}")
    return out


def make_config(config: str | Path | Config | None = None, overrides: Sequence[str] = (),
                **settings: Any) -> Config:  # fmt: skip
    """The resolved config: a recipe path (or None for the defaults) plus overrides."""
    all_overrides = [*overrides, *settings_to_overrides(settings)]
    if isinstance(config, Config):
        return config_from_dict(to_dict(config), all_overrides)
    return load_config(config, all_overrides)


def default_hooks(cfg: Config) -> list:
    """What ``selfsup pretrain`` hands the loop: the reconstruction grid (methods that reconstruct),
    the method's own pictures (``Method.pictures``/``latent``: VAE samples, latent scatter) and the
    periodic kNN evaluation (``eval.every_epochs`` with ``data.test``)."""
    from selfsup.eval.periodic import periodic_hooks
    from selfsup.pretrain.hooks.pictures import MethodPictures
    from selfsup.pretrain.hooks.recon import ReconstructionGrid

    pictures = MethodPictures(cfg.data.train, cfg.data.test, seed=cfg.train.seed)
    return [ReconstructionGrid(cfg.data.train), pictures, *periodic_hooks(cfg)]


def pretrain_config(cfg: Config, resume: str | None = None, break_lock: bool = False) -> Path:
    """Train ``cfg`` in this process with the CLI's hooks; returns the run directory."""
    from selfsup.config import ConfigError
    from selfsup.pretrain.data.shard_cache import resolve_image_folders
    from selfsup.pretrain.loop.train import train

    if not cfg.data.train:
        raise ConfigError("data.train is empty: point it at a shard set (selfsup shards --out DIR)")
    # a folder of images: written once into cached shards, on rank 0, before any heavy start-up
    resolve_image_folders(cfg)
    return train(cfg, resume=resume, hooks=default_hooks(cfg), break_lock=break_lock)


def pretrain(config: str | Path | Config | None = None, *, resume: str | None = None,
             overrides: Sequence[str] = (), **settings: Any) -> Path:  # fmt: skip
    """Pretrain (``selfsup pretrain``) and return the run directory."""
    return pretrain_config(make_config(config, overrides, **settings), resume)


def shards_for(where, train: str | None, test: str | None) -> tuple[str, str]:
    """Fill missing shard paths from the run's config (data.train / data.test)."""
    from selfsup.eval.run import EvalError
    from selfsup.pretrain.run.rundir import RunDirError, read_config

    if train and test:
        return train, test
    try:
        cfg = read_config(where.run_dir) if where.run_dir is not None else None
    except RunDirError as e:
        raise EvalError(str(e)) from e
    train = train or (cfg.data.train if cfg else "")
    test = test or (cfg.data.test if cfg else "")
    if not train or not test:
        raise EvalError("--train-shards and --test-shards are required (the checkpoint's config "
                        "does not name data.train and data.test)")
    return train, test


def evaluate(checkpoint: str | Path, *, train_shards: str | None = None,
             test_shards: str | None = None, out: str | Path | None = None,
             **options: Any) -> dict[str, Any]:  # fmt: skip
    """Evaluate (``selfsup eval``) a run dir, checkpoint or export beside the baselines; writes the
    report to ``out`` (default ``<run>/eval``) and returns it. ``options`` are ``EvalOptions``
    fields (``protocols=("linear", "knn")``, ``knn_k=(20,)``, ``device="cuda"``, ...)."""
    from selfsup.eval.run import EvalOptions, resolve_checkpoint, run_eval
    from selfsup.pretrain.run.rundir import EVAL_DIR

    where = resolve_checkpoint(checkpoint)
    train, test = shards_for(where, train_shards, test_shards)
    out_dir = Path(out) if out is not None else where.home / EVAL_DIR
    return run_eval(where.path, train, test, out_dir, EvalOptions(**options))


def export(run: str | Path, *, out: str | Path | None = None, onnx: bool = False) -> Path:
    """Export (``selfsup export``) a run's backbone; returns the export folder."""
    from selfsup.pretrain.run.export import export_run
    from selfsup.pretrain.run.rundir import EXPORT_DIR, resolve

    where = resolve(run)
    folder = Path(out) if out is not None else where.home / EXPORT_DIR
    export_run(where.path, folder, onnx=onnx)
    return folder
