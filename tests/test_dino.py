"""DINO: the loss against the formula written out (2 global + 2 local crops), the centre, EMA and
schedules against their closed forms, the collapse warnings, the attention picture, bad configs,
and the cross-process / cross-micro-batch exactness of the centre and the teacher.

The 2-process check runs this file as a script under ``torchrun --standalone`` (gloo, CPU): the
model is wrapped in DDP as the training loop's Accelerate does; every rank holds its slice of one
fixed global batch of views (a ViT: no batch statistics anywhere), runs ``train.accumulate``
micro-batches (all but the last under ``no_sync``, each loss divided by the count, as
``pretrain/train.py`` does), one SGD step and ``after_step``. Loss, DDP-averaged gradients, the
centre and the teacher after the step must equal one process on the whole batch in one
micro-batch (fp64, rel. err <= 1e-10). Planted variants kept here must fail the same checks: a
centre from each rank's own teacher outputs (no all-reduce), and a centre + EMA update per
micro-batch instead of per optimiser step (the bugs of lightly-train #968 / lightly PR #2062).
"""

from __future__ import annotations

import math
import sys
import warnings
from pathlib import Path

import pytest
import torch
from methodkit import gray
from resume_check import cli_kill_then_resume, jsonl_rows, same_final_models
from torchrun import results_fixture, save_and_leave

from selfsup.config import ConfigError, load_config
from selfsup.pretrain.build import build_method
from selfsup.pretrain.methods.byol import momentum_tau
from selfsup.pretrain.methods.dino import DINO, DINOCollapseWarning, dino_loss
from selfsup.pretrain.methods.dino_parts import cls_attention
from selfsup.pretrain.run.export import export_run, load_backbone

SIDE, LOCAL, GLOBAL_N, TOTAL = 16, 8, 8, 10
INFO = gray(SIDE)
HEAD = ["method.name=dino", "method.dino.out_dim=48", "method.dino.hidden_dim=24",
        "method.dino.bottleneck_dim=12", "method.dino.local_crops=2", f"method.dino.local_size={LOCAL}"]  # fmt: skip
VIT = ["model.backbone=vit_micro", "model.patch_size=4"]
RESNET = ["model.backbone=resnet_small", "model.stem=cifar_s2", "model.width=0.25"]


def _model(*extra: str, backbone: list[str] = VIT, cls: type[DINO] = DINO) -> DINO:
    torch.manual_seed(0)
    cfg = load_config(None, [*HEAD, *backbone, *extra])
    model = build_method(cfg, INFO)
    model.__class__ = cls  # a planted variant: the same weights, another update rule
    return model


# ---------------------------------------------------------------- the loss, by hand
def _by_hand(student, teacher, center, ts: float, tt: float) -> torch.Tensor:
    """Every (teacher global g, student view v != g) pair, every image b, every prototype k."""
    terms = []
    for g, t in enumerate(teacher):
        for v, s in enumerate(student):
            if v == g:
                continue
            per_image = []
            for b in range(t.shape[0]):
                e_t = [math.exp((t[b, k].item() - center[0, k].item()) / tt) for k in range(t.shape[1])]
                z_s = torch.stack([torch.exp(s[b, k] / ts) for k in range(s.shape[1])]).sum()
                per_image.append(sum(-(e_t[k] / sum(e_t)) * torch.log(torch.exp(s[b, k] / ts) / z_s)
                                     for k in range(t.shape[1])))  # fmt: skip
            terms.append(sum(per_image) / len(per_image))
    return sum(terms) / len(terms)


