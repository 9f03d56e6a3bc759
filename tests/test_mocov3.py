"""MoCo v3: the loss against a written-out formula, 2 processes against 1 on the same global batch
(with the planted un-offset labels failing the same check), labels that follow the samples
whatever rank holds them, a momentum encoder that no gradient reaches and that moves once per
optimiser step, the ViT's frozen random patch projection, bad config values named, and (slow) a
run killed with SIGKILL and resumed through the CLI that ends bitwise equal to an uninterrupted one.

The 2-process checks run this file as a script under ``torchrun --standalone`` (gloo, CPU), as
tests/test_simclr.py and tests/test_siamese_bn.py do (their helpers are reused): each rank holds
half of a fixed global batch of views; the mean loss, the process-averaged gradient of every
trainable parameter (what DDP applies) and the heads' BN running statistics must equal those of
one process holding the whole batch.
"""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path

import pytest
import torch
from methodkit import gray, seeded_method
from resume_check import cli_kill_then_resume, jsonl_rows, same_final_models
from test_siamese_bn import _bn_stats, _grads, _mean_over_processes, _rel_err
from test_simclr import _max_rel_err, all_reduce_mean
from torchrun import results_fixture, save_and_leave

from selfsup.config import ConfigError, load_config
from selfsup.pretrain import methods
from selfsup.pretrain.build import build_method
from selfsup.pretrain.distributed import convert_allreduce_batchnorm
from selfsup.pretrain.loop.optim import build_optimizer
from selfsup.pretrain.methods.byol import momentum_tau
from selfsup.pretrain.methods.mocov3 import (
    MoCoV3,
    collective_bytes,
    gather_keys,
    key_labels,
    mocov3_loss,
)
from selfsup.pretrain.run.export import export_run

GLOBAL_N, SIDE = 8, 12
INFO = gray(SIDE)
HEADS = ["method.name=mocov3", "method.mocov3.proj_hidden=24", "method.mocov3.proj_out=12",
         "method.mocov3.pred_hidden=20"]  # fmt: skip
RESNET = ["model.backbone=resnet_small", "model.width=0.25", "model.stem=cifar_s2"]
VIT = ["model.backbone=vit_micro", "model.patch_size=4"]
# name -> (backbone overrides, dtype, sync_head_bn, every BN global and the backbone training, planted labels)
CASES = {
    "resnet_fp64": (RESNET, torch.float64, True, False, False),
    "resnet_fp64_sync_all": (RESNET, torch.float64, False, True, False),
    "vit_fp64": (VIT, torch.float64, True, False, False),
    "resnet_fp32": (RESNET, torch.float32, True, False, False),
    "resnet_fp64_unoffset_labels": (RESNET, torch.float64, True, False, True),
    "vit_fp64_unoffset_labels": (VIT, torch.float64, True, False, True),
    "resnet_fp64_per_process_head_bn": (RESNET, torch.float64, False, False, False),
}


def _model(*extra: str) -> MoCoV3:
    return seeded_method(MoCoV3, [*HEADS, *RESNET, *extra], INFO)


def _setup(backbone: list[str], dtype: torch.dtype, sync: bool, sync_all: bool):
    """Same weights and global views in every process; heads train, ResNet backbones eval (their
    BatchNorm2d is per process) unless ``sync_all`` makes every BN global."""
    torch.manual_seed(0)
    cfg = load_config(None, [*HEADS, *backbone, f"method.mocov3.sync_head_bn={str(sync).lower()}"])
    model = build_method(cfg, INFO).to(dtype).train()
    if sync_all:
        convert_allreduce_batchnorm(model)
    elif model.kind == "resnet":
        model.backbone.eval()
        model.momentum_backbone.eval()
    g = torch.Generator().manual_seed(1)
    v1, v2 = (torch.randn(GLOBAL_N, 1, SIDE, SIDE, generator=g).to(dtype) for _ in range(2))
    return model, v1, v2


def _unoffset_labels(n: int) -> torch.Tensor:
    """The planted bug: every rank's labels point into rank 0's keys (no ``rank * n`` offset)."""
    return torch.arange(n)


def _run(backbone, dtype, sync, sync_all, planted, rows: slice) -> dict:
    model, v1, v2 = _setup(backbone, dtype, sync, sync_all)
    q1, q2, k1, k2, _ = model.embeddings(v1[rows], v2[rows])
    labels = {"labels": _unoffset_labels(q1.shape[0])} if planted else {}
    loss, _ = mocov3_loss(q1, q2, k1, k2, model.temperature, **labels)
    loss.backward()
    return {"loss": all_reduce_mean(loss), "stats": _bn_stats(model),
            "grads": {k: _mean_over_processes(g) for k, g in _grads(model).items()}}  # fmt: skip


