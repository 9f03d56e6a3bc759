"""Optimisers: LARS exclusion and update rule, linear lr scaling, warmup + cosine schedule."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from selfsup.pretrain.loop.optim import LARS, OptimConfig, build_optimizer, build_scheduler


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))


def _backward(net: nn.Module) -> None:
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(1))
    net(x).pow(2).sum().backward()


def test_lars_adapts_and_decays_weights_only() -> None:
    net = _net()
    cfg = OptimConfig(name="lars", base_lr=0.5, weight_decay=0.1, momentum=0.9, lars_eta=0.02)
    opt = build_optimizer(cfg, net, global_batch=256)
    assert isinstance(opt, LARS)
    _backward(net)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    grads = {n: p.grad.clone() for n, p in net.named_parameters()}
    opt.step()
    for name, p in net.named_parameters():
        w, g = before[name], grads[name]
        if p.ndim == 1:  # biases and BN: plain SGD step, no decay, no trust ratio
            expected = w - 0.5 * g
        else:
            d = g + 0.1 * w
            expected = w - 0.5 * (0.02 * w.norm() / d.norm()) * d
        torch.testing.assert_close(p.detach(), expected, rtol=1e-6, atol=1e-7, msg=name)


def test_lars_momentum_accumulates_scaled_updates() -> None:
    p = nn.Parameter(torch.tensor([3.0, 4.0]))
    opt = LARS([p], lr=1.0, weight_decay=0.0, momentum=0.5, eta=0.1)
    p.grad = torch.tensor([0.0, 1.0])
    opt.step()  # trust = 0.1 * 5 / 1 -> update 0.5 * g
    torch.testing.assert_close(p.detach(), torch.tensor([3.0, 3.5]))
    p.grad = torch.tensor([0.0, 1.0])
    opt.step()  # trust = 0.1 * ||(3, 3.5)||; buf = 0.5 * 0.5 g + trust g
    trust = 0.1 * math.hypot(3.0, 3.5)
    torch.testing.assert_close(p.detach(), torch.tensor([3.0, 3.5 - 0.25 - trust]))


@pytest.mark.parametrize("name", ["lars", "adamw", "sgd"])
def test_lr_scales_with_global_batch_and_groups_exclude_norms(name: str) -> None:
    net = _net()
    cfg = OptimConfig(name=name, base_lr=0.3, weight_decay=0.05)
    opt = build_optimizer(cfg, net, global_batch=1024)
    assert all(g["lr"] == pytest.approx(1.2) for g in opt.param_groups)
    by_id = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    for pname, p in net.named_parameters():
        assert by_id[id(p)] == (0.0 if p.ndim == 1 else 0.05), pname
    assert len(by_id) == len(list(net.parameters()))


def test_no_weight_decay_hook_is_honoured() -> None:
    class WithToken(nn.Module):
        def __init__(self):
            super().__init__()
            self.cls_token = nn.Parameter(torch.zeros(1, 1, 4))
            self.proj = nn.Linear(4, 4)

        def no_weight_decay(self) -> set[str]:
            return {"cls_token"}

    net = WithToken()
    opt = build_optimizer(OptimConfig(name="adamw", weight_decay=0.05), net, 256, net.no_weight_decay())
    decayed = [p for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]]
    assert len(decayed) == 1 and decayed[0].shape == (4, 4)


def test_unknown_optimizer_is_named() -> None:
    with pytest.raises(ValueError, match="rmsprop"):
        build_optimizer(OptimConfig(name="rmsprop"), _net(), 256)


def _lrs(total: int, warmup: float, min_ratio: float = 0.0) -> list[float]:
    net = _net()
    cfg = OptimConfig(name="sgd", base_lr=0.256, warmup=warmup, min_lr_ratio=min_ratio)
    opt = build_optimizer(cfg, net, 256)  # peak lr 0.256
    sched = build_scheduler(opt, cfg, total)
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_schedule_warms_up_linearly_then_follows_a_cosine() -> None:
    lrs = _lrs(total=100, warmup=0.1)
    peak = 0.256
    assert lrs[:10] == pytest.approx([peak * (t + 1) / 10 for t in range(10)])
    cosine = [peak * 0.5 * (1 + math.cos(math.pi * (t - 10) / 90)) for t in range(10, 100)]
    assert lrs[10:] == pytest.approx(cosine)
    assert max(lrs) == pytest.approx(peak) and lrs[-1] < 0.001 * peak


def test_schedule_floor_and_no_warmup() -> None:
    lrs = _lrs(total=50, warmup=0.0, min_ratio=0.1)
    assert lrs[0] == pytest.approx(0.256)
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))
    assert lrs[-1] > 0.1 * 0.256
    assert lrs[25] == pytest.approx(0.256 * (0.1 + 0.9 * 0.5))


def test_scheduler_state_round_trips_with_weights_only() -> None:
    cfg = OptimConfig(name="lars", warmup=0.2)
    net = _net()
    opt = build_optimizer(cfg, net, 256)
    sched = build_scheduler(opt, cfg, 40)
    for _ in range(13):
        opt.step()
        sched.step()
    buf = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "sched": sched.state_dict()}, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    opt2 = build_optimizer(cfg, _net(), 256)
    sched2 = build_scheduler(opt2, cfg, 40)
    opt2.load_state_dict(state["opt"])
    sched2.load_state_dict(state["sched"])
    for _ in range(5):
        opt.step(), sched.step(), opt2.step(), sched2.step()
        assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


class _WithPredictor(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.encoder = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6))
        self.predictor = nn.Sequential(nn.Linear(6, 6), nn.BatchNorm1d(6))
        self.frozen = nn.Linear(6, 6).requires_grad_(False)

    def forward(self, x):
        return self.frozen(self.predictor(self.encoder(x)))


@pytest.mark.parametrize("name", ["lars", "sgd"])
def test_fixed_lr_group_keeps_its_rate_while_the_rest_follow_the_schedule(name: str) -> None:
    net = _WithPredictor()
    cfg = OptimConfig(name=name, base_lr=0.256, weight_decay=0.1, warmup=0.1)
    opt = build_optimizer(cfg, net, 256, group_options={"predictor.": {"fixed_lr": True}})
    groups = {(g.get("fixed_lr", False), g["decay"]): g for g in opt.param_groups}
    assert set(groups) == {(False, True), (False, False), (True, True), (True, False)}
    assert not opt.param_groups[0].get("fixed_lr")  # the logged lr is a scheduled group's
    pred = {id(p) for p in net.predictor.parameters()}
    assert {id(p) for k, g in groups.items() if k[0] for p in g["params"]} == pred
    everything = {id(p) for g in opt.param_groups for p in g["params"]}
    assert everything == {id(p) for p in net.parameters() if p.requires_grad}  # frozen left out
    assert groups[(True, True)]["weight_decay"] == 0.1 and groups[(True, False)]["weight_decay"] == 0.0
    if name == "lars":
        assert [g["lars_exclude"] for g in opt.param_groups] == [not g["decay"] for g in opt.param_groups]
    sched = build_scheduler(opt, cfg, 50)
    fixed, scheduled = [], []
    for _ in range(50):
        fixed.append(groups[(True, True)]["lr"])
        scheduled.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert fixed == [0.256] * 50
    assert scheduled[0] == pytest.approx(0.256 / 5) and max(scheduled) == pytest.approx(0.256)
    assert scheduled[-1] < 0.01 * 0.256
    # the per-group schedule round-trips through a weights_only checkpoint
    buf = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "sched": sched.state_dict()}, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    net2 = _WithPredictor()
    opt2 = build_optimizer(cfg, net2, 256, group_options={"predictor.": {"fixed_lr": True}})
    sched2 = build_scheduler(opt2, cfg, 50)
    opt2.load_state_dict(state["opt"])
    sched2.load_state_dict(state["sched"])
    assert [g["lr"] for g in opt2.param_groups] == [g["lr"] for g in opt.param_groups]


def test_group_options_errors_name_the_prefix() -> None:
    net = _WithPredictor()
    with pytest.raises(ValueError, match=r"'predictor\.' sets unknown option\(s\) \['lr_scale'\]"):
        build_optimizer(OptimConfig(), net, 256, group_options={"predictor.": {"lr_scale": 2}})
    with pytest.raises(ValueError, match=r"no trainable parameter starts with \['head\.'\]"):
        build_optimizer(OptimConfig(), net, 256, group_options={"head.": {"fixed_lr": True}})
