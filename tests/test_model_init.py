"""``model.init``: a run starts from weights in a local file or folder.

Files are made here in the layouts torchvision and timm write (``tests/reference_archs.py`` spells
those out independently of selfsup's modules), and an export of this project is written by
``export_run``. Each load is checked for its exact key report and for the tensors that arrived; the
adapted tensors against independent computations (the first conv by linearity: a grey image
through the summed filters equals the RGB image of three equal channels through the original
ones; the position grid against PIL's antialiased bicubic resize). Bad input (a wrong shape, a
pickle payload, a folder without weights, a timm name the recipe does not match) is an error
naming the file and the tensor or key. Then runs: every method starts from the file (the networks
it copies from the backbone too), a CLI run killed and resumed after an init is bitwise equal to an
uninterrupted one and its export records the source, and a 2-process run starts from it.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from reference_archs import timm_vit_keys, torchvision_resnet_keys
from resume_check import cli_kill_then_resume, same_final_models
from safetensors.torch import save_file
from test_export import make_run
from test_train import pretrain

from selfsup.config import ConfigError, load_config
from selfsup.data_info import DataInfo
from selfsup.pretrain.build import build_method
from selfsup.pretrain.methods import METHODS
from selfsup.pretrain.models.backbones import ModelConfig, build_backbone
from selfsup.pretrain.models.weights import (
    WeightsError,
    adapt_input_conv,
    load_into,
    read_source,
)
from selfsup.pretrain.run.export import export_run
from selfsup.pretrain.run.rundir import latest_checkpoint, load_checkpoint


def random_state(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, torch.Tensor]:
    """Tensors of the given shapes, as a trained file holds them (BN counters as int64)."""
    g = torch.Generator().manual_seed(seed)
    return {k: torch.tensor(7) if k.endswith("num_batches_tracked") else torch.randn(s, generator=g) * 0.05
            for k, s in shapes.items()}  # fmt: skip


def _load(cfg: ModelConfig, channels: int, size: int):
    torch.manual_seed(0)
    net = build_backbone(cfg, channels, size)
    return net, load_into(net, cfg)


def _same(net: torch.nn.Module, state: dict[str, torch.Tensor], keys) -> None:
    got = net.state_dict()
    for k in keys:
        assert torch.equal(got[k], state[k].to(got[k].dtype)), k


RESNET18 = torchvision_resnet_keys((2, 2, 2, 2), False, 3, "imagenet")


def test_torchvision_file_loads_with_exactly_the_expected_report(tmp_path: Path) -> None:
    state = random_state(RESNET18)
    torch.save(state, tmp_path / "resnet18.pth")
    net, report = _load(ModelConfig("resnet18", "imagenet", init=str(tmp_path / "resnet18.pth")), 3, 32)
    trunk = [k for k in RESNET18 if not k.startswith("fc.")]
    assert report.kind == "torch state dict" and sorted(report.loaded) == sorted(trunk)
    assert report.dropped == ["fc.bias", "fc.weight"]
    assert report.missing == report.unexpected == report.shape == report.adapted == []
    _same(net, state, trunk)
    # an old torchvision file without BN counters: reported missing, not an error; and the nested
    # {"state_dict": {"module.<name>": ...}} layout of a DDP training checkpoint is opened
    old = {f"module.{k}": v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    torch.save({"state_dict": old, "epoch": 90}, tmp_path / "old.pth.tar.pt")
    _, report = _load(ModelConfig("resnet18", "imagenet", init=str(tmp_path / "old.pth.tar.pt")), 3, 32)
    assert report.missing == [k for k in trunk if k.endswith("num_batches_tracked")] and report.unexpected == []


def test_timm_vit_file_loads_with_its_grid_resampled_as_pil_does(tmp_path: Path) -> None:
    shapes = timm_vit_keys(192, 12, 3, 224, 16)
    state = random_state(shapes, seed=1)
    save_file(state, str(tmp_path / "vit.safetensors"))
    cfg = ModelConfig("vit_tiny", patch_size=16, init=f"timm:vit_tiny_patch16_224.augreg_in21k:{tmp_path / 'vit.safetensors'}")
    net, report = _load(cfg, 3, 64)
    assert report.kind == "timm vit_tiny_patch16_224.augreg_in21k, safetensors"
    assert report.dropped == ["head.bias", "head.weight"] and report.missing == report.unexpected == []
    assert report.adapted == ["pos_embed: (1, 197, 192) -> (1, 17, 192) (bicubic resample of the patch grid, "
                              "timm's resample_abs_pos_embed)"]  # fmt: skip
    _same(net, state, [k for k in shapes if not k.startswith(("head.", "pos_embed"))])
    pos = net.state_dict()["pos_embed"]
    assert torch.equal(pos[0, 0], state["pos_embed"][0, 0])  # the class token's entry is kept
    grid = state["pos_embed"][0, 1:].reshape(14, 14, 192).numpy()
    for d in (0, 77, 191):  # independent: PIL's antialiased bicubic on one channel
        want = np.asarray(Image.fromarray(grid[:, :, d], mode="F").resize((4, 4), Image.Resampling.BICUBIC))
        np.testing.assert_allclose(pos[0, 1:, d].reshape(4, 4).numpy(), want, atol=2e-4)


@pytest.mark.parametrize("channels", [1, 6])
def test_rgb_stem_adapts_to_other_channel_counts_by_linearity(tmp_path: Path, channels: int) -> None:
    state = random_state(RESNET18, seed=2)
    torch.save(state, tmp_path / "rgb.pt")
    net, report = _load(ModelConfig("resnet18", "imagenet", init=str(tmp_path / "rgb.pt")), channels, 32)
    assert report.adapted == [f"conv1.weight: 3 -> {channels} input channels (timm's adapt_input_conv)"]
    x = torch.randn(2, 1 if channels == 1 else 3, 16, 16)
    rgb = x.expand(-1, 3, -1, -1) if channels == 1 else x
    wide = x if channels == 1 else torch.cat([x, x], 1)  # 6 channels: the image twice
    # 1 channel: the grey image through the summed filters = its 3-channel copy through the RGB filters;
    # 6 channels: the image twice through filters repeated and scaled by 3/6 = the image once
    want = F.conv2d(rgb, state["conv1.weight"], stride=2, padding=3)
    np.testing.assert_allclose(net.conv1(wide).detach().numpy(), want.numpy(), rtol=1e-5, atol=1e-6)
    with pytest.raises(WeightsError, match="only 3"):
        adapt_input_conv(4, torch.zeros(8, 2, 3, 3))


def test_a_wrong_shape_names_the_tensor_and_init_strict_false_keeps_it_random(tmp_path: Path) -> None:
    state = random_state(RESNET18, seed=3)
    state["layer1.0.conv1.weight"] = torch.zeros(64, 64, 5, 5)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(WeightsError, match=r"model.init: .*bad.pt.*layer1.0.conv1.weight: file \(64, 64, 5, 5\) "
                                           r"vs model \(64, 64, 3, 3\).*model.init_strict=false"):
        _load(ModelConfig("resnet18", "imagenet", init=str(tmp_path / "bad.pt")), 3, 32)
    net, report = _load(ModelConfig("resnet18", "imagenet", init=str(tmp_path / "bad.pt"), init_strict=False), 3, 32)
    assert report.shape == ["layer1.0.conv1.weight: file (64, 64, 5, 5) vs model (64, 64, 3, 3)"]
    torch.manual_seed(0)
    fresh = build_backbone(ModelConfig("resnet18", "imagenet"), 3, 32)
    assert torch.equal(net.layer1[0].conv1.weight, fresh.layer1[0].conv1.weight)  # random init kept
    _same(net, state, ["layer1.0.conv2.weight", "conv1.weight"])


class Payload:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


MARKER = Path("/tmp/selfsup-test-init-payload-ran")


def test_a_pickle_payload_is_refused_and_never_runs(tmp_path: Path) -> None:
    MARKER.unlink(missing_ok=True)
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"conv1.weight": Payload()}, f, protocol=2)
    with pytest.raises(WeightsError, match=r"evil.pt cannot be loaded with torch.load\(weights_only=True\).*refused"):
        read_source(str(tmp_path / "evil.pt"))
    assert not MARKER.exists()


def test_bad_input_is_named(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "broken.safetensors").write_bytes(b"\x00" * 20)
    torch.save({"epoch": 3}, tmp_path / "nostate.pt")
    cases = {
        str(tmp_path / "missing.pt"): "missing.pt does not exist",
        str(tmp_path / "empty"): "empty holds no backbone.safetensors",
        str(tmp_path / "notes.txt"): "not a weights file",
        str(tmp_path / "broken.safetensors"): "not a readable safetensors file",
        str(tmp_path / "nostate.pt"): "holds no state dict",
    }
    for spec, message in cases.items():
        with pytest.raises(WeightsError, match=f"model.init: .*{message}"):
            read_source(spec)
    torch.save(random_state(RESNET18), tmp_path / "r.pt")
    with pytest.raises(WeightsError, match="timm model resnet50 is a resnet50, but model.backbone=resnet18"):
        _load(ModelConfig("resnet18", "imagenet", init=f"timm:resnet50:{tmp_path / 'r.pt'}"), 3, 32)
    with pytest.raises(WeightsError, match="set model.stem=imagenet"):
        _load(ModelConfig("resnet18", "cifar", init=f"timm:resnet18:{tmp_path / 'r.pt'}"), 3, 32)
    with pytest.raises(ConfigError, match="model.init.*timm:<name>:<path>"):
        load_config(None, ["model.init=timm:resnet18"])
    # through build_method (as pretrain calls it): a ConfigError naming the key, before any step
    with pytest.raises(ConfigError, match="model.init: .*missing.pt does not exist"):
        build_method(load_config(None, [f"model.init={tmp_path / 'missing.pt'}"]), INFO, init=True)


INFO = DataInfo(1, 28, (0.5,), (0.25,))
SMALL = ["model.backbone=resnet_small", "model.stem=cifar_s2", "model.width=0.25"]


@pytest.fixture(scope="module")
def export_folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    root = tmp_path_factory.mktemp("init_export")
    _, backbone = make_run(root / "run", SMALL, INFO)
    export_run(root / "run", root / "export")
    return root / "export", backbone.state_dict()


def test_an_export_of_this_project_loads_every_tensor(export_folder) -> None:
    folder, state = export_folder
    cfg = ModelConfig("resnet_small", "cifar_s2", 0.25, init=str(folder))
    net, report = _load(cfg, 1, 28)
    assert report.kind == "selfsup export" and sorted(report.loaded) == sorted(state)
    assert report.dropped == report.missing == report.unexpected == report.shape == report.adapted == []
    assert report.notes == ["the export's input: 1 channel(s) at 28 px, mean [0.5], std [0.25]"]
    _same(net, state, state)


COPIES = {"byol": ["target_backbone"], "mocov3": ["momentum_backbone"], "dino": ["teacher_backbone"]}


def test_every_method_starts_from_the_file_including_the_networks_it_copies(export_folder, tmp_path: Path) -> None:
    vit_state = random_state({k: v for k, v in timm_vit_keys(128, 4, 1, 28, 4).items() if k != "pos_embed"})
    save_file(vit_state, str(tmp_path / "vit.safetensors"))  # without pos_embed: ours is a fixed table
    for name, entry in sorted(METHODS.items()):
        if entry.cls.needs:  # distill needs a teacher of its own (tests/test_distill.py)
            continue
        vit = entry.backbone == "vit"
        folder, state = (tmp_path / "vit.safetensors", vit_state) if vit else export_folder
        arch = ["model.backbone=vit_micro", "model.patch_size=4", "model.init_strict=false"] if vit else SMALL
        cfg = load_config(None, [f"method.name={name}", *arch, f"model.init={folder}"])
        method = build_method(cfg, INFO, init=True)
        got = method.state_dict()
        trunk = [k for k in state if not k.startswith("head.")]
        copies = sorted(p for p in {k.split(".", 1)[0] for k in got} if all(f"{p}.{k}" in got for k in trunk))
        assert {"backbone", *COPIES.get(name, ())} <= set(copies), (name, copies)
        for net in copies:  # backbone, and BYOL's target / DINO's teacher / MoCo's momentum copies
            for k in trunk:
                assert torch.equal(got[f"{net}.{k}"], state[k]), f"{name}: {net}.{k}"
        report = method.init_report
        assert report is not None and len(report.loaded) == len(state) - 2 * vit
        assert report.missing == (["pos_embed"] if vit else [])
        assert build_method(cfg, INFO).init_report is None  # init=False (eval, resume): not loaded


RUN = [*SMALL, "method.name=byol", "method.byol.tau_base=0.9", "data.batch_size=32", "data.workers=1",
       "optim.name=sgd", "optim.base_lr=0.2", "log.progress=false", "log.wandb=off", "train.log_every=1",
       "train.max_steps=10", "train.checkpoint_every=3"]  # fmt: skip


@pytest.mark.slow  # three short CLI runs and a 2-process one (~45 s on 2 shared cores)
def test_runs_from_an_rgb_torchvision_file_resume_bitwise_and_record_the_source(
        tmp_path: Path, small_shards: str) -> None:  # fmt: skip
    torch.manual_seed(5)
    rgb = build_backbone(ModelConfig("resnet_small", "cifar_s2", 0.25), 3, 28).state_dict()
    file = tmp_path / "rgb.pth"
    torch.save({**rgb, "fc.weight": torch.zeros(10, 128), "fc.bias": torch.zeros(10)}, file)
    ref, run, _, _ = cli_kill_then_resume(tmp_path, small_shards, [*RUN, f"model.init={file}"], 3, 7)
    same_final_models(ref, run)
    report = json.loads((ref / "init.json").read_text())
    assert report["adapted"] == ["conv1.weight: 3 -> 1 input channels (timm's adapt_input_conv)"]
    assert report["dropped"] == ["fc.bias", "fc.weight"] and report["missing"] == report["shape"] == []
    ckpt = load_checkpoint(latest_checkpoint(run / "checkpoints"))
    sha = __import__("hashlib").sha256(file.read_bytes()).hexdigest()
    assert ckpt["init"] == {"path": str(file), "sha256": sha, "kind": "torch state dict"}  # kept by the resume
    paths = export_run(run, tmp_path / "export")
    assert json.loads(paths["config"].read_text())["init"]["sha256"] == sha
    assert "init" not in json.loads(paths["config"].read_text())["model"]
    assert f"`{file}` (torch state dict, sha256 `{sha}`)" in paths["card"].read_text()
    # 2 processes: both ranks start from the file (a missing one on any rank would fail the run)
    r = pretrain(tmp_path / "two", small_shards, *RUN, "train.max_steps=2", f"model.init={file}", nproc=2)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "model.init: " in r.stdout and "conv1.weight: 3 -> 1" in r.stdout
