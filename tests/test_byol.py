"""BYOL: the EMA update and its cosine schedule against the paper's closed form, a target network
that no gradient reaches, the loss against its definition, and (slow) a run killed with SIGKILL
and resumed through the CLI that ends bitwise equal to an uninterrupted one, target included."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from methodkit import gray, gray_images, seeded_method
from resume_check import cli_kill_then_resume, jsonl_rows, same_final_models

from selfsup.config import load_config
from selfsup.pretrain.loop.optim import build_optimizer
from selfsup.pretrain.methods.byol import BYOL, byol_loss, ema_update, momentum_tau
from selfsup.pretrain.run.export import export_run, load_backbone

INFO = gray(12)
SMALL = ["method.name=byol", "model.backbone=resnet_small", "model.stem=cifar_s2", "model.width=0.25",
         "method.byol.proj_hidden=32", "method.byol.proj_out=16", "method.byol.pred_hidden=32"]  # fmt: skip


def _model(*extra: str) -> BYOL:
    return seeded_method(BYOL, [*SMALL, *extra], INFO)


def _images(n: int = 6) -> torch.Tensor:
    return gray_images(n, 12)


def test_tau_follows_the_papers_cosine_schedule() -> None:
    base, total = 0.996, 1000
    assert momentum_tau(0, total, base) == pytest.approx(base, abs=1e-15)  # first step: tau_base
    assert momentum_tau(500, total, base) == pytest.approx((1 + base) / 2, abs=1e-15)  # middle
    assert momentum_tau(total, total, base) == pytest.approx(1.0, abs=1e-15)  # end: no update
    last = momentum_tau(total - 1, total, base)  # the last update actually applied
    assert last == pytest.approx(1 - (1 - base) * (math.cos(math.pi * 999 / 1000) + 1) / 2, abs=1e-15)
    assert base < momentum_tau(250, total, base) < momentum_tau(750, total, base) < last < 1.0
    assert momentum_tau(-3, total, base) == momentum_tau(0, total, base)  # clamped
    assert momentum_tau(total + 5, total, base) == 1.0


def test_target_starts_as_a_copy_and_gets_no_gradient() -> None:
    model = _model()
    online = dict(model.backbone.named_parameters()) | {f"p.{k}": v for k, v in model.projector.named_parameters()}
    target = dict(model.target_backbone.named_parameters()) | {
        f"p.{k}": v for k, v in model.target_projector.named_parameters()}  # fmt: skip
    assert online.keys() == target.keys()
    assert all(torch.equal(online[k], target[k]) and not target[k].requires_grad for k in online)
    loss, _ = model(_images())
    loss.backward()
    assert all(t.grad is None for t in model.target_parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0
               for n, p in model.named_parameters() if not n.startswith("target_"))  # fmt: skip
    # the optimiser holds exactly the online parameters (build_optimizer skips frozen ones)
    opt = build_optimizer(load_config(None, SMALL).optim, model, 256)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert in_opt == {id(p) for n, p in model.named_parameters() if not n.startswith("target_")}
    before = [t.detach().clone() for t in model.target_parameters()]
    opt.step()  # moves the online network only
    assert all(torch.equal(a, b) for a, b in zip(before, model.target_parameters(), strict=True))


def test_ema_step_equals_the_closed_form() -> None:
    model = _model("method.byol.tau_base=0.9").double()
    with torch.no_grad():  # make online and target differ
        for p in model.online_parameters():
            p.add_(torch.randn_like(p))
    t0 = [t.detach().clone() for t in model.target_parameters()]
    o = [p.detach().clone() for p in model.online_parameters()]
    step, total = 7, 20
    model.after_step(step, total)  # the update after the 7th optimiser step (0-based index 6)
    tau = 1 - (1 - 0.9) * (math.cos(math.pi * 6 / 20) + 1) / 2
    for t, a, b in zip(model.target_parameters(), t0, o, strict=True):
        torch.testing.assert_close(t, tau * a + (1 - tau) * b, rtol=1e-14, atol=1e-15)
    # the logged rate is the one the next step will use
    assert float(model.tau) == pytest.approx(1 - 0.1 * (math.cos(math.pi * 7 / 20) + 1) / 2, rel=1e-12)
    assert all(torch.equal(p, b) for p, b in zip(model.online_parameters(), o, strict=True))
    with pytest.raises(ValueError, match="target tensors"):
        ema_update(list(model.target_parameters())[:2], list(model.online_parameters())[:3], 0.5)


def test_loss_is_the_symmetrised_normalised_regression() -> None:
    g = torch.Generator().manual_seed(0)
    q1, q2, t1, t2 = (torch.randn(5, 7, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(4))
    want = sum(((F.normalize(q, dim=1) - F.normalize(t, dim=1)) ** 2).sum(1).mean() for q, t in ((q1, t2), (q2, t1)))
    got = byol_loss(q1, q2, t1, t2)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    grads = torch.autograd.grad(got, (q1, q2, t1, t2), allow_unused=True)
    assert grads[0].abs().sum() > 0 and grads[1].abs().sum() > 0
    assert grads[2] is None and grads[3] is None  # stop-gradient on the target side
    assert byol_loss(q1, q2, q2, q1).item() == pytest.approx(0.0, abs=1e-12)


def test_forward_logs_zero_dim_tensors_including_tau_and_collapse() -> None:
    model = _model()
    _, logs = model(_images())
    assert set(logs) == {"loss", "tau", "collapse_std"}
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in logs.values())
    assert float(logs["tau"]) == pytest.approx(0.996) and 0.2 < float(logs["collapse_std"]) < 1.5
    model.after_step(1, 10)
    assert float(logs["tau"]) == pytest.approx(0.996)  # a logged value is a copy, not the buffer


RUN = [*SMALL, "method.byol.tau_base=0.9", "data.batch_size=32", "data.workers=1", "optim.name=sgd",
       "optim.base_lr=0.2", "log.progress=false", "log.wandb=off", "train.log_every=1",
       "train.max_steps=10", "train.checkpoint_every=3"]  # fmt: skip


@pytest.mark.slow  # three short CLI runs (~30 s on 2 shared cores)
def test_sigkill_then_resume_is_bitwise_equal_including_the_target(tmp_path: Path, small_shards: str) -> None:
    ref, run, _, _ = cli_kill_then_resume(tmp_path, small_shards, RUN, 3, 7)

    a = same_final_models(ref, run)
    assert any(k.startswith("target_backbone.") for k in a)
    assert any(k.startswith("target_projector.") and "running_var" in k for k in a)  # BN buffers
    # the target has moved (EMA), and lags the online network
    assert not torch.equal(a["target_backbone.conv1.weight"], a["backbone.conv1.weight"])
    rows_ref, rows_run = jsonl_rows(ref), jsonl_rows(run)
    assert [m["step"] for m in rows_run] == list(range(1, 11))
    assert [m["loss"] for m in rows_run] == [m["loss"] for m in rows_ref]
    for m in rows_ref:  # the logged rate is the one that step's EMA update used
        assert m["tau"] == pytest.approx(momentum_tau(m["step"] - 1, 10, 0.9), rel=1e-6)
        assert 0.2 < m["collapse_std"] < 1.5
    card = (export_run(ref, tmp_path / "export")["card"]).read_text()
    assert "Exported network: the online backbone" in card and "target_backbone" in card
    # the EMA target can be exported too, on request
    paths = export_run(ref, tmp_path / "export_target", network="target_backbone")
    assert "Exported network: `target_backbone.*`" in paths["card"].read_text()
    target = load_backbone(tmp_path / "export_target").state_dict()
    assert target and all(torch.equal(v, a[f"target_backbone.{k}"]) for k, v in target.items())