def _shuffled(rank: int, world: int) -> list[dict]:
    """Samples dealt to ranks in a random order: where each query's label points, with one-hot
    embeddings that name their sample and view, and the real model's loss on the shuffled batch."""
    n, out = GLOBAL_N // world, []
    model, v1, v2 = _setup(RESNET, torch.float64, True, False)
    for seed in range(3):
        perm = torch.randperm(GLOBAL_N, generator=torch.Generator().manual_seed(seed))
        mine = perm[rank * n : (rank + 1) * n]
        ids = gather_keys(mine.to(torch.float64)[:, None]).flatten().long()  # sample held at each key row
        eye = torch.eye(2 * GLOBAL_N, dtype=torch.float64)
        k1, k2 = eye[mine], eye[GLOBAL_N + mine]  # view-1 key of s: e_s; view-2 key: e_(N+s)
        q1, q2 = k2.clone(), k1.clone()  # each query is its positive key exactly
        with torch.no_grad():
            model_loss, _ = model.loss_from_views(v1[mine], v2[mine])
        out.append({"perm": perm, "label_hits": _mean_over_processes((ids[key_labels(n)] == mine).double().mean()),
                    "planted_hits": _mean_over_processes((ids[_unoffset_labels(n)] == mine).double().mean()),
                    "acc": _mean_over_processes(mocov3_loss(q1, q2, k1, k2, 0.2)[1]),
                    "planted_acc": _mean_over_processes(mocov3_loss(q1, q2, k1, k2, 0.2, labels=_unoffset_labels(n))[1]),
                    "model_loss": all_reduce_mean(model_loss)})  # fmt: skip
    return out


def _worker(out_path: str) -> None:
    """One rank of the 2-process checks (run by torchrun)."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)  # the gloo process group, as the training loop gets it
    rank, world = accelerator.process_index, accelerator.num_processes
    n = GLOBAL_N // world
    results = {name: _run(*case, slice(rank * n, (rank + 1) * n)) for name, case in CASES.items()}
    results["shuffled"] = _shuffled(rank, world)
    keys = torch.zeros(2 * n, 12, dtype=torch.float64)
    results["received_key_bytes"] = gather_keys(keys).nbytes - keys.nbytes
    save_and_leave(results, out_path)


two_process_results = results_fixture(__file__)


def _grad_err(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> float:
    """``_max_rel_err`` of test_simclr.py, except that a gradient that is 0 in exact arithmetic
    (a ViT's final LayerNorm bias: the projector's BN removes any shift of the features) is
    rounding noise of ~1e-15, compared against the whole gradient's norm instead of its own."""
    scale = torch.linalg.norm(torch.stack([torch.linalg.norm(g) for g in ref.values()])).item()
    zero = {k for k, g in ref.items() if torch.linalg.norm(g).item() <= 1e-12 * scale}
    rest = _max_rel_err({k: got[k] for k in ref if k not in zero}, {k: v for k, v in ref.items() if k not in zero})
    return max([rest, *((torch.linalg.norm(got[k] - ref[k]).item() / scale) for k in zero)])


def _reference(case: str) -> dict:
    backbone, dtype, sync, sync_all, _ = CASES[case]
    return _run(backbone, dtype, sync, sync_all, False, slice(None))  # one process, right labels


@pytest.mark.slow  # torchrun start-up: ~15-25 s on 2 shared cores, paid once per module
@pytest.mark.parametrize(("case", "tol"), [("resnet_fp64", 1e-10), ("resnet_fp64_sync_all", 1e-10),
                                           ("vit_fp64", 1e-10), ("resnet_fp32", 1e-5)])  # fmt: skip
def test_two_processes_equal_one_process(two_process_results: dict, case: str, tol: float) -> None:
    ref, got = _reference(case), two_process_results[case]
    assert abs(got["loss"].item() - ref["loss"].item()) <= tol * abs(ref["loss"].item())
    assert _grad_err(got["grads"], ref["grads"]) <= tol
    assert any(k.startswith("backbone.") for k in ref["grads"])
    assert not any(k.startswith("momentum_") for k in ref["grads"])  # no gradient reaches it
    assert _rel_err(got["stats"], ref["stats"], floor=1.0) <= tol  # rank 0's BN statistics are global
    assert any(k.startswith("momentum_projector.") for k in ref["stats"])  # the keys' BN too


