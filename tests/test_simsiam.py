"""SimSiam: the stop-gradient (autograd), the heads' shape, the predictor's fixed learning rate
through the method hook, and (slow) the collapse monitor: the collapsing ablation
(tests/collapse_method.py) falls and warns, the real method does not, over a short real run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from methodkit import gray, gray_images, seeded_method
from torch import nn

from selfsup.config import load_config
from selfsup.pretrain.distributed import AllReduceBatchNorm1d
from selfsup.pretrain.loop.optim import build_optimizer, build_scheduler
from selfsup.pretrain.loop.runlog import CollapseWatch
from selfsup.pretrain.methods.siamese import collapse_std
from selfsup.pretrain.methods.simsiam import SimSiam, simsiam_loss

INFO = gray(12)
SMALL = ["method.name=simsiam", "model.backbone=resnet_small", "model.stem=cifar_s2", "model.width=0.25",
         "method.simsiam.proj_hidden=32", "method.simsiam.proj_out=16", "method.simsiam.pred_hidden=8"]  # fmt: skip


def _model(*extra: str) -> SimSiam:
    return seeded_method(SimSiam, [*SMALL, *extra], INFO)


def _images(n: int = 6) -> torch.Tensor:
    return gray_images(n, 12)


def test_no_gradient_flows_through_the_stop_gradient() -> None:
    g = torch.Generator().manual_seed(0)
    p1, p2, z1, z2 = (torch.randn(5, 7, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(4))
    loss = simsiam_loss(p1, p2, z1, z2)
    want = -0.5 * (torch.cosine_similarity(p1, z2).mean() + torch.cosine_similarity(p2, z1).mean())
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=0)
    grads = torch.autograd.grad(loss, (p1, p2, z1, z2), allow_unused=True)
    assert grads[0].abs().sum() > 0 and grads[1].abs().sum() > 0
    assert grads[2] is None and grads[3] is None  # sg(z): not in the graph at all
    # the collapsing ablation does send a gradient through z: the check above can fail
    loose = torch.autograd.grad(simsiam_loss(p1, p2, z1, z2, stop_gradient=False), (z1, z2))
    assert all(x.abs().sum() > 0 for x in loose)


def test_method_gradient_is_that_of_the_predictor_branch_only() -> None:
    """d loss / d z through the whole method equals the gradient through p = h(z) alone."""
    model = _model().double()
    v1, v2 = (torch.randn(6, 1, 12, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(s)) for s in (1, 2))
    z1, z2 = model.projector(model.backbone(v1)), model.projector(model.backbone(v2))
    zs = [z.detach().requires_grad_(True) for z in (z1, z2)]
    loss = simsiam_loss(model.predictor(zs[0]), model.predictor(zs[1]), zs[0], zs[1])
    full = torch.autograd.grad(loss, zs)
    branch = torch.autograd.grad(
        simsiam_loss(model.predictor(zs[0]), model.predictor(zs[1]), zs[0].detach(), zs[1].detach()), zs)
    for a, b in zip(full, branch, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_heads_follow_the_paper() -> None:
    model = _model()
    proj = list(model.projector)
    linears = [m for m in proj if isinstance(m, nn.Linear)]
    bns = [m for m in proj if isinstance(m, nn.BatchNorm1d)]
    assert len(linears) == 3 and len(bns) == 3 and isinstance(proj[-1], nn.BatchNorm1d)
    assert not proj[-1].affine and all(b.affine for b in bns[:-1])  # output BN: no scale/shift
    assert all(lin.bias is None for lin in linears)  # every Linear is followed by a BN
    pred = list(model.predictor)
    assert [type(m) for m in pred] == [nn.Linear, AllReduceBatchNorm1d, nn.ReLU, nn.Linear]
    assert pred[0].out_features == 8 and pred[-1].out_features == 16 and pred[-1].bias is not None
    assert len([m for m in _model("method.simsiam.proj_layers=2").projector if isinstance(m, nn.Linear)]) == 2
    plain = _model("method.simsiam.sync_head_bn=false")
    assert not any(isinstance(m, AllReduceBatchNorm1d) for m in plain.modules())


def test_forward_logs_and_trains_every_parameter() -> None:
    model = _model()
    loss, logs = model(_images())
    assert set(logs) == {"loss", "collapse_std"}
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in logs.values())
    assert -1.0 <= loss.item() <= 1.0 and 0.5 < float(logs["collapse_std"]) < 1.5
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize("fixed", [True, False])
def test_predictor_lr_is_fixed_through_the_method_hook(fixed: bool) -> None:
    model = _model(f"method.simsiam.fixed_predictor_lr={str(fixed).lower()}")
    cfg = load_config(None, [*SMALL, "optim.name=sgd", "optim.base_lr=0.05", "optim.warmup=0.1"]).optim
    opt = build_optimizer(cfg, model, 512, model.no_weight_decay(), model.param_groups_options())
    sched = build_scheduler(opt, cfg, 20)
    pred = {id(p) for p in model.predictor.parameters()}
    for _ in range(20):
        opt.step()
        sched.step()
    for g in opt.param_groups:
        ids = {id(p) for p in g["params"]}
        if fixed and ids <= pred:
            assert g["lr"] == pytest.approx(0.1)  # 0.05 x 512 / 256, untouched by the schedule
        else:
            assert not ids & pred if fixed else True
            assert g["lr"] < 0.01 * 0.1  # annealed
    assert any(g.get("fixed_lr") for g in opt.param_groups) == fixed


def test_collapse_std_and_its_watch() -> None:
    spread = torch.randn(512, 64, generator=torch.Generator().manual_seed(0))
    assert 0.95 < collapse_std(spread).item() < 1.05
    same = torch.randn(1, 64).expand(512, 64) + 1e-4 * spread
    assert collapse_std(same).item() < 0.01
    watch = CollapseWatch(threshold=0.1, patience=3)
    said = [watch.update(s, v) for s, v in enumerate([0.05, 0.05, 0.5, 0.05, 0.05, 0.05, 0.01, 0.01])]
    assert [i for i, m in enumerate(said) if m] == [5]  # 3 in a row, after the reset; only once
    assert "collapse_std = 0.05" in said[5] and "log.collapse_threshold=0.1" in said[5]
    assert CollapseWatch(0.0, 1).update(1, 0.0) is None  # threshold 0: off


COLLAPSE = str(Path(__file__).with_name("collapse_method.py"))
ENV = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}


@pytest.mark.slow  # two short CLI runs side by side (~25 s on 2 shared cores)
def test_collapse_monitor_falls_for_the_ablation_only(tmp_path: Path, small_shards: str) -> None:
    procs = {}
    for name in ("simsiam_collapse", "simsiam"):
        args = [f"method.name={name}", f"method.{name}.proj_hidden=64", f"method.{name}.proj_out=64",
                f"method.{name}.pred_hidden=16", "model.backbone=resnet_small", "model.stem=cifar_s2",
                "model.width=0.25", "data.batch_size=64", "data.workers=0", "optim.name=sgd",
                "optim.base_lr=0.5", "train.max_steps=45", "train.log_every=3",
                "train.checkpoint_every=0", "log.wandb=off", "log.progress=false",
                "log.collapse_threshold=0.2", "log.collapse_patience=3"]  # fmt: skip
        cmd = [sys.executable, COLLAPSE, "pretrain", f"data.train={small_shards}", f"run_dir={tmp_path / name}", *args]
        procs[name] = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = {name: p.communicate(timeout=600)[0] for name, p in procs.items()}
    assert all(p.returncode == 0 for p in procs.values()), out
    std = {name: [json.loads(r)["collapse_std"] for r in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
           for name in procs}  # fmt: skip
    assert std["simsiam_collapse"][0] > 0.4 and std["simsiam_collapse"][-1] < 0.15, std
    assert min(std["simsiam"]) > 0.9, std  # the stop-gradient and predictor keep it spread
    assert out["simsiam_collapse"].count("CollapseWarning") == 1
    assert "CollapseWarning" not in out["simsiam"]
