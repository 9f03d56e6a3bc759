"""What an evaluation reads: the checkpoint (run dir, .pt, export), its model and method, and the
labelled shard sets, each failure an ``EvalError`` that names the file, shard set or value."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from selfsup.config import ModelConfig
from selfsup.data_info import DataInfo
from selfsup.pretrain.methods import Method, method_entry
from selfsup.pretrain.models.backbones import build_backbone
from selfsup.pretrain.models.base import Backbone
from selfsup.pretrain.run import rundir
from selfsup.pretrain.run.rundir import Resolved


class EvalError(ValueError):
    """The evaluation cannot run on this input; the message names the bad file, shard set or value."""


def resolve_checkpoint(path: str | Path) -> Resolved:
    """What the user's path is (run dir, checkpoint in one, export folder), or an EvalError."""
    try:
        return rundir.resolve(path)
    except rundir.RunDirError as e:
        raise EvalError(str(e)) from e


def load_model(where: Resolved | str | Path) -> Backbone:
    """``load_backbone`` with its errors turned into EvalError naming the checkpoint."""
    from selfsup.pretrain.run.export import load_backbone

    if not isinstance(where, Resolved):
        where = resolve_checkpoint(where)
    try:
        return load_backbone(where.path)
    except rundir.RunDirError as e:
        raise EvalError(f"cannot load checkpoint {where.path}: {e}") from e


def model_config(where: Resolved) -> ModelConfig:
    """The ``ModelConfig`` of a run directory or export folder (to rebuild it at random init)."""
    from selfsup.pretrain.run.export import read_export_config

    if where.run_dir is not None:
        return rundir.read_config(where.run_dir).model
    return read_export_config(where.path)[0]


def random_init_like(where: Resolved, info: DataInfo, seed: int) -> Backbone:
    """The checkpoint's architecture freshly built by ``build_backbone`` with ``seed``."""
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        net = build_backbone(model_config(where), info.channels, info.image_size)
    finally:
        torch.random.set_rng_state(state)
    net.data_info = info
    return net.eval()


def load_method(where: Resolved) -> Method | None:
    """The full method of a run (for reconstruction scores) if it reconstructs, else None
    (export folders hold the backbone only)."""
    from selfsup.pretrain.build import build_method

    if where.run_dir is None:
        return None
    cfg = rundir.read_config(where.run_dir)
    if not method_entry(cfg.method.name).cls.reconstructs:
        return None
    method = build_method(cfg, rundir.read_data_info(where.run_dir))
    method.load_state_dict(rundir.load_checkpoint(where.checkpoint)["model"])
    return method.eval()


@dataclass
class LabelledSet:
    path: str
    images: torch.Tensor
    labels: torch.Tensor
    keys: list[str]
    classes: list[str]
    image_size: int


def load_labelled(path: str | Path, what: str) -> LabelledSet:
    """A shard set in memory, with labels required (every protocol here is class-based)."""
    from selfsup.pretrain.data.stream import ShardError, ShardSet, load_arrays

    try:
        ss = ShardSet.open(path)
        size = ss.image_size
        images, labels, keys = load_arrays(ss)
    except ShardError as e:
        raise EvalError(f"{what} shards: {e}") from e
    if not ss.classes or int(labels.min()) < 0:
        raise EvalError(
            f"{what} shards at {path} have no labels (the manifest lists no classes or samples are "
            "unlabelled); linear probe, kNN, retrieval and anomaly protocols need a labelled set: "
            "write one from class folders (selfsup shards --source folder --labels folders) or a "
            "list file with labels (--source list)"
        )
    return LabelledSet(str(path), images, labels, keys, ss.classes, size)


def check_compatible(data: LabelledSet, info: Any, what: str, resize: bool) -> None:
    c = data.images.shape[1]
    if c != info.channels:
        raise EvalError(
            f"channel mismatch: {what} shards at {data.path} have {c} channel(s), the backbone "
            f"was trained on {info.channels}"
        )
    if data.image_size != info.image_size and not resize:
        raise EvalError(
            f"size mismatch: {what} shards at {data.path} are {data.image_size}px, the backbone "
            f"expects {info.image_size}px (pass --resize to resize them for evaluation)"
        )
