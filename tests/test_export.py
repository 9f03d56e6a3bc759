"""Export and one-call loading: weights and features survive the round trip bit for bit, the
config and model card say what they hold, and bad input fails clearly (interop with torchvision,
timm and ONNX: test_export_interop.py).

Run directories are built by hand here (config.yaml, data_info.json, a checkpoint holding a
method-like module's state dict with a ``backbone.`` prefix), exactly in the layout the trainer
writes, so these tests do not depend on training.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import selfsup
from selfsup.config import load_config, save_config
from selfsup.data_info import DataInfo
from selfsup.launch.cli.main import main as cli_main
from selfsup.pretrain.models.backbones import build_backbone
from selfsup.pretrain.run.export import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    ExportError,
    export_run,
    load_backbone,
)

GRAY28 = DataInfo(channels=1, image_size=28, mean=(0.286,), std=(0.353,))
RGB32 = DataInfo(channels=3, image_size=32, mean=(0.5, 0.4, 0.3), std=(0.25, 0.24, 0.26))


HEADS = {"fc.weight", "fc.bias", "head.weight", "head.bias"}


# ---------------------------------------------------------------- hand-built run directories


def make_run(
    run_dir: Path, overrides: list[str], info: DataInfo, seed: int = 0
) -> tuple[nn.Module, nn.Module]:
    """A run directory as the trainer writes it; returns (method-like module, its backbone).

    The 'method' is a ModuleDict with the backbone and a projection head, so the checkpoint holds
    ``backbone.*`` and other keys, as a real method's state dict does. BatchNorm running
    statistics are moved away from their initial values so that eval mode visibly matters.
    """
    torch.manual_seed(seed)
    cfg = load_config(None, [f"run_dir={run_dir}", *overrides])
    backbone = build_backbone(cfg.model, info.channels, info.image_size)
    method = nn.ModuleDict({"backbone": backbone, "projector": nn.Linear(backbone.feature_dim, 8)})
    backbone.train()
    with torch.no_grad():
        for _ in range(2):
            backbone(torch.randn(8, info.channels, info.image_size, info.image_size) * 2 + 0.5)
    backbone.eval()
    (run_dir / "checkpoints").mkdir(parents=True)
    save_config(cfg, run_dir / "config.yaml")
    (run_dir / "data_info.json").write_text(json.dumps(dataclasses.asdict(info)))
    torch.save({"model": method.state_dict(), "step": 42}, run_dir / "checkpoints/step-00000042.pt")
    (run_dir / "checkpoints/latest").write_text("step-00000042.pt\n")
    return method, backbone


def _inputs(info: DataInfo, n: int = 6, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, info.channels, info.image_size, info.image_size, generator=g)


SMALL = ["model.backbone=resnet_small", "model.stem=cifar_s2"]


@pytest.fixture
def small_run(tmp_path: Path) -> tuple[Path, nn.Module]:
    _, backbone = make_run(tmp_path / "run", SMALL, GRAY28)
    return tmp_path / "run", backbone


# ---------------------------------------------------------------- round trip


def test_export_then_load_gives_identical_weights_and_features(small_run, tmp_path):
    run_dir, trained = small_run
    out = tmp_path / "export"
    paths = export_run(run_dir, out)
    assert set(paths) == {"weights", "config", "card"}

    saved = load_file(str(out / WEIGHTS_FILE))
    reference = trained.state_dict()
    assert set(saved) == set(reference)
    for k, v in reference.items():
        assert torch.equal(saved[k], v), k

    x = _inputs(GRAY28)
    with torch.no_grad():
        want = trained(x)
        from_export = load_backbone(out)
        from_run = load_backbone(run_dir)
        from_ckpt = load_backbone(run_dir / "checkpoints/step-00000042.pt")
        for model in (from_export, from_run, from_ckpt):
            assert not model.training
            assert model.data_info == GRAY28
            assert torch.equal(model(x), want)
    assert want.shape == (6, trained.feature_dim)


def test_package_level_loader_is_the_export_loader(small_run, tmp_path):
    run_dir, trained = small_run
    export_run(run_dir, tmp_path / "e")
    model = selfsup.load_backbone(tmp_path / "e")
    x = _inputs(GRAY28)
    with torch.no_grad():
        assert torch.equal(model(x), trained(x))
    assert selfsup.__version__


def test_config_json_describes_architecture_input_and_normalisation(small_run, tmp_path):
    run_dir, trained = small_run
    export_run(run_dir, tmp_path / "e")
    meta = json.loads((tmp_path / "e" / CONFIG_FILE).read_text())
    assert meta["model"] == {
        "backbone": "resnet_small",
        "stem": "cifar_s2",
        "width": 1.0,
        "patch_size": 4,
    }
    assert meta["channels"] == 1 and meta["image_size"] == 28
    assert meta["mean"] == [0.286] and meta["std"] == [0.353]
    assert meta["method"] == "simclr" and meta["step"] == 42
    assert meta["feature_dim"] == trained.feature_dim == 256


def test_model_card_names_method_data_steps_and_eval_figures(small_run, tmp_path):
    run_dir, _ = small_run
    (run_dir / "eval").mkdir()
    report = {
        "models": {
            "pretrained": {"linear_top1": 86.71, "knn_top1_k20": 82.53},
            "raw_pixels": {"linear_top1": 82.04, "knn_top1_k20": 78.81},
        }
    }
    (run_dir / "eval" / "report.json").write_text(json.dumps(report))
    export_run(run_dir, tmp_path / "e")
    card = (tmp_path / "e" / "README.md").read_text()
    assert "SIMCLR" in card and "resnet_small" in card
    assert "42 optimiser steps" in card
    assert "| Metric | pretrained | raw_pixels |" in card
    assert "| Linear probe top-1 (%) | 86.71 | 82.04 |" in card
    assert "| kNN top-1, k=20 (%) | 82.53 | 78.81 |" in card


def test_model_card_without_eval_report_says_so(small_run, tmp_path):
    run_dir, _ = small_run
    export_run(run_dir, tmp_path / "e")
    assert "No evaluation report" in (tmp_path / "e" / "README.md").read_text()


def test_cli_export_writes_folder_and_prints_paths(small_run, tmp_path, capsys):
    run_dir, _ = small_run
    assert cli_main(["export", "--run", str(run_dir), "--out", str(tmp_path / "e")]) == 0
    printed = capsys.readouterr().out
    assert str(tmp_path / "e" / WEIGHTS_FILE) in printed
    assert (tmp_path / "e" / "README.md").is_file()


def test_cli_export_defaults_to_run_export_folder(small_run):
    run_dir, _ = small_run
    assert cli_main(["export", "--run", str(run_dir)]) == 0
    assert (run_dir / "export" / WEIGHTS_FILE).is_file()


def test_cli_export_bad_run_exits_nonzero_with_message(tmp_path, capsys):
    assert cli_main(["export", "--run", str(tmp_path / "nope")]) == 1
    assert "no such run directory" in capsys.readouterr().err


# ---------------------------------------------------------------- bad input


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(ExportError, match="no such run directory"):
        load_backbone(tmp_path / "missing")


def test_run_without_checkpoint(small_run):
    run_dir, _ = small_run
    for f in (run_dir / "checkpoints").iterdir():
        f.unlink()
    with pytest.raises(ExportError, match="no checkpoint"):
        export_run(run_dir, run_dir / "e")


def test_latest_pointing_nowhere(small_run):
    run_dir, _ = small_run
    (run_dir / "checkpoints/latest").write_text("step-00000099.pt")
    with pytest.raises(ExportError, match="step-00000099.pt"):
        load_backbone(run_dir)


def test_corrupt_checkpoint(small_run):
    run_dir, _ = small_run
    ckpt = run_dir / "checkpoints/step-00000042.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:1000])  # truncated, as after a kill mid-copy
    with pytest.raises(ExportError, match="cannot read checkpoint"):
        load_backbone(run_dir)


def test_checkpoint_that_needs_pickle_is_refused(small_run):
    run_dir, _ = small_run
    torch.save({"model": {}, "extra": Path("x")}, run_dir / "checkpoints/step-00000042.pt")
    with pytest.raises(ExportError, match="cannot read checkpoint"):
        load_backbone(run_dir)


def test_checkpoint_without_backbone_entries(small_run):
    run_dir, _ = small_run
    torch.save({"model": {"head.weight": torch.zeros(2)}}, run_dir / "checkpoints/step-00000042.pt")
    with pytest.raises(ExportError, match="no 'backbone.\\*' entries"):
        load_backbone(run_dir)


def test_config_that_does_not_match_the_weights(small_run):
    run_dir, _ = small_run
    cfg = load_config(run_dir / "config.yaml", ["model.width=2.0"])
    save_config(cfg, run_dir / "config.yaml")
    with pytest.raises(ExportError, match=r"do not match .*width=2.0.*shape: conv1.weight"):
        load_backbone(run_dir)


def test_data_info_with_wrong_channel_count(small_run):
    run_dir, _ = small_run
    (run_dir / "data_info.json").write_text(json.dumps(dataclasses.asdict(RGB32)))
    with pytest.raises(ExportError, match="3 channels.*conv1.weight"):
        load_backbone(run_dir)


def test_missing_data_info(small_run):
    run_dir, _ = small_run
    (run_dir / "data_info.json").unlink()
    with pytest.raises(ExportError, match="data_info.json: missing"):
        load_backbone(run_dir)


def test_corrupt_safetensors(small_run, tmp_path):
    run_dir, _ = small_run
    export_run(run_dir, tmp_path / "e")
    weights = tmp_path / "e" / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:500])
    with pytest.raises(ExportError, match="cannot read safetensors"):
        load_backbone(tmp_path / "e")


def _edit_export_config(run_dir: Path, out: Path, edit) -> Path:
    """Export ``run_dir`` to ``out``, then change its config as ``edit(meta)`` does."""
    export_run(run_dir, out)
    path = out / CONFIG_FILE
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))
    return out


@pytest.mark.parametrize(("edit", "error"), [
    (lambda m: m["model"].update(depth=7), "unknown config key 'model.depth'"),
    (lambda m: m["model"].update(backbone="resnet18"), "missing: .*layer1.1"),
], ids=["unknown architecture key", "another architecture"])  # fmt: skip
def test_export_config_that_cannot_build_the_weights(small_run, tmp_path, edit, error):
    with pytest.raises(ExportError, match=error):
        load_backbone(_edit_export_config(small_run[0], tmp_path / "e", edit))


def test_format_version_1_exports_still_load(small_run, tmp_path):
    def version_1(meta: dict) -> None:
        meta["format_version"], meta["architecture"] = 1, meta.pop("model")

    assert load_backbone(_edit_export_config(small_run[0], tmp_path / "e", version_1)).feature_dim == 256
