"""Typed run configuration: YAML recipe + ``key.sub=value`` overrides, checked before any data is read.

A recipe under ``configs/`` is loaded into the ``Config`` dataclass tree. Every key must exist in
the tree and every value must have the declared type, otherwise ``ConfigError`` names the dotted
key. Each section then checks its own fields (its ``check()``; the sections live beside the code
they configure: ``augment`` in augment/views.py, ``model`` in pretrain/models/backbones.py,
``optim`` in pretrain/loop/optim.py, each ``method.<name>`` in its method's file), and ``validate``
adds the checks that span sections (a method's backbone needs, GradCache vs accumulation). Name
lists come from the registries that own them, so a new method or backbone needs no edit here.
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
from selfsup.pretrain.data.import_parallel import BAD_IMAGE_POLICIES
from selfsup.pretrain.loop.optim import OptimConfig
from selfsup.pretrain.methods import METHODS
from selfsup.pretrain.models.backbones import ModelConfig, backbone_kind

__all__ = ["AugmentConfig", "Config", "ConfigError", "MethodConfig", "ModelConfig", "OptimConfig",
           "load_config", "save_config", "to_dict", "from_dict", "parse_overrides"]  # fmt: skip


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


PRECISIONS = ("auto", "fp32", "bf16", "fp16")
NAN_POLICIES = ("stop", "skip")
WANDB_MODES = ("online", "offline", "off")


def _one_of(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{key}: '{value}' is not one of {', '.join(allowed)}")


def _positive(section: str, obj: Any, *keys: str) -> None:
    for key in keys:
        if getattr(obj, key) <= 0:
            raise ValueError(f"{section}.{key}: must be > 0, got {getattr(obj, key)}")


@dataclass
class DataConfig:
    train: str = ""  # shard set (folder with manifest.json, or URL of the manifest's folder)
    test: str = ""  # labelled shard set for evaluation during/after training
    batch_size: int = 256  # GLOBAL batch: split evenly over all processes
    workers: int = 2  # DataLoader workers per process (decode only)
    shuffle_buffer: int = 2000  # samples held per worker for sample-level shuffling
    max_corrupt_fraction: float = 0.01  # above this fraction of unreadable samples: error
    # data.train/test given as a folder of images (no manifest.json): written once into cached
    # shards of this side in px (0: augment.size, else 64); unreadable images: error | skip
    folder_size: int = 0
    on_bad_image: str = "error"
    on_bad_shard: str = "error"  # error | skip: a missing/truncated shard stops the run, or is left out (logged)

    def check(self) -> None:
        _positive("data", self, "batch_size")
        if self.workers < 0:
            raise ValueError(f"data.workers: must be >= 0, got {self.workers}")
        if self.shuffle_buffer < 0:
            raise ValueError(f"data.shuffle_buffer: must be >= 0, got {self.shuffle_buffer}")
        if not 0.0 <= self.max_corrupt_fraction <= 1.0:
            raise ValueError("data.max_corrupt_fraction: a fraction in [0, 1]")
        if self.folder_size < 0:
            raise ValueError(f"data.folder_size: must be >= 0 (0: augment.size, else 64), got {self.folder_size}")
        _one_of("data.on_bad_image", self.on_bad_image, BAD_IMAGE_POLICIES)
        _one_of("data.on_bad_shard", self.on_bad_shard, ("error", "skip"))


class MethodConfig:
    """``method.name`` plus one sub-section per registered method (``method.<name>.*``).

    The sub-sections come from the method registry, so a method registered in a plugin or a test
    gets its section without an edit here. ``cfg.method.simclr`` is the SimCLR section;
    ``cfg.method.selected`` the one ``method.name`` picks.
    """

    def __init__(self, name: str = "simclr", **sections: Any) -> None:
        self.name = name
        self.sections: dict[str, Any] = {n: e.config() for n, e in METHODS.items()}
        self.sections.update(sections)

    def __getattr__(self, key: str) -> Any:  # only reached when normal lookup fails
        sections = self.__dict__.get("sections", {})
        if key in sections:
            return sections[key]
        raise AttributeError(f"method config has no section '{key}' (known: {', '.join(sections)})")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, MethodConfig) and (self.name, self.sections) == (other.name, other.sections)

    def __repr__(self) -> str:
        return f"MethodConfig(name={self.name!r}, {self.selected!r})"

    @property
    def selected(self) -> Any:
        return self.sections[self.name]

    def check(self) -> None:
        if self.name not in METHODS:
            raise ValueError(f"method.name: '{self.name}' is not one of {', '.join(sorted(METHODS))}")
        for sub in self.sections.values():
            check = getattr(sub, "check", None)
            if callable(check):
                check()

    @classmethod
    def from_config_dict(cls, data: dict[str, Any], prefix: str) -> MethodConfig:
        known = ["name", *METHODS]
        sections = {}
        for key, value in data.items():
            if key not in known:
                raise ConfigError(f"unknown config key '{prefix}.{key}' (known here: {', '.join(known)})")
            if key != "name":
                sections[key] = _coerce(value, METHODS[key].config, f"{prefix}.{key}")
        return cls(_coerce(data.get("name", "simclr"), str, f"{prefix}.name"), **sections)

    def to_config_dict(self) -> dict[str, Any]:
        return {"name": self.name, **{k: _plain(v) for k, v in self.sections.items()}}


@dataclass
class TrainConfig:
    epochs: int = 10
    max_steps: int = 0  # >0: stop after this many optimiser steps (schedule is sized to it)
    seed: int = 0
    precision: str = "auto"  # auto | fp32 | bf16 | fp16  (auto: bf16 where supported, else fp32)
    channels_last: bool = True
    sync_bn: bool = False  # every BatchNorm over the global batch (SyncBatchNorm on CUDA, all-reduce twins on CPU)
    grad_clip: float = 0.0  # max global grad norm; 0 = no clipping
    accumulate: int = 1  # gradient accumulation steps (adds no InfoNCE negatives; see README)
    checkpoint_every: int = 200  # optimiser steps between checkpoints (0 = only at the end)
    keep_checkpoints: int = 2
    log_every: int = 10  # optimiser steps between metrics.jsonl rows
    nan_policy: str = "stop"  # stop: checkpoint-safe error | skip: drop the step and count it
    max_nan_skips: int = 10  # with nan_policy=skip, give up after this many skipped steps
    dist_timeout_s: int = 300  # a collective waiting longer than this fails instead of hanging
    resume_elastic: bool = False  # --resume on another world size/workers/batch split: global sample position kept, not bitwise
    compile: bool = False  # torch.compile (Module.compile, in place) of backbone and heads; state-dict names unchanged

    def check(self) -> None:
        _one_of("train.precision", self.precision, PRECISIONS)
        _one_of("train.nan_policy", self.nan_policy, NAN_POLICIES)
        _positive("train", self, "accumulate", "log_every", "dist_timeout_s")
        if self.epochs <= 0 and self.max_steps <= 0:
            raise ValueError("train.epochs and train.max_steps are both 0: nothing to train")
        for key in ("max_steps", "checkpoint_every", "keep_checkpoints", "max_nan_skips", "grad_clip"):
            if getattr(self, key) < 0:
                raise ValueError(f"train.{key}: must be >= 0, got {getattr(self, key)}")


@dataclass
class LogConfig:
    wandb: str = "offline"  # online | offline | off
    project: str = "selfsup"
    entity: str | None = None
    name: str | None = None  # W&B run name; default: the run directory's name
    tags: list[str] = field(default_factory=list)
    progress: bool = True  # progress bar on rank 0
    wandb_resume: str = "auto"  # after a kill: new (linked run, history re-logged) | rewind | auto (offline: new, online: rewind)
    # warn (once) when a method's collapse_std stays below this for collapse_patience logged steps
    collapse_threshold: float = 0.1  # 0 = never warn
    collapse_patience: int = 5

    def check(self) -> None:
        _one_of("log.wandb", self.wandb, WANDB_MODES)
        _one_of("log.wandb_resume", self.wandb_resume, ("auto", "new", "rewind"))
        if self.collapse_threshold < 0:
            raise ValueError(f"log.collapse_threshold: must be >= 0 (0 = off), got {self.collapse_threshold}")
        _positive("log", self, "collapse_patience")


@dataclass
class EvalConfig:
    every_epochs: int = 0  # >0: run the kNN protocol during pretraining every N epochs
    knn_k: list[int] = field(default_factory=lambda: [20, 200])
    knn_temperature: float = 0.07
    batch_size: int = 512

    def check(self) -> None:
        _positive("eval", self, "batch_size", "knn_temperature")
        if self.every_epochs < 0:
            raise ValueError(f"eval.every_epochs: must be >= 0, got {self.every_epochs}")
        if not self.knn_k or min(self.knn_k) < 1:
            raise ValueError(f"eval.knn_k: a non-empty list of k >= 1, got {self.knn_k}")


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


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Return ``value`` as type ``tp`` or raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if hasattr(tp, "from_config_dict"):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return tp.from_config_dict(value, key)
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


def _plain(v: Any) -> Any:
    if hasattr(v, "to_config_dict"):
        return v.to_config_dict()
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return {f.name: _plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (tuples as lists) suitable for YAML/JSON."""
    return _plain(cfg)


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