def test_loss_equals_the_formula_for_two_global_and_two_local_crops() -> None:
    g = torch.Generator().manual_seed(0)
    student = [torch.randn(3, 5, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(4)]
    teacher = [torch.randn(3, 5, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    center = torch.randn(1, 5, generator=g, dtype=torch.float64)
    loss, p_t = dino_loss(student, teacher, center, 0.1, 0.04)
    ref = _by_hand(student, teacher, center, 0.1, 0.04)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=0)
    for a, b in zip(torch.autograd.grad(loss, student, retain_graph=True), torch.autograd.grad(ref, student),
                    strict=True):  # fmt: skip
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)
    assert all(t.grad is None for t in teacher) and not p_t.requires_grad  # stop-gradient
    torch.testing.assert_close(p_t.sum(-1), torch.ones(2, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="2 teacher views"):
        dino_loss(student[:1], teacher[:1], center, 0.1, 0.04)


def test_forward_on_uint8_images_for_resnet_and_vit() -> None:
    for backbone in (RESNET, VIT):
        model = _model(backbone=backbone).train()
        assert model.backbone is model.teacher_backbone and model.local_views.size == LOCAL
        loss, logs = model(torch.randint(0, 256, (4, 1, SIDE, SIDE), dtype=torch.uint8))
        loss.backward()
        assert torch.isfinite(loss) and all(v.dim() == 0 for v in logs.values())
        assert {"teacher_entropy", "teacher_prototypes", "kl", "teacher_temp", "tau", "collapse_std"} <= set(logs)
        assert float(model.center_count) == 2 * 4  # two global views of 4 images, not yet in the centre
        assert all(p.grad is None for p in model.teacher_parameters())
    student = _model("method.dino.export=student")
    assert student.backbone is student.student_backbone


# ---------------------------------------------------------------- the step: closed forms
def test_after_step_centre_ema_and_schedules_follow_their_closed_forms() -> None:
    model = _model("method.dino.teacher_temp_warmup=0.5", "method.dino.freeze_last_layer=0.2").double().train()
    with torch.no_grad():
        for p in model.student_parameters():
            p.add_(0.01 * torch.randn_like(p))
    views = _views(torch.float64)
    c0, t0 = model.center.clone(), [t.clone() for t in model.teacher_parameters()]
    s0 = [p.detach().clone() for p in model.student_parameters()]
    loss, _ = model.loss_from_views(*_rows(views, slice(None)))
    loss.backward()
    last = model.student_head.last_layer.weight_v
    assert torch.equal(last.grad, torch.zeros_like(last)) and model.student_head.mlp[0].weight.grad.abs().sum() > 0
    with torch.no_grad():
        teacher_out = model.teacher_head(model.teacher_backbone(torch.cat(views[0])))
    model.after_step(1, TOTAL)
    torch.testing.assert_close(model.center, 0.9 * c0 + 0.1 * teacher_out.mean(0, keepdim=True), rtol=1e-12, atol=1e-15)
    tau = momentum_tau(0, TOTAL, 0.996)
    for t, a, b in zip(model.teacher_parameters(), t0, s0, strict=True):
        torch.testing.assert_close(t, tau * a + (1 - tau) * b, rtol=1e-12, atol=1e-15)
    assert float(model.center_count) == 0 and float(model.center_sum.abs().sum()) == 0
    temps, frozen = [], []
    for step in range(1, TOTAL + 1):
        model.after_step(step, TOTAL)
        temps.append(float(model.teacher_temp))
        frozen.append(float(model.last_layer_frozen))
    assert temps == pytest.approx([0.04 + 0.03 * min(k, 5) / 5 for k in range(1, TOTAL + 1)], rel=1e-12)
    assert frozen == [1.0] + [0.0] * (TOTAL - 1)  # 0.2 of 10 steps: steps 0 and 1 frozen
    model.zero_grad()
    model.loss_from_views(*_rows(views, slice(None)))[0].backward()
    assert last.grad.abs().sum() > 0  # thawed


def test_collapse_warnings_for_a_uniform_and_a_one_hot_teacher() -> None:
    images = torch.randint(0, 256, (8, 1, SIDE, SIDE), dtype=torch.uint8)

    def checks(model: DINO, steps: range, setup=lambda m: None) -> list[str]:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            for step in steps:
                setup(model)
                model(images)
                model.after_step(step, TOTAL)
        return [str(w.message) for w in seen if w.category is DINOCollapseWarning]

    model = _model("method.dino.watch_every=1", backbone=RESNET).train()
    uniform = checks(model, range(1, 4), lambda m: m.teacher_temp.fill_(1e6))  # every p_t uniform
    assert len(uniform) == 1 and "step 2" in uniform[0] and "going uniform" in uniform[0]
    one_hot = checks(model, range(4, 7), lambda m: m.center[0, 1:].fill_(1e4))  # prototype 0 wins everywhere
    assert len(one_hot) == 1 and "step 5" in one_hot[0] and "going one-hot" in one_hot[0]
    assert checks(_model("method.dino.watch_every=1", backbone=RESNET).train(), range(1, 4)) == []


def test_attention_picture_is_the_class_tokens_attention_of_the_last_block() -> None:
    model = _model().eval()
    images = torch.randint(0, 256, (3, 1, SIDE, SIDE), dtype=torch.uint8)
    grid = model.pictures(images)["attention"]
    heads = model.backbone.blocks[-1].attn.num_heads
    assert grid.shape == (3, 1 + heads, 1, SIDE, SIDE) and grid.min() >= 0 and grid.max() <= 1
    # the attention row reproduces the block's attention output for the class token
    vit, x = model.backbone, model.views.plain()(images)[0]
    h = vit.embed_patches(x)
    h = torch.cat([(vit.cls_token + vit.pos_embed[:, :1]).expand(3, -1, -1), h], 1)
    for block in vit.blocks[:-1]:
        h = block(h)
    attn = vit.blocks[-1].attn
    row = cls_attention(vit, x, whole_row=True)  # [B, heads, 1 + N]
    v = attn.qkv(vit.blocks[-1].norm1(h)).reshape(3, h.shape[1], 3, heads, -1)[:, :, 2]
    mixed = torch.einsum("bhn,bnhd->bhd", row, v).reshape(3, -1)
    torch.testing.assert_close(attn.proj(mixed), attn(vit.blocks[-1].norm1(h))[:, 0], rtol=1e-5, atol=1e-6)
    assert _model(backbone=RESNET).pictures(images) == {}


@pytest.mark.parametrize(("override", "key"), [
    ("method.dino.global_crops=1", "method.dino.global_crops"), ("method.dino.export=ema", "method.dino.export"),
    ("method.dino.student_temp=0", "method.dino.student_temp"), ("method.dino.local_size=6", "method.dino.local_size"),
    ("method.dino.local_scale=[0.5,0.2]", "method.dino.local_scale"),
    ("method.dino.teacher_temp_warmup=1.5", "method.dino.teacher_temp_warmup")])  # fmt: skip
def test_bad_config_is_an_error_naming_the_key(override: str, key: str) -> None:
    with pytest.raises((ConfigError, ValueError), match=key.replace(".", r"\.")):
        build_method(load_config(None, [*HEAD, *VIT, override]), INFO)


# ---------------------------------------------------------------- across processes and micro-batches
class PerRankCentre(DINO):
    """Planted: each rank's centre from its own teacher outputs only."""

    @staticmethod
    def reduce_over_processes(stats: torch.Tensor) -> torch.Tensor:
        return stats


class PerMicroBatch(DINO):
    """Planted: the centre and the EMA updated after every micro-batch's forward."""

    def loss_from_views(self, global_views, local_views):
        out = super().loss_from_views(global_views, local_views)
        DINO.after_step(self, 1, TOTAL)
        return out

    def after_step(self, step: int, total_steps: int) -> None:
        pass


VARIANTS = {"dino": DINO, "per_rank": PerRankCentre, "per_micro": PerMicroBatch}


def _views(dtype: torch.dtype) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    glob = [torch.randn(GLOBAL_N, 1, SIDE, SIDE, generator=g).to(dtype) for _ in range(2)]
    loc = [torch.randn(GLOBAL_N, 1, LOCAL, LOCAL, generator=g).to(dtype) for _ in range(2)]
    return glob, loc


def _rows(views, rows: slice):
    return [v[rows] for v in views[0]], [v[rows] for v in views[1]]


class _ViewsIn(torch.nn.Module):
    """What DDP wraps: the method, called on prepared views (the loop calls it on uint8 images)."""

    def __init__(self, method: DINO) -> None:
        super().__init__()
        self.method = method
        self._ddp_params_and_buffers_to_ignore = [f"method.{n}" for n in method._ddp_params_and_buffers_to_ignore]

    def forward(self, glob, loc):
        return self.method.loss_from_views(glob, loc)


def take_step(model: DINO, net, opt, micro_batch, accumulate: int, ddp: bool):
    """One optimiser step as the training loop takes it: ``accumulate`` micro-batches
    (``micro_batch(i)`` -> the forward's arguments), DDP's gradient sync on the last one only, then
    the optimiser and ``after_step``. Returns (mean loss, the last forward's logs, gradients)."""
    total, logs = 0.0, {}
    for i in range(accumulate):
        with net.no_sync() if ddp and i < accumulate - 1 else torch.enable_grad():
            loss, logs = net(*micro_batch(i))
            (loss / accumulate).backward()
        total += loss.detach() / accumulate
    grads = {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.requires_grad}
    opt.step()
    model.after_step(1, TOTAL)
    return total, logs, grads


def _step(variant: str, rows: slice, accumulate: int, ddp: bool) -> dict:
    """One optimiser step as pretrain/train.py takes it; returns what the step produced."""
    model = _model("method.dino.freeze_last_layer=0", cls=VARIANTS[variant]).double().train()
    net = _ViewsIn(model)
    if ddp:
        net = torch.nn.parallel.DistributedDataParallel(net)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    glob, loc = _rows(_views(torch.float64), rows)
    n = glob[0].shape[0] // accumulate
    total, _, grads = take_step(model, net, opt, lambda i: _rows((glob, loc), slice(i * n, (i + 1) * n)),
                                accumulate, ddp)  # fmt: skip
    return {"loss": _mean_over_processes(total), "grads": grads, "center": model.center.clone(),
            "teacher": {k: v.clone() for k, v in model.state_dict().items() if k.startswith("teacher_")}}  # fmt: skip


def _mean_over_processes(x: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    y = x.detach().clone()
    if dist.is_initialized():
        dist.all_reduce(y)
        y /= dist.get_world_size()
    return y


CASES = {f"{v}_acc{a}": (v, a) for v in VARIANTS for a in (1, 2)}


def _worker(out_path: str) -> None:
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    rank, world = accelerator.process_index, accelerator.num_processes
    n = GLOBAL_N // world
    res = {name: _step(v, slice(rank * n, (rank + 1) * n), a, ddp=True) for name, (v, a) in CASES.items()}
    centres = [torch.zeros_like(r["center"]) for r in res.values()]
    for c, r in zip(centres, res.values(), strict=True):  # every rank must hold the same centre
        torch.distributed.all_reduce(c.copy_(r["center"]), op=torch.distributed.ReduceOp.MAX)
        r["centre_spread"] = (c - r["center"]).abs().max()
    save_and_leave(res, out_path)


two_process_results = results_fixture(__file__)


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return (torch.linalg.norm(got - ref) / torch.linalg.norm(ref)).item()


def _errors(got: dict, ref: dict) -> dict[str, float]:
    return {"loss": _rel(got["loss"], ref["loss"]), "center": _rel(got["center"], ref["center"]),
            "grads": max(_rel(got["grads"][k], ref["grads"][k]) for k in ref["grads"]),
            "teacher": max(_rel(got["teacher"][k], ref["teacher"][k]) for k in ref["teacher"])}  # fmt: skip


@pytest.fixture(scope="module")
def whole_batch() -> dict:
    return _step("dino", slice(None), 1, ddp=False)  # one process, the whole batch, one micro-batch


def test_accumulation_in_one_process_equals_one_step_and_per_micro_batch_fails(whole_batch: dict) -> None:
    errs = _errors(_step("dino", slice(None), 2, ddp=False), whole_batch)
    assert max(errs.values()) <= 1e-10, errs
    planted = _errors(_step("per_micro", slice(None), 2, ddp=False), whole_batch)
    assert planted["center"] > 1e-3 and planted["teacher"] > 1e-6, planted


@pytest.mark.slow  # torchrun start-up, once per module
@pytest.mark.parametrize("case", ["dino_acc1", "dino_acc2"])
def test_two_processes_equal_one_process_on_the_whole_batch(two_process_results: dict, whole_batch: dict,
                                                            case: str) -> None:  # fmt: skip
    got = two_process_results[case]
    errs = _errors(got, whole_batch)
    assert max(errs.values()) <= 1e-10, errs
    assert float(got["centre_spread"]) == 0.0  # both ranks hold the same centre


@pytest.mark.slow
@pytest.mark.parametrize("case", ["per_rank_acc1", "per_rank_acc2", "per_micro_acc2"])
def test_planted_centre_updates_fail_the_same_check(two_process_results: dict, whole_batch: dict, case: str) -> None:
    errs = _errors(two_process_results[case], whole_batch)
    assert errs["center"] > 1e-3, errs
    if case.startswith("per_micro"):
        assert errs["teacher"] > 1e-6, errs


# ---------------------------------------------------------------- kill and resume
RUN = [*HEAD, *RESNET, "method.dino.local_size=12", "method.dino.teacher_temp_warmup=0.6", "method.dino.freeze_last_layer=0.3",
       "method.dino.tau_base=0.9", "data.batch_size=32", "data.workers=1", "optim.name=sgd", "optim.base_lr=0.2",
       "log.progress=false", "log.wandb=off", "train.log_every=1", "train.max_steps=10",
       "train.checkpoint_every=3", "train.accumulate=2"]  # fmt: skip


@pytest.mark.slow  # three short CLI runs
def test_sigkill_then_resume_is_bitwise_equal_teacher_centre_and_schedules(tmp_path: Path, small_shards: str) -> None:
    ref, run, _, _ = cli_kill_then_resume(tmp_path, small_shards, RUN, 3, 7)
    a = same_final_models(ref, run)
    assert {"center", "teacher_temp", "tau", "last_layer_frozen"} <= a.keys()
    assert "center_sum" not in a  # the step's accumulator is empty between steps and not saved
    assert not torch.equal(a["teacher_backbone.conv1.weight"], a["student_backbone.conv1.weight"])
    assert torch.equal(a["backbone.conv1.weight"], a["teacher_backbone.conv1.weight"])  # export=teacher
    assert float(a["teacher_temp"]) == pytest.approx(0.07) and float(a["center"].abs().sum()) > 0
    rows = [jsonl_rows(ref), jsonl_rows(run)]
    assert [m["step"] for m in rows[1]] == list(range(1, 11))
    assert [m["loss"] for m in rows[1]] == [m["loss"] for m in rows[0]]
    for m in rows[0]:  # the logged temperature is the one that step used: 0.04 -> 0.07 over 6 steps
        assert m["teacher_temp"] == pytest.approx(0.04 + 0.03 * min(m["step"] - 1, 6) / 6, rel=1e-6)
    card = export_run(ref, tmp_path / "export")["card"].read_text()
    assert "Exported network: the network `method.dino.export` names: by default the EMA teacher" in card
    teacher = load_backbone(tmp_path / "export").state_dict()
    assert teacher and all(torch.equal(v, a[f"teacher_backbone.{k}"]) for k, v in teacher.items())


if __name__ == "__main__":
    _worker(sys.argv[1])