@pytest.mark.slow
@pytest.mark.parametrize("case", ["resnet_fp64_unoffset_labels", "vit_fp64_unoffset_labels",
                                  "resnet_fp64_per_process_head_bn"])  # fmt: skip
def test_planted_variants_fail_the_same_check(two_process_results: dict, case: str) -> None:
    """Labels without the rank offset (the keys of rank 0 for every rank), and heads whose BN
    normalises each process's half on its own."""
    ref, got = _reference(case), two_process_results[case]
    assert abs(got["loss"].item() - ref["loss"].item()) > 1e-3 * abs(ref["loss"].item())
    assert _grad_err(got["grads"], ref["grads"]) > 1e-2


@pytest.mark.slow
def test_labels_point_at_the_positive_key_whatever_rank_holds_the_sample(two_process_results: dict) -> None:
    model, v1, v2 = _setup(RESNET, torch.float64, True, False)
    with torch.no_grad():
        ref = model.loss_from_views(v1, v2)[0].item()  # the loss is a mean: the order cannot matter
    perms = set()
    for r in two_process_results["shuffled"]:
        perms.add(tuple(r["perm"].tolist()))
        assert r["label_hits"].item() == 1.0 and r["acc"].item() == 1.0
        assert r["planted_hits"].item() == r["planted_acc"].item() == 0.5  # rank 1's queries miss
        assert abs(r["model_loss"].item() - ref) <= 1e-10 * ref
    assert len(perms) == 3 and tuple(range(GLOBAL_N)) not in perms


@pytest.mark.slow
def test_key_gather_moves_the_bytes_the_docstring_says(two_process_results: dict) -> None:
    want = collective_bytes(GLOBAL_N, 2, 12, 24, vit=False, itemsize=8)["keys"]
    assert two_process_results["received_key_bytes"] == want == (2 - 1) * 2 * (GLOBAL_N // 2) * 12 * 8
    rows = re.findall(r"^\s*(\d+)\s+\|\s+([\d,]+) B\s+\|\s+([\d,]+) B\s+\|\s+([\d,]+) B$", methods.mocov3.__doc__, re.M)
    assert [int(p) for p, *_ in rows] == [2, 8, 64]
    for p, keys, bn_resnet, bn_vit in rows:
        nums = [int(x.replace(",", "")) for x in (keys, bn_resnet, bn_vit)]
        r, v = collective_bytes(4096, int(p), 256, 4096, False), collective_bytes(4096, int(p), 256, 4096, True)
        assert nums == [r["keys"], r["head_bn"], v["head_bn"]]


def _written_out(q1, q2, k1, k2, tau: float) -> tuple[torch.Tensor, float]:
    """Chen et al. 2021, algorithm 1 (one process), term by term: ``ctr(q, k) = -mean_i log(
    exp(q_i.k_i / tau) / sum_j exp(q_i.k_j / tau)) * 2 tau`` on unit vectors, summed both ways."""
    total, hits = 0.0, 0
    for q, k in ((q1, k2), (q2, k1)):
        terms = []
        for i in range(q.shape[0]):
            sims = [torch.dot(q[i], k[j].detach()) / (q[i].norm() * k[j].detach().norm()) / tau
                    for j in range(k.shape[0])]  # fmt: skip
            denom = sum(torch.exp(s) for s in sims)
            terms.append(-torch.log(torch.exp(sims[i]) / denom))
            hits += int(max(range(len(sims)), key=lambda j: sims[j].item()) == i)
        total = total + torch.stack(terms).mean() * 2 * tau
    return total, hits / (2 * q1.shape[0])


@pytest.mark.parametrize("tau", [0.2, 1.0])
def test_loss_equals_the_written_out_formula(tau: float) -> None:
    g = torch.Generator().manual_seed(0)
    q1, q2, k1, k2 = (torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(4))
    with torch.no_grad():
        q1[:2] += 2 * k2[:2]  # some queries find their positive, so the accuracy is not trivial
    loss, acc = mocov3_loss(q1, q2, k1, k2, tau)
    want, want_acc = _written_out(q1, q2, k1, k2, tau)
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=0)
    assert acc.item() == want_acc and 0 < want_acc < 1
    got = torch.autograd.grad(loss, (q1, q2, k1, k2), allow_unused=True)
    ref = torch.autograd.grad(want, (q1, q2), allow_unused=True)
    for a, b in zip(got[:2], ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)
    assert got[2] is None and got[3] is None  # the keys carry no gradient
    # perfectly aligned one-hot pairs: every query finds its key; the loss is 2 tau * 2 * CE
    e = torch.eye(4, dtype=torch.float64)
    loss, acc = mocov3_loss(e, e, e, e, tau)
    ce = -math.log(math.exp(1 / tau) / (math.exp(1 / tau) + 3))
    assert acc.item() == 1.0 and loss.item() == pytest.approx(2 * 2 * tau * ce, rel=1e-12)
    with pytest.raises(ValueError, match="all be"):
        mocov3_loss(e, e, e, e[:3], tau)
    with pytest.raises(ValueError, match="temperature"):
        mocov3_loss(e, e, e, e, 0.0)