def validate(cfg: Config) -> Config:
    """Every section's own checks, then the combinations that span sections; errors name the key."""
    try:
        for f in dataclasses.fields(cfg):
            check = getattr(getattr(cfg, f.name), "check", None)
            if callable(check):
                check()
    except ValueError as e:
        raise ConfigError(str(e)) from e
    need = METHODS[cfg.method.name].backbone
    have = backbone_kind(cfg.model.backbone)
    if need != "any" and need != have:
        kind = "a ViT backbone (model.backbone=vit_tiny|vit_small|vit_base)" if need == "vit" else (
            "a ResNet backbone (its decoder is convolutional)")
        raise ConfigError(f"method.name={cfg.method.name} needs {kind}, got model.backbone={cfg.model.backbone}")
    if cfg.method.simclr.grad_cache_chunk > 0 and cfg.train.accumulate > 1:
        raise ConfigError(
            "method.simclr.grad_cache_chunk > 0 replaces gradient accumulation: set train.accumulate=1"
        )
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
    return config_from_dict(data, overrides)


def config_from_dict(data: dict[str, Any], overrides: list[str] | None = None) -> Config:
    """A checked Config from a nested mapping (a recipe's content) plus overrides."""
    return validate(from_dict(Config, _merge(data, parse_overrides(list(overrides or [])))))


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
