"""Builds a method from a config, once: the view recipe, the backbone, then the method with its
own sub-config (the method registry says which class and section)."""

from __future__ import annotations

from selfsup.augment.views import build_views
from selfsup.config import Config, ConfigError
from selfsup.data_info import DataInfo
from selfsup.pretrain.methods import Method, method_entry
from selfsup.pretrain.models.backbones import build_backbone
from selfsup.pretrain.models.weights import InitReport, load_into


def data_info(cfg: Config, channels: int, image_size: int, mean, std) -> DataInfo:
    """The data a method sees: the shards' shape, their mean/std unless ``augment.mean/std``
    override them (one value per channel)."""
    mean = cfg.augment.mean or mean
    std = cfg.augment.std or std
    for key, v in (("augment.mean", mean), ("augment.std", std)):
        if len(v) != channels:
            raise ConfigError(f"{key} has {len(v)} values but the shards have {channels} channels")
    return DataInfo(channels, image_size, tuple(mean), tuple(std))


def build_method(cfg: Config, info: DataInfo, init: bool = False) -> Method:
    """The method ``cfg.method.name`` for data described by ``info``. A ValueError raised while
    building (a decoder that cannot reach the input size, ...) becomes a ConfigError.

    ``init``: load ``model.init``'s weights into the backbone (a fresh run; a resume takes its
    weights from the checkpoint) BEFORE the method is built, so the networks a method copies from
    the backbone (BYOL's target, DINO's teacher, MoCo's momentum encoder) start from them too; what
    was loaded is ``method.init_report``."""
    try:
        entry = method_entry(cfg.method.name)
        views = build_views(cfg.augment, info)
        backbone = build_backbone(cfg.model, info.channels, views.size)
        report: InitReport | None = load_into(backbone, cfg.model) if init and cfg.model.init else None
        method = entry.cls(getattr(cfg.method, entry.name), backbone, views, info)
        method.init_report = report
        return method
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(str(e)) from e