def test_momentum_encoder_gets_no_gradient_and_moves_once_per_optimiser_step() -> None:
    model = _model("method.mocov3.momentum=0.9")
    base = dict(model.backbone.named_parameters()) | {f"p.{k}": v for k, v in model.projector.named_parameters()}
    mom = dict(model.momentum_backbone.named_parameters()) | {
        f"p.{k}": v for k, v in model.momentum_projector.named_parameters()}  # fmt: skip
    assert base.keys() == mom.keys() and all(torch.equal(base[k], mom[k]) and not mom[k].requires_grad for k in base)
    images = torch.randint(0, 256, (6, 1, SIDE, SIDE), dtype=torch.uint8)
    before = [t.detach().clone() for t in model.momentum_parameters()]
    for _ in range(2):  # two micro-batches of one step: forward and backward leave it alone
        loss, logs = model(images)
        loss.backward()
    assert all(t.grad is None for t in model.momentum_parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, model.momentum_parameters(), strict=True))
    opt = build_optimizer(load_config(None, [*HEADS, *RESNET]).optim, model, 256)
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {
        id(p) for n, p in model.named_parameters() if not n.startswith("momentum_")}  # fmt: skip
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.momentum_parameters(), strict=True))
    online = [p.detach().clone() for p in model.base_parameters()]
    model.after_step(3, 10)  # the update after 3 of 10 steps, once
    m = 1 - (1 - 0.9) * (math.cos(math.pi * 3 / 10) + 1) / 2
    for t, a, b in zip(model.momentum_parameters(), before, online, strict=True):
        torch.testing.assert_close(t, m * a + (1 - m) * b, rtol=1e-6, atol=1e-7)
    assert int(model.momentum_updates) == 1 and float(model.momentum) == pytest.approx(m, rel=1e-7)
    assert set(logs) == {"loss", "acc", "momentum", "collapse_std"}
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in logs.values())  # no host sync
    assert float(logs["momentum"]) == pytest.approx(0.9) and 0.2 < float(logs["collapse_std"]) < 1.5  # a copy
    flat = _model("method.mocov3.momentum_cosine=false", "method.mocov3.momentum=0.97")
    assert flat.rate(1, 10) == flat.rate(9, 10) == 0.97


def test_sync_bn_conversion_keeps_the_momentum_encoder_frozen() -> None:
    """``train.sync_bn=true`` on CPU converts every BN after the method is built: the momentum
    encoder's BN parameters must stay out of the optimiser (they did not, before the conversion
    kept ``requires_grad``)."""
    model = convert_allreduce_batchnorm(_model())
    assert not any(p.requires_grad for p in model.momentum_parameters())
    assert all(p.requires_grad for p in model.base_parameters())


