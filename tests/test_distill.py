"""Distillation: the loss against a written-out formula (and against the teacher as
``selfsup.load_backbone`` gives it), a teacher that gets no gradient, never enters the optimiser or
the state dict and stays bitwise unchanged after steps (planted: a teacher left in train mode, a
teacher that gets gradient), 2 processes against 1 on the same global batch (the loss has no
cross-rank statistic: the check is that nothing rank-dependent leaks in; planted: a teacher in
train mode, whose BN then normalises each process's half on its own), bad input named before any
step, and (slow) a run resumed from a checkpoint through the CLI that ends bitwise equal to an
uninterrupted one, with the teacher outside every checkpoint and the student exported.

The 2-process checks run this file as a script under ``torchrun --standalone`` (gloo, CPU), as
tests/test_mocov3.py does.
"""

from __future__ import annotations

import copy
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from methodkit import gray
from resume_check import cli_pretrain, same_final_models
from safetensors.torch import save_file
from test_siamese_bn import _grads, _mean_over_processes
from test_simclr import _max_rel_err, all_reduce_mean
from torchrun import save_and_leave
from torchrun import two_process_results as run_two_processes

from selfsup.config import ConfigError, load_config
from selfsup.pretrain.build import build_method
from selfsup.pretrain.loop.optim import build_optimizer
from selfsup.pretrain.methods.distill import Distill, distill_loss, map_loss
from selfsup.pretrain.models.backbones import ModelConfig, build_backbone
from selfsup.pretrain.run.export import export_run, load_backbone
from selfsup.pretrain.run.rundir import LATEST, list_checkpoints, load_checkpoint

SIDE, GLOBAL_N = 12, 8
INFO = gray(SIDE)
STUDENT = ["model.backbone=resnet_small", "model.width=0.25", "model.stem=cifar_s2"]
VIT = ["model.backbone=vit_micro", "model.patch_size=4"]


def write_export(folder: Path, *, width: float = 0.5, channels: int = 1, size: int = SIDE,
                 mean: float = 0.5, seed: int = 0) -> Path:
    """A teacher export folder in the format ``selfsup export`` writes (format 2), from a
    backbone whose BN running statistics are not the defaults (so train mode would move them)."""
    torch.manual_seed(seed)
    model = ModelConfig(backbone="resnet_small", stem="cifar_s2", width=width)
    net = build_backbone(model, channels, size)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(folder / "backbone.safetensors"))
    meta = {"format": "selfsup-backbone", "format_version": 2, "model": vars(model), "channels": channels,
            "image_size": size, "mean": [mean] * channels, "std": [0.25] * channels,
            "feature_dim": net.feature_dim, "method": "simclr"}  # fmt: skip
    (folder / "config.json").write_text(json.dumps(meta))
    return folder


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_export(tmp_path_factory.mktemp("teacher") / "export")


def _model(teacher: Path, *extra: str, backbone: list[str] = STUDENT) -> Distill:
    torch.manual_seed(0)
    cfg = load_config(None, ["method.name=distill", f"method.distill.teacher={teacher}", *backbone, *extra])
    model = build_method(cfg, INFO)
    assert isinstance(model, Distill)
    return model


def test_loss_equals_the_written_out_formula() -> None:
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 7, generator=g, dtype=torch.float64), torch.randn(5, 7, generator=g, dtype=torch.float64)
    a, b = s.numpy(), t.numpy()
    cos = sum(1 - a[i] @ b[i] / (np.linalg.norm(a[i]) * np.linalg.norm(b[i])) for i in range(5)) / 5
    assert distill_loss(s, t, "cosine").item() == pytest.approx(cos, rel=1e-12)
    assert distill_loss(s, t, "mse").item() == pytest.approx(((a - b) ** 2).sum() / 35, rel=1e-12)
    # the map term: a 4x4 student map shrunk to the teacher's 2x2 grid by block means
    sm, tm = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64), torch.randn(2, 3, 2, 2, generator=g, dtype=torch.float64)
    blocks = sm.numpy().reshape(2, 3, 2, 2, 2, 2).mean(axis=(3, 5))  # [B, C, 2, 2]
    want = np.mean([1 - blocks[i, :, y, x] @ tm.numpy()[i, :, y, x]
                    / (np.linalg.norm(blocks[i, :, y, x]) * np.linalg.norm(tm.numpy()[i, :, y, x]))
                    for i in range(2) for y in range(2) for x in range(2)])  # fmt: skip
    assert map_loss(sm, tm, 2, "cosine").item() == pytest.approx(want, rel=1e-12)
    assert map_loss(sm, tm, 2, "mse").item() == pytest.approx(((blocks - tm.numpy()) ** 2).mean(), rel=1e-12)


