"""Typed run configuration: YAML recipe + ``key.sub=value`` overrides, checked before any data is read.

A recipe under ``configs/`` is loaded into the ``Config`` dataclass tree. Every key must exist in
the tree and every value must have the declared type, otherwise ``ConfigError`` names the dotted
key. ``validate`` then rejects impossible combinations (unknown method, bad precision, ...).
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from selfsup.augment.views import AugmentConfig
from selfsup.pretrain.methods.dae import DAEConfig
from selfsup.pretrain.methods.mae import MAEConfig
from selfsup.pretrain.methods.simclr import SimCLRConfig


class ConfigError(ValueError):
    """A config key is unknown, has the wrong type, or the combination cannot run."""


class _YAMLLoader(yaml.SafeLoader):
    """YAML with YAML 1.2 booleans: only true/false are booleans, so ``wandb: off`` stays a string."""


_YAMLLoader.yaml_implicit_resolvers = {
    ch: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for ch, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_YAMLLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=_YAMLLoader)  # noqa: S506 - a SafeLoader subclass


@dataclass
class DataConfig:
    train: str = ""  # shard set (folder with manifest.json, or URL of the manifest's folder)
    test: str = ""  # labelled shard set for evaluation during/after training
    batch_size: int = 256  # GLOBAL batch: split evenly over all processes
    workers: int = 2  # DataLoader workers per process (decode only)
    shuffle_buffer: int = 2000  # samples held per worker for sample-level shuffling
    max_corrupt_fraction: float = 0.01  # above this fraction of unreadable samples: error
    on_bad_shard: str = "error"  # error | skip: a missing/truncated shard stops the run, or is left out (logged)


@dataclass
class ModelConfig:
    backbone: str = "resnet_small"  # resnet_small | resnet18 | resnet34 | resnet50 | vit_micro | vit_tiny | vit_small | vit_base
    stem: str = "cifar"  # imagenet (7x7/2 + maxpool) | cifar (3x3/1) | cifar_s2 (3x3/2)
    width: float = 1.0  # channel width multiplier (ResNets)
    patch_size: int = 4  # ViT patch side in pixels


@dataclass
class MethodConfig:
    name: str = "simclr"  # simclr | mae | dae
    simclr: SimCLRConfig = field(default_factory=SimCLRConfig)
    mae: MAEConfig = field(default_factory=MAEConfig)
    dae: DAEConfig = field(default_factory=DAEConfig)


@dataclass
class OptimConfig:
    name: str = "lars"  # lars | adamw | sgd
    base_lr: float = 0.3  # learning rate = base_lr * global_batch / 256
    weight_decay: float = 1e-6
    momentum: float = 0.9  # lars / sgd
    betas: tuple[float, float] = (0.9, 0.95)  # adamw
    lars_eta: float = 0.001  # LARS trust coefficient
    warmup: float = 0.05  # fraction of all optimiser steps spent in linear warmup
    min_lr_ratio: float = 0.0  # cosine ends at base lr * this


@dataclass
class TrainConfig:
    epochs: int = 10
    max_steps: int = 0  # >0: stop after this many optimiser steps (schedule is sized to it)
    seed: int = 0
    precision: str = "auto"  # auto | fp32 | bf16 | fp16  (auto: bf16 where supported, else fp32)
    channels_last: bool = True
    sync_bn: bool = False
    grad_clip: float = 0.0  # max global grad norm; 0 = no clipping
    accumulate: int = 1  # gradient accumulation steps (adds no InfoNCE negatives; see README)
    checkpoint_every: int = 200  # optimiser steps between checkpoints (0 = only at the end)
    keep_checkpoints: int = 2
    log_every: int = 10  # optimiser steps between metrics.jsonl rows
    nan_policy: str = "stop"  # stop: checkpoint-safe error | skip: drop the step and count it
    max_nan_skips: int = 10  # with nan_policy=skip, give up after this many skipped steps
    dist_timeout_s: int = 300  # a collective waiting longer than this fails instead of hanging


@dataclass
class LogConfig:
    wandb: str = "offline"  # online | offline | off
    project: str = "selfsup"
    entity: str | None = None
    name: str | None = None  # W&B run name; default: the run directory's name
    tags: list[str] = field(default_factory=list)
    progress: bool = True  # progress bar on rank 0
    wandb_resume: str = "auto"  # after a kill: new (linked run, history re-logged) | rewind | auto (offline: new, online: rewind)


@dataclass
class EvalConfig:
    every_epochs: int = 0  # >0: run the kNN protocol during pretraining every N epochs
    knn_k: list[int] = field(default_factory=lambda: [20, 200])
    knn_temperature: float = 0.07
    batch_size: int = 512


@dataclass
class Config:
    run_dir: str = "runs/default"
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


CHOICES: dict[str, tuple[str, ...]] = {
    "model.stem": ("imagenet", "cifar", "cifar_s2"),
    "method.name": ("simclr", "mae", "dae"),
    "optim.name": ("lars", "adamw", "sgd"),
    "train.precision": ("auto", "fp32", "bf16", "fp16"),
    "train.nan_policy": ("stop", "skip"),
    "data.on_bad_shard": ("error", "skip"),
    "log.wandb_resume": ("auto", "new", "rewind"),
    "log.wandb": ("online", "offline", "off"),
    "augment.recipe": ("simclr", "byol", "mae", "none"),
    "method.dae.loss": ("mse", "l1", "huber"),
    "method.dae.corrupt.kind": ("none", "gaussian", "mask", "saltpepper"),
}


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Return ``value`` as type ``tp`` or raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return from_dict(tp, value, key)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
        item = args[0] if args else Any
        out = [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported config type {tp!r}")


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping; unknown keys and wrong types are errors."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in data:
        if k not in names:
            where = f"{prefix}.{k}" if prefix else k
            known = ", ".join(sorted(names))
            raise ConfigError(f"unknown config key '{where}' (known here: {known})")
    kwargs = {}
    for k, v in data.items():
        where = f"{prefix}.{k}" if prefix else k
        kwargs[k] = _coerce(v, hints[k], where)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (tuples as lists) suitable for YAML/JSON."""

    def conv(v: Any) -> Any:
        if isinstance(v, tuple):
            return [conv(x) for x in v]
        if isinstance(v, list):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v

    return conv(dataclasses.asdict(cfg))


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn ``["a.b=1", "c=x"]`` into a nested dict; values are parsed as YAML scalars/lists."""
    nested: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key.sub=value")
        key, raw = item.split("=", 1)
        key = key.strip().lstrip("-")
        if not key:
            raise ConfigError(f"override '{item}' has an empty key")
        value = _yaml(raw) if raw.strip() else ""
        node = nested
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}' conflicts with another override")
        node[parts[-1]] = value
    return nested


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def _lookup(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def validate(cfg: Config) -> Config:
    """Reject impossible combinations with a message naming the key."""
    for key, allowed in CHOICES.items():
        value = _lookup(cfg, key)
        if value not in allowed:
            raise ConfigError(f"{key}: '{value}' is not one of {', '.join(allowed)}")
    positive = {
        "data.batch_size": cfg.data.batch_size,
        "train.accumulate": cfg.train.accumulate,
        "train.log_every": cfg.train.log_every,
        "eval.batch_size": cfg.eval.batch_size,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key}: must be > 0, got {value}")
    if cfg.train.epochs <= 0 and cfg.train.max_steps <= 0:
        raise ConfigError("train.epochs and train.max_steps are both 0: nothing to train")
    if not 0.0 <= cfg.optim.warmup < 1.0:
        raise ConfigError(f"optim.warmup: a fraction in [0, 1), got {cfg.optim.warmup}")
    if cfg.data.workers < 0:
        raise ConfigError(f"data.workers: must be >= 0, got {cfg.data.workers}")
    if not 0.0 <= cfg.data.max_corrupt_fraction <= 1.0:
        raise ConfigError("data.max_corrupt_fraction: a fraction in [0, 1]")
    if cfg.method.name == "mae" and not cfg.model.backbone.startswith("vit"):
        raise ConfigError(
            f"method.name=mae needs a ViT backbone (model.backbone=vit_tiny|vit_small|vit_base), "
            f"got model.backbone={cfg.model.backbone}"
        )
    if cfg.method.simclr.grad_cache_chunk > 0 and cfg.train.accumulate > 1:
        raise ConfigError(
            "method.simclr.grad_cache_chunk > 0 replaces gradient accumulation: set train.accumulate=1"
        )
    if cfg.method.name == "dae" and cfg.model.backbone.startswith("vit"):
        raise ConfigError("method.name=dae needs a ResNet backbone (its decoder is convolutional)")
    return cfg


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Load a recipe YAML (or the defaults when ``path`` is None) and apply overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        loaded = _yaml(p.read_text())
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections")
        data = loaded
    data = _merge(data, parse_overrides(overrides or []))
    return validate(from_dict(Config, data))


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
