"""Interop of the export: its parameter names and shapes against torchvision's and timm's
reference architectures (written out in tests/reference_archs.py, since torchvision does not import
beside the CPU torch), loading into a torchvision-style ResNet, timm's fields, ONNX against PyTorch.
The run directories are built by hand as in test_export.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from optional_deps import import_or_skip
from reference_archs import timm_vit_keys, torchvision_resnet_keys
from safetensors.torch import load_file
from test_export import GRAY28, HEADS, RGB32, SMALL, _inputs, make_run
from torch import nn

from selfsup.config import load_config
from selfsup.pretrain.models.backbones import build_backbone
from selfsup.pretrain.run.export import (
    CARD_FILE,
    CONFIG_FILE,
    ONNX_FILE,
    WEIGHTS_FILE,
    export_run,
)


@pytest.fixture
def small_run(tmp_path: Path) -> tuple[Path, nn.Module]:
    _, backbone = make_run(tmp_path / "run", SMALL, GRAY28)
    return tmp_path / "run", backbone


# ---------------------------------------------------------------- names against the references


@pytest.mark.parametrize(
    ("overrides", "info", "reference"),
    [
        (
            ["model.backbone=resnet18", "model.stem=imagenet"],
            RGB32,
            torchvision_resnet_keys((2, 2, 2, 2), False, 3, "imagenet"),
        ),
        (
            ["model.backbone=resnet_small", "model.stem=cifar_s2"],
            GRAY28,
            torchvision_resnet_keys((1, 1, 1, 1), False, 1, "cifar", base=32),
        ),
        (
            ["model.backbone=vit_tiny", "model.patch_size=4"],
            RGB32,
            timm_vit_keys(192, 12, 3, 32, 4),
        ),
    ],
    ids=["resnet18", "resnet_small", "vit_tiny"],
)
def test_exported_names_and_shapes_match_reference_architecture(
    tmp_path, overrides, info, reference
):
    run_dir = tmp_path / "run"
    make_run(run_dir, overrides, info)
    export_run(run_dir, tmp_path / "e")
    saved = load_file(str(tmp_path / "e" / WEIGHTS_FILE))
    # what load_state_dict(strict=False) into the reference would report
    missing = set(reference) - set(saved)
    unexpected = set(saved) - set(reference)
    assert unexpected == set()
    assert missing == HEADS & set(reference)
    for k, v in saved.items():
        assert tuple(v.shape) == reference[k], k


def test_resnet50_names_and_shapes_match_torchvision():
    """Bottleneck blocks and their downsample shortcut (not exported: 100 MB for one test)."""
    cfg = load_config(None, ["model.backbone=resnet50", "model.stem=imagenet"])
    state = build_backbone(cfg.model, 3, 224).state_dict()
    reference = torchvision_resnet_keys((3, 4, 6, 3), True, 3, "imagenet")
    assert set(reference) - set(state) == {"fc.weight", "fc.bias"}
    assert {k: tuple(v.shape) for k, v in state.items()} == {
        k: v for k, v in reference.items() if k in state
    }


def test_loads_into_torchvision_with_only_fc_missing(tmp_path):
    torchvision = import_or_skip("torchvision", "torchvision not installed")
    run_dir = tmp_path / "run"
    make_run(run_dir, ["model.backbone=resnet18", "model.stem=imagenet"], RGB32)
    export_run(run_dir, tmp_path / "e")
    result = torchvision.models.resnet18().load_state_dict(
        load_file(str(tmp_path / "e" / WEIGHTS_FILE)), strict=False
    )
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"]
    assert result.unexpected_keys == []


# ---------------------------------------------------------------- ONNX


def test_onnx_export_matches_pytorch(small_run, tmp_path):
    ort = import_or_skip("onnxruntime", "onnxruntime not installed (selfsup[onnx])")
    run_dir, trained = small_run
    paths = export_run(run_dir, tmp_path / "e", onnx=True)
    assert paths["onnx"] == tmp_path / "e" / ONNX_FILE
    meta = json.loads((tmp_path / "e" / CONFIG_FILE).read_text())
    assert meta["onnx_max_abs_diff"] < 1e-4
    session = ort.InferenceSession(str(paths["onnx"]), providers=["CPUExecutionProvider"])
    x = _inputs(GRAY28, n=5, seed=7)  # another batch size than the export's: dynamic batch axis
    got = torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
    with torch.no_grad():
        want = trained(x)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- command line


# ---------------------------------------------------------------- timm / torchvision interop


@pytest.mark.parametrize("backbone", ["vit_micro", "vit_tiny"])
def test_timm_fields_rebuild_the_exported_names_and_shapes(tmp_path, backbone):
    """config.json's timm fields (what timm.create_model('local-dir:...') reads) describe a
    VisionTransformer whose state dict is exactly the exported one, less the head."""
    run_dir = tmp_path / "run"
    make_run(run_dir, [f"model.backbone={backbone}", "model.patch_size=4"], RGB32)
    export_run(run_dir, tmp_path / "e")
    meta = json.loads((tmp_path / "e" / CONFIG_FILE).read_text())
    args = meta["model_args"]
    assert meta["architecture"] == "vit_tiny_patch16_224" and meta["num_classes"] == 0
    assert args["num_classes"] == 0 and args["global_pool"] == "token" and args["mlp_ratio"] == 4.0
    assert meta["pretrained_cfg"]["input_size"] == [3, 32, 32]
    reference = timm_vit_keys(args["embed_dim"], args["depth"], args["in_chans"], args["img_size"],
                              args["patch_size"])  # fmt: skip
    saved = load_file(str(tmp_path / "e" / WEIGHTS_FILE))
    assert {k: tuple(v.shape) for k, v in saved.items()} == {
        k: v for k, v in reference.items() if k not in HEADS}
    card = (tmp_path / "e" / CARD_FILE).read_text()
    assert "timm.create_model('vit_tiny_patch16_224', patch_size=4, img_size=32, in_chans=3" in card
    assert "local-dir:" in card


def test_resnet_card_says_whether_the_stem_is_torchvisions(tmp_path):
    run_dir = tmp_path / "run"
    make_run(run_dir, ["model.backbone=resnet18", "model.stem=imagenet"], RGB32)
    export_run(run_dir, tmp_path / "a")
    meta = json.loads((tmp_path / "a" / CONFIG_FILE).read_text())
    assert meta["architecture"] == "resnet18" and "torchvision.models.resnet18()" in meta["param_naming"]
    shutil.rmtree(run_dir)
    make_run(run_dir, ["model.backbone=resnet18", "model.stem=cifar"], RGB32)
    export_run(run_dir, tmp_path / "b")
    meta = json.loads((tmp_path / "b" / CONFIG_FILE).read_text())
    assert "architecture" not in meta and "not a torchvision/timm preset" in meta["param_naming"]
    card = (tmp_path / "b" / CARD_FILE).read_text()
    assert "model.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)" in card
    assert "model.maxpool = torch.nn.Identity()" in card
