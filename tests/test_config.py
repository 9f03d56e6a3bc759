"""Typed config: every recipe loads, overrides apply, and bad keys/types/combinations are errors
that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from selfsup.config import Config, ConfigError, load_config, parse_overrides, save_config, to_dict

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_recipe_loads(path: Path) -> None:
    cfg = load_config(path)
    assert isinstance(cfg, Config) and cfg.run_dir


def test_overrides_nested_and_typed() -> None:
    cfg = load_config(None, ["data.batch_size=64", "augment.scale=[0.1, 0.9]", "optim.base_lr=1e-3",
                             "log.wandb=off", "train.sync_bn=true", "log.tags=[a, b]"])  # fmt: skip
    assert cfg.data.batch_size == 64 and cfg.augment.scale == (0.1, 0.9)
    assert cfg.optim.base_lr == pytest.approx(1e-3)
    assert cfg.log.wandb == "off"  # YAML 1.1 would have made this False
    assert cfg.train.sync_bn is True and cfg.log.tags == ["a", "b"]


def test_round_trip_through_yaml(tmp_path: Path) -> None:
    cfg = load_config(None, ["method.name=dae", "method.dae.corrupt.kind=mask", "augment.mean=[0.5]"])
    save_config(cfg, tmp_path / "c.yaml")
    assert to_dict(load_config(tmp_path / "c.yaml")) == to_dict(cfg)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.bogus=1"], "unknown config key 'data.bogus'"),
        (["nosection.x=1"], "unknown config key 'nosection'"),
        (["data.batch_size=1.5"], "data.batch_size: expected an integer"),
        (["train.sync_bn=yes"], "train.sync_bn: expected true/false"),
        (["augment.scale=[0.1]"], "augment.scale: expected 2 values"),
        (["optim.name=adam"], "optim.name: 'adam' is not one of lars, adamw, sgd"),
        (["data.batch_size=0"], "data.batch_size: must be > 0"),
        (["optim.warmup=1.5"], "optim.warmup"),
        (["method.name=mae"], "needs a ViT backbone"),
        (["method.name=dae", "model.backbone=vit_tiny"], "needs a ResNet backbone"),
        (["train.epochs=0"], "nothing to train"),
        (["method.simclr.grad_cache_chunk=8", "train.accumulate=2"], "replaces gradient accumulation"),
        (["data"], "not of the form key.sub=value"),
        # each section's own checks run in load_config, before any data is read
        (["augment.scale=[0.9, 0.1]"], "augment.scale: need 0 < min <= max <= 1"),
        (["augment.recipe=fancy"], "augment.recipe: 'fancy' is not one of"),
        (["model.backbone=resnet99"], "model.backbone: unknown backbone 'resnet99'"),
        (["method.dae.loss=l3"], "method.dae.loss: 'l3' is not one of mse, l1, huber"),
        (["method.simclr.temperature=0"], "method.simclr.temperature must be > 0"),
        (["method.name=byol9"], "method.name: 'byol9' is not one of"),
        (["method.nosuch.x=1"], "unknown config key 'method.nosuch'"),
    ],
)
def test_errors_name_the_key(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        load_config(None, overrides)


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(tmp_path / "list.yaml")


def test_parse_overrides_builds_nested_dict() -> None:
    assert parse_overrides(["a.b.c=1", "a.d=x", "e=[1, 2]"]) == {"a": {"b": {"c": 1}, "d": "x"}, "e": [1, 2]}


def test_print_config_checks_every_section(tmp_path: Path) -> None:
    """--print-config reads no data, yet refuses what training would refuse."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "selfsup.launch.cli", "pretrain", "--print-config",
                        "augment.scale=[0.9, 0.1]"], capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 2 and "augment.scale" in r.stdout


def test_method_sections_come_from_the_registry() -> None:
    from selfsup.pretrain.methods import METHODS

    cfg = load_config(None)
    assert set(to_dict(cfg)["method"]) == {"name", *METHODS}
    assert cfg.method.selected is cfg.method.simclr