@pytest.mark.parametrize("loss", ["cosine", "mse"])
def test_method_loss_is_the_formula_on_the_teacher_load_backbone_gives(teacher: Path, loss: str) -> None:
    model = _model(teacher, f"method.distill.loss={loss}").double().train()
    v = torch.randn(6, 1, SIDE, SIDE, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    student, head = copy.deepcopy(model.backbone), copy.deepcopy(model.head)  # before BN moves
    got, logs = model.loss_from_view(v)
    ref_teacher = load_backbone(teacher).double()  # the export loader, independently of the method
    with torch.no_grad():
        t, s = ref_teacher(v).numpy(), head(student(v)).numpy()  # the student in train mode (batch BN)
    if loss == "cosine":
        want = np.mean([1 - s[i] @ t[i] / (np.linalg.norm(s[i]) * np.linalg.norm(t[i])) for i in range(6)])
    else:
        want = ((s - t) ** 2).mean()
    assert isinstance(model.head, torch.nn.Linear) and s.shape[1] == t.shape[1] == 128 != model.backbone.feature_dim
    assert got.item() == pytest.approx(want, rel=1e-12) and logs["loss"].item() == got.item()


def teacher_leaks(model: Distill, before: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer) -> list[str]:
    """What is wrong with the teacher after training steps: changed tensors, gradients, its
    parameters in the optimiser or the state dict, train mode. Empty when it is truly frozen."""
    out = [f"changed: {k}" for k, v in model.teacher.state_dict().items() if not torch.equal(v, before[k])]
    out += [f"grad: {n}" for n, p in model.teacher.named_parameters() if p.grad is not None]
    ids = {id(p) for p in model.teacher.parameters()}
    out += ["in the optimiser" for g in optimizer.param_groups for p in g["params"] if id(p) in ids][:1]
    out += [f"in the state dict: {k}" for k in model.state_dict() if k.startswith("teacher.")][:1]
    tree = {id(t) for t in (*model.parameters(), *model.buffers())}  # what DDP syncs and broadcasts
    out += ["in the module tree" for t in (*model.teacher.parameters(), *model.teacher.buffers()) if id(t) in tree][:1]
    return out + (["train mode"] if model.teacher.training else [])


class GradientTeacher(Distill):
    """Planted: the target keeps its graph, so the teacher gets gradient (and trains)."""

    def loss_from_view(self, v):
        self.teacher.requires_grad_(True)
        t = self.teacher(v)
        s = self.head(self.backbone(v))
        return (1 - torch.nn.functional.cosine_similarity(s, t, dim=-1)).mean(), {}


def _steps(model: Distill, n: int = 3) -> list[str]:
    before = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    cfg = load_config(None, ["optim.name=sgd", "optim.base_lr=0.5", "optim.weight_decay=0.01"])
    opt = build_optimizer(cfg.optim, model, 16, model.no_weight_decay(), model.param_groups_options())
    images = torch.randint(0, 256, (16, 1, SIDE, SIDE), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    student0 = model.backbone.conv1.weight.detach().clone()
    for _ in range(n):
        opt.zero_grad()
        loss, _ = model(images)
        loss.backward()
        opt.step()
    assert not torch.equal(model.backbone.conv1.weight, student0)  # the student did learn
    return teacher_leaks(model, before, opt)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_teacher_gets_no_gradient_and_stays_bitwise_unchanged(teacher: Path, precision: str) -> None:
    model = _model(teacher, "method.distill.map_weight=0.5", f"method.distill.teacher_precision={precision}").train()
    assert _steps(model) == []
    assert not any(k.startswith("teacher") and k != "teacher_sha256" for k in model.state_dict())


def test_planted_train_mode_gradient_and_registered_teachers_are_caught(teacher: Path) -> None:
    model = _model(teacher).train()
    model.teacher.train()  # planted: BN of the teacher in train mode moves its running statistics
    leaks = _steps(model)
    assert any("running_mean" in x for x in leaks) and "train mode" in leaks
    torch.manual_seed(0)
    cfg = load_config(None, ["method.name=distill", f"method.distill.teacher={teacher}", *STUDENT])
    planted = GradientTeacher(cfg.method.distill, build_backbone(cfg.model, 1, SIDE),
                              _model(teacher).views, INFO).train()  # fmt: skip
    assert any(x.startswith("grad: ") for x in _steps(planted))
    registered = _model(teacher).train()
    registered.add_module("teacher_net", registered.teacher)  # planted: a submodule DDP would sync
    assert "in the module tree" in _steps(registered)


def test_bad_teacher_input_is_named_before_any_step(teacher: Path, tmp_path: Path) -> None:
    key = "method.distill.teacher"
    run_like = tmp_path / "run"
    run_like.mkdir()
    (run_like / "config.yaml").write_text("{}\n")
    cases = {"": "no teacher given", str(tmp_path / "missing"): "is not a folder",
             str(run_like): "export it first with selfsup export",
             str(write_export(tmp_path / "rgb", channels=3)): "takes 3-channel images, the data (data.train) has 1",
             str(write_export(tmp_path / "big", size=16)): "takes 16 px images, the views are 12 px"}  # fmt: skip
    for path, message in cases.items():
        with pytest.raises(ConfigError, match=key) as e:
            _model(Path(path) if path else "")
        assert message in str(e.value), str(e.value)
    with pytest.raises(ConfigError, match="method.distill.head=none needs equal widths"):
        _model(teacher, "method.distill.head=none")
    with pytest.raises(ConfigError, match="method.distill.loss: 'l1' is not one of cosine, mse"):
        load_config(None, ["method.distill.loss=l1"])
    other = _model(write_export(tmp_path / "other", seed=1))
    with pytest.raises(ValueError, match="trained with a teacher of sha256"):
        other.load_state_dict(_model(teacher).state_dict())


def test_other_normalisation_and_vit_student_with_patch_tokens(teacher: Path, tmp_path: Path) -> None:
    """A teacher trained with another mean sees the view re-normalised with its own; a ViT
    student's patch-token grid (3x3) is shrunk to the teacher's map grid (1x1 at 12 px)."""
    shifted = write_export(tmp_path / "shifted", mean=0.3)
    model = _model(shifted).double()
    v = torch.randn(4, 1, SIDE, SIDE, dtype=torch.float64)
    got, _ = model.teacher_features(v)
    want = load_backbone(shifted).double()(((v * 0.25 + 0.5).clamp(0, 1) - 0.3) / 0.25)
    assert torch.allclose(got, want, rtol=0, atol=1e-12)
    vit = _model(teacher, "method.distill.map_weight=1.0", "method.distill.map_loss=cosine", backbone=VIT)
    loss, logs = vit(torch.randint(0, 256, (4, 1, SIDE, SIDE), dtype=torch.uint8))
    assert vit.grid == 1 and torch.isfinite(loss) and logs["loss_map"].item() > 0


# ---------------------------------------------------------------- 2 processes vs 1
CASES = {"resnet": (STUDENT, False), "vit_map": (VIT, False), "resnet_planted_train_mode_teacher": (STUDENT, True)}


def _run(teacher: Path, backbone: list[str], planted: bool, rows: slice) -> dict:
    model = _model(teacher, "method.distill.map_weight=0.5", "method.distill.head=linear", backbone=backbone).double().train()
    if "model.backbone=resnet_small" in backbone:
        model.backbone.eval()  # its BN is per process in every method (sync_bn is another test's)
    if planted:
        model.teacher.train()
    v = torch.randn(GLOBAL_N, 1, SIDE, SIDE, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    loss, _ = model.loss_from_view(v[rows])
    loss.backward()
    return {"loss": all_reduce_mean(loss), "grads": {k: _mean_over_processes(g) for k, g in _grads(model).items()}}


def _worker(teacher: str, out_path: str) -> None:
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    rank, n = accelerator.process_index, GLOBAL_N // accelerator.num_processes
    results = {name: _run(Path(teacher), *case, slice(rank * n, (rank + 1) * n)) for name, case in CASES.items()}
    save_and_leave(results, out_path)


@pytest.fixture(scope="module")
def two_process_results(teacher: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("ddp_distill") / "results.pt"
    out.with_name("teacher.txt").write_text(str(teacher))  # the workers read the teacher's folder here
    return run_two_processes(__file__, out)


@pytest.mark.slow  # torchrun start-up: ~15-25 s on 2 shared cores, paid once per module
@pytest.mark.parametrize("case", ["resnet", "vit_map"])
def test_two_processes_equal_one_process(teacher: Path, two_process_results: dict, case: str) -> None:
    ref, got = _run(teacher, *CASES[case], slice(None)), two_process_results[case]
    assert abs(got["loss"].item() - ref["loss"].item()) <= 1e-12 * abs(ref["loss"].item())
    assert _max_rel_err(got["grads"], ref["grads"]) <= 1e-10
    assert {"head.weight", "map_head.weight"} <= set(ref["grads"]) and any(k.startswith("backbone.") for k in ref["grads"])
    assert not any(k.startswith("teacher.") for k in ref["grads"])


@pytest.mark.slow
def test_planted_train_mode_teacher_fails_the_same_check(teacher: Path, two_process_results: dict) -> None:
    """In train mode the teacher's BN normalises each process's half with its own statistics."""
    case = "resnet_planted_train_mode_teacher"
    ref, got = _run(teacher, *CASES[case], slice(None)), two_process_results[case]
    assert abs(got["loss"].item() - ref["loss"].item()) > 1e-3 * abs(ref["loss"].item())
    assert _max_rel_err(got["grads"], ref["grads"]) > 1e-2


# ---------------------------------------------------------------- through the loop
RUN = ["method.name=distill", *STUDENT, "data.batch_size=32", "data.workers=1", "optim.name=sgd",
       "log.progress=false", "log.wandb=off", "train.log_every=1", "train.max_steps=6",
       "train.checkpoint_every=3", "train.keep_checkpoints=0", "method.distill.map_weight=0.5"]  # fmt: skip


@pytest.mark.slow  # three short CLI runs
def test_bad_teacher_stops_the_cli_before_a_step_and_resume_is_bitwise_with_the_student_only(tmp_path: Path) -> None:
    from selfsup.pretrain.data.datasets import ArraySource, embedded
    from selfsup.pretrain.data.shards import ShardOptions, write_shards

    src = embedded("train")
    shards = tmp_path / "shards"
    sub = ArraySource("small", src.images[:256], src.labels[:256], src.classes)
    write_shards(iter(sub), shards, sub.classes, ShardOptions(samples_per_shard=128, progress=False))
    teacher28 = write_export(tmp_path / "teacher28", size=28, mean=0.286)
    bad = cli_pretrain(tmp_path / "bad", str(shards), [*RUN, f"method.distill.teacher={tmp_path / 'nowhere'}"])
    assert bad.returncode != 0 and "method.distill.teacher" in bad.stdout + bad.stderr, bad.stdout + bad.stderr
    assert not list((tmp_path / "bad").glob("checkpoints/*.pt")) and not (tmp_path / "bad" / "metrics.jsonl").exists()
    args = [*RUN, f"method.distill.teacher={teacher28}"]
    ref, run = tmp_path / "ref", tmp_path / "resumed"
    r = cli_pretrain(ref, str(shards), args)
    assert r.returncode == 0, r.stdout + r.stderr
    shutil.copytree(ref, run)
    step3, step6 = list_checkpoints(run / "checkpoints")
    step6.unlink()
    (run / "checkpoints" / LATEST).write_text(step3.name)
    r = cli_pretrain(run, str(shards), args, "--resume", "auto")
    assert r.returncode == 0 and "resumed from" in r.stdout, r.stdout + r.stderr
    a = same_final_models(ref, run)
    assert not any(k.startswith("teacher.") for k in a)
    sha = __import__("hashlib").sha256((teacher28 / "backbone.safetensors").read_bytes()).digest()
    assert bytes(a["teacher_sha256"].tolist()) == sha
    assert load_checkpoint(step3)["model"].keys() == a.keys()
    paths = export_run(ref, tmp_path / "export")
    student = load_backbone(tmp_path / "export")
    assert student.feature_dim == 64 and "the student backbone" in paths["card"].read_text()


if __name__ == "__main__":
    _worker(Path(sys.argv[1]).with_name("teacher.txt").read_text(), sys.argv[1])


def test_a_torchvision_named_rgb_file_is_a_teacher_with_its_architecture_from_the_config(tmp_path: Path) -> None:
    """A weights file (as model.init reads one) with method.distill.teacher_*: built for the data's
    1 channel (the RGB stem summed, timm's rule), frozen, the file's tensors in it; without
    teacher_backbone the file is refused naming the key."""
    torch.manual_seed(3)
    rgb = build_backbone(ModelConfig("resnet_small", "cifar_s2", 0.5), 3, SIDE).state_dict()
    file = tmp_path / "teacher.pth"
    torch.save({**rgb, "fc.weight": torch.zeros(10, 256), "fc.bias": torch.zeros(10)}, file)
    with pytest.raises(ConfigError, match="method.distill.teacher: .*teacher.pth is not a folder.*teacher_backbone"):
        _model(file)
    with pytest.raises(ConfigError, match="method.distill.teacher_backbone: unknown backbone 'resnet5'"):
        _model(file, "method.distill.teacher_backbone=resnet5")
    model = _model(file, "method.distill.teacher_backbone=resnet_small", "method.distill.teacher_stem=cifar_s2",
                   "method.distill.teacher_width=0.5")  # fmt: skip
    got = model.teacher.state_dict()
    assert torch.equal(got["conv1.weight"], rgb["conv1.weight"].sum(1, keepdim=True))
    assert all(torch.equal(got[k], v) for k, v in rgb.items() if k != "conv1.weight")
    assert not model.teacher.training and not any(p.requires_grad for p in model.teacher.parameters())
    assert model.teacher_info.mean == INFO.mean  # 1 channel: the data's normalisation by default
    assert _steps(model.train()) == []  # steps train the student; the teacher stays bitwise the file's