def test_vit_frozen_random_patch_projection_stays_unchanged() -> None:
    torch.manual_seed(0)
    model = build_method(load_config(None, [*HEADS, *VIT, "optim.name=adamw"]), INFO)
    assert model.temperature == 0.2 and sum(isinstance(m, torch.nn.Linear) for m in model.projector) == 3
    assert isinstance(model.predictor[-1], torch.nn.BatchNorm1d)  # a ViT's predictor ends in BN
    proj = model.backbone.patch_embed.proj
    assert not proj.weight.requires_grad and not proj.bias.requires_grad
    frozen = {k: v.detach().clone() for k, v in proj.state_dict().items()}
    others = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = build_optimizer(load_config(None, [*HEADS, *VIT, "optim.name=adamw"]).optim, model, 256)
    loss, _ = model(torch.randint(0, 256, (6, 1, SIDE, SIDE), dtype=torch.uint8))
    loss.backward()
    opt.step()
    model.after_step(1, 10)
    assert all(torch.equal(v, proj.state_dict()[k]) for k, v in frozen.items()) and proj.weight.grad is None
    assert all(torch.equal(v, model.momentum_backbone.patch_embed.proj.state_dict()[k]) for k, v in frozen.items())
    moved = [n for n, p in model.named_parameters() if n in others and not torch.equal(p, others[n])]
    assert "backbone.blocks.0.attn.qkv.weight" in moved and len(moved) > 0.9 * len(others)
    trained = build_method(load_config(None, [*HEADS, *VIT, "method.mocov3.frozen_patch_proj=false"]), INFO)
    assert trained.backbone.patch_embed.proj.weight.requires_grad  # the option turns it off


def test_resnet_defaults_and_zero_init_residual() -> None:
    model = _model("method.mocov3.zero_init_residual=true")
    assert model.temperature == 1.0 and not isinstance(model.predictor[-1], torch.nn.BatchNorm1d)
    assert sum(isinstance(m, torch.nn.Linear) for m in model.projector) == 2
    lasts = [b.bn2.weight for b in model.backbone.modules() if hasattr(b, "conv2")]
    assert lasts and all(w.abs().sum() == 0 for w in lasts)
    assert _model("method.mocov3.temperature=0.5").temperature == 0.5
    assert "base (query) encoder" in MoCoV3.exported


@pytest.mark.parametrize(("overrides", "message"), [
    (["method.mocov3.proj_hidden=0"], "method.mocov3.proj_hidden must be >= 1"),
    (["method.mocov3.proj_layers=1"], "method.mocov3.proj_layers must be >= 2"),
    (["method.mocov3.temperature=0"], "method.mocov3.temperature must be > 0"),
    (["method.mocov3.momentum=1.5"], "method.mocov3.momentum must be in"),
    (["method.mocov3.momentum_cosine=1"], "method.mocov3.momentum_cosine: expected true/false"),
    (["method.mocov3.frozen_patch_proj=true"], "method.mocov3.frozen_patch_proj=true needs a ViT"),
    ([*VIT, "method.mocov3.zero_init_residual=true"], "method.mocov3.zero_init_residual=true needs a ResNet"),
])  # fmt: skip
def test_bad_config_values_are_named(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        build_method(load_config(None, [*HEADS, *RESNET, *overrides]), INFO)


RUN = [*HEADS, *RESNET, "data.batch_size=32", "data.workers=1", "optim.name=sgd", "optim.base_lr=0.2",
       "train.accumulate=2", "log.progress=false", "log.wandb=off", "train.log_every=1",
       "train.max_steps=40", "train.checkpoint_every=4"]  # fmt: skip


@pytest.mark.slow  # three short CLI runs (~30 s on 2 shared cores)
def test_sigkill_then_resume_is_bitwise_equal_including_the_momentum_encoder(tmp_path: Path, small_shards: str) -> None:
    ref, run, killed_at, resumed = cli_kill_then_resume(tmp_path, small_shards, RUN, 4, 13)
    assert killed_at < 40
    assert f"at step {killed_at} " in resumed, resumed  # resumed where it was killed
    a = same_final_models(ref, run)
    assert any(k.startswith("momentum_projector.") and "running_var" in k for k in a)
    # 40 optimiser steps of 2 micro-batches each: 40 EMA updates, not 80
    assert int(a["momentum_updates"]) == 40
    assert not torch.equal(a["momentum_backbone.conv1.weight"], a["backbone.conv1.weight"])
    rows = [jsonl_rows(ref), jsonl_rows(run)]
    assert [m["step"] for m in rows[1]] == list(range(1, 41))
    assert [m["loss"] for m in rows[1]] == [m["loss"] for m in rows[0]]
    for m in rows[0]:  # the logged rate is the one of the update that made this step's keys
        assert m["momentum"] == pytest.approx(momentum_tau(m["step"] - 1, 40, 0.99), rel=1e-6)
        assert 0.0 <= m["acc"] <= 1.0 and 0.2 < m["collapse_std"] < 1.5
    card = export_run(ref, tmp_path / "export")["card"].read_text()
    assert "Exported network: the base (query) encoder" in card and "momentum_backbone" in card


if __name__ == "__main__":
    _worker(sys.argv[1])
