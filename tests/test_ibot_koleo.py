"""DINOv2's options of ``dino`` (pretrain/methods/ibot.py): the iBOT masked-patch loss against its
formula written out, KoLeo against scipy's nearest neighbours, the iBOT patch centre across
processes and micro-batches (2 processes = 1 process, fp64, rel. err <= 1e-10) with planted wrong
centres that must fail, KoLeo's batch (each rank's: the 2-process value is the mean of the
per-rank values, not the global-batch value), and kill-and-resume bitwise with both options on.

The 2-process part runs this file under ``torchrun --standalone`` (gloo, CPU), as test_dino.py.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import test_dino as td
import torch
from resume_check import cli_kill_then_resume, jsonl_rows, same_final_models
from scipy.spatial import cKDTree
from torchrun import results_fixture, save_and_leave

from selfsup.config import load_config
from selfsup.pretrain.build import build_method
from selfsup.pretrain.methods.dino import DINO
from selfsup.pretrain.methods.ibot import MaskedPatches, ibot_loss, koleo_loss, sample_masks

GLOBAL_N, HEAD, INFO, RESNET, VIT = td.GLOBAL_N, td.HEAD, td.INFO, td.RESNET, td.VIT
PerRankCentre, _mean_over_processes, _model, _rel = td.PerRankCentre, td._mean_over_processes, td._model, td._rel

IBOT = ["method.dino.ibot_weight=1.0", "method.dino.freeze_last_layer=0"]
PATCHES, SIDE, LOCAL = 16, 16, 8  # vit_micro at 16 px with patch 4: a 4 x 4 grid


# ---------------------------------------------------------------- formulas
def test_ibot_loss_equals_the_formula_written_out() -> None:
    g = torch.Generator().manual_seed(0)
    masks = torch.tensor([[1, 0, 1, 1], [0, 0, 0, 0], [0, 1, 0, 0]], dtype=torch.bool)  # 3 images, 4 patches
    m, k = int(masks.sum()), 5
    s = torch.randn(m, k, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(m, k, generator=g, dtype=torch.float64)
    c = torch.randn(1, k, generator=g, dtype=torch.float64)
    loss, p_t = ibot_loss(s, t, masks, c, 0.1, 0.04)
    rows = [b for b in range(3) for j in range(4) if masks[b, j]]  # image of each masked patch
    per_image = [0.0] * 3
    for i, b in enumerate(rows):
        e = [math.exp((t[i, q].item() - c[0, q].item()) / 0.04) for q in range(k)]
        z = torch.stack([torch.exp(s[i, q] / 0.1) for q in range(k)]).sum()
        ce = sum(-(e[q] / sum(e)) * torch.log(torch.exp(s[i, q] / 0.1) / z) for q in range(k))
        per_image[b] = per_image[b] + ce / int(masks[b].sum())
    ref = sum(per_image) / 3  # the unmasked image counts with 0
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=0)
    torch.testing.assert_close(torch.autograd.grad(loss, s)[0], torch.autograd.grad(ref, s)[0], rtol=1e-10, atol=1e-14)
    assert not p_t.requires_grad and torch.allclose(p_t.sum(-1), torch.ones(m, dtype=torch.float64))


def test_koleo_equals_scipys_nearest_neighbour_distances() -> None:
    x = torch.randn(33, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 3.0
    unit = (x / x.norm(dim=1, keepdim=True)).numpy()
    dist, _ = cKDTree(unit).query(unit, k=2)  # the nearest point other than itself
    ref = -np.log(dist[:, 1] + 1e-8).mean()
    # rel 1e-7: pairwise_distance adds eps = 1e-8 to each coordinate difference (as DINOv2's PairwiseDistance)
    assert koleo_loss(x).item() == pytest.approx(ref, rel=1e-7)
    with pytest.raises(ValueError, match=r"method\.dino\.koleo_weight"):
        koleo_loss(x[:1])


def test_masks_follow_dinov2s_bins_and_bad_configs_name_their_key() -> None:
    torch.manual_seed(0)
    masks = sample_masks(10, 100, 0.5, (0.1, 0.5), torch.device("cpu"))
    counts = sorted(masks.sum(1).tolist())
    assert counts[:5] == [0] * 5  # int(10 * 0.5) images masked
    edges = np.linspace(10, 50, 6)
    assert all(lo - 1 <= n <= hi for n, lo, hi in zip(counts[5:], edges[:-1], edges[1:], strict=True))
    with pytest.raises(ValueError, match=r"method\.dino\.ibot_weight"):
        build_method(load_config(None, [*HEAD, *RESNET, "method.dino.ibot_weight=1"]), INFO)
    with pytest.raises(ValueError, match=r"method\.dino\.ibot_mask_ratio"):
        build_method(load_config(None, [*HEAD, *VIT, "method.dino.ibot_weight=1", "method.dino.ibot_mask_ratio=[0.5,0.2]"]), INFO)


# ---------------------------------------------------------------- across processes and micro-batches
class LocalCountTimesWorld(MaskedPatches):
    """Planted (dinov2 #546): the summed patch sum divided by the local count x world size."""

    def update_center(self, summed: torch.Tensor, momentum: float) -> None:
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        summed = summed.clone()
        summed[-1] = self.center_count * world
        super().update_center(summed, momentum)


def _data():
    g = torch.Generator().manual_seed(2)
    glob = [torch.randn(GLOBAL_N, 1, SIDE, SIDE, generator=g, dtype=torch.float64) for _ in range(2)]
    loc = [torch.randn(GLOBAL_N, 1, LOCAL, LOCAL, generator=g, dtype=torch.float64) for _ in range(2)]
    # [view, image, patch]: the first half of the images (rank 0) masked far more than the second
    masks = torch.rand(2, GLOBAL_N, PATCHES, generator=g) < torch.tensor([0.6] * 4 + [0.1] * 4)[None, :, None]
    masks[:, 4] = False  # an unmasked image
    return glob, loc, masks


def _part(data, rows: slice):
    glob, loc, masks = data
    return [v[rows] for v in glob], [v[rows] for v in loc], masks[:, rows].flatten(0, 1)


class _ViewsIn(torch.nn.Module):
    def __init__(self, method: DINO) -> None:
        super().__init__()
        self.method = method
        self._ddp_params_and_buffers_to_ignore = [f"method.{n}" for n in method._ddp_params_and_buffers_to_ignore]

    def forward(self, glob, loc, masks):
        return self.method.loss_from_views(glob, loc, masks)


VARIANTS = {"ibot": (DINO, MaskedPatches), "per_rank": (PerRankCentre, MaskedPatches),
            "local_count": (DINO, LocalCountTimesWorld)}  # fmt: skip


def _step(variant: str, rows: slice, accumulate: int, ddp: bool, extra: tuple[str, ...] = ()) -> dict:
    cls, patches = VARIANTS[variant]
    model = _model(*IBOT, *extra, cls=cls).double().train()
    model.ibot.__class__ = patches
    net = torch.nn.parallel.DistributedDataParallel(_ViewsIn(model)) if ddp else _ViewsIn(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    glob, loc, masks = _part(_data(), rows)
    n = glob[0].shape[0] // accumulate

    def micro_batch(i: int):
        sl = slice(i * n, (i + 1) * n)
        return [v[sl] for v in glob], [v[sl] for v in loc], masks.view(2, -1, PATCHES)[:, sl].flatten(0, 1)

    total, logs, grads = td.take_step(model, net, opt, micro_batch, accumulate, ddp)
    return {"loss": _mean_over_processes(total), "grads": grads, "center": model.center.clone(),
            "ibot_center": model.ibot.center.clone(), "koleo": _mean_over_processes(logs.get("koleo", total)),
            "teacher": {k: v.clone() for k, v in model.state_dict().items() if k.startswith("teacher_")}}  # fmt: skip


CASES = {"ibot_acc1": ("ibot", 1, ()), "ibot_acc2": ("ibot", 2, ()), "ibot_sep": ("ibot", 1, ("method.dino.ibot_separate_head=true",)),
         "per_rank": ("per_rank", 1, ()), "local_count": ("local_count", 1, ()),
         "koleo": ("ibot", 1, ("method.dino.koleo_weight=0.1",))}  # fmt: skip


def _worker(out_path: str) -> None:
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    rank, world = accelerator.process_index, accelerator.num_processes
    n = GLOBAL_N // world
    res = {name: _step(v, slice(rank * n, (rank + 1) * n), a, True, e) for name, (v, a, e) in CASES.items()}
    save_and_leave(res, out_path)


two_process_results = results_fixture(__file__)


def _errors(got: dict, ref: dict) -> dict[str, float]:
    return {"loss": _rel(got["loss"], ref["loss"]), "center": _rel(got["center"], ref["center"]),
            "ibot_center": _rel(got["ibot_center"], ref["ibot_center"]),
            "grads": max(_rel(got["grads"][k], ref["grads"][k]) for k in ref["grads"]),
            "teacher": max(_rel(got["teacher"][k], ref["teacher"][k]) for k in ref["teacher"])}  # fmt: skip


def test_accumulation_equals_one_step_for_the_patch_centre() -> None:
    ref = _step("ibot", slice(None), 1, ddp=False)
    errs = _errors(_step("ibot", slice(None), 2, ddp=False), ref)
    assert max(errs.values()) <= 1e-10, errs
    assert float(ref["ibot_center"].abs().sum()) > 0


@pytest.mark.slow  # torchrun start-up
@pytest.mark.parametrize("case", ["ibot_acc1", "ibot_acc2", "ibot_sep"])
def test_two_processes_equal_one_process_with_ibot(two_process_results: dict, case: str) -> None:
    extra = CASES[case][2]
    errs = _errors(two_process_results[case], _step("ibot", slice(None), 1, ddp=False, extra=extra))
    assert max(errs.values()) <= 1e-10, errs


@pytest.mark.slow
@pytest.mark.parametrize("case", ["per_rank", "local_count"])
def test_planted_patch_centres_fail_the_same_check(two_process_results: dict, case: str) -> None:
    errs = _errors(two_process_results[case], _step("ibot", slice(None), 1, ddp=False))
    assert errs["ibot_center"] > 1e-3, errs
    if case == "local_count":  # only the patch centre is wrong
        assert max(errs["loss"], errs["grads"], errs["center"]) <= 1e-10, errs


@pytest.mark.slow
def test_koleo_under_two_processes_is_the_mean_of_the_per_rank_values(two_process_results: dict) -> None:
    extra = CASES["koleo"][2]
    halves = [_step("ibot", slice(r * 4, (r + 1) * 4), 1, ddp=False, extra=extra)["koleo"] for r in (0, 1)]
    whole = _step("ibot", slice(None), 1, ddp=False, extra=extra)["koleo"]
    got = two_process_results["koleo"]["koleo"]
    assert _rel(got, (halves[0] + halves[1]) / 2) <= 1e-10
    assert _rel(got, whole) > 1e-3  # not the global batch's value


# ---------------------------------------------------------------- kill and resume
RUN = [*HEAD, *VIT, *IBOT, "method.dino.koleo_weight=0.1", "method.dino.local_size=8", "method.dino.tau_base=0.9",
       "method.dino.teacher_temp_warmup=0.6", "data.batch_size=16", "data.workers=1", "optim.name=sgd",
       "optim.base_lr=0.2", "log.progress=false", "log.wandb=off", "train.log_every=1", "train.max_steps=6",
       "train.checkpoint_every=2", "train.accumulate=2"]  # fmt: skip


@pytest.mark.slow  # three short CLI runs
def test_sigkill_then_resume_is_bitwise_with_ibot_and_koleo(tmp_path: Path, small_shards: str) -> None:
    ref, run, _, _ = cli_kill_then_resume(tmp_path, small_shards, RUN, 2, 4)
    a = same_final_models(ref, run)
    assert {"ibot.center", "ibot.mask_token", "center"} <= a.keys() and "ibot.center_sum" not in a
    assert float(a["ibot.center"].abs().sum()) > 0
    rows = [jsonl_rows(ref), jsonl_rows(run)]
    assert [m["step"] for m in rows[1]] == list(range(1, 7))
    for key in ("loss", "ibot", "koleo"):
        assert [m[key] for m in rows[1]] == [m[key] for m in rows[0]]


if __name__ == "__main__":
    _worker(sys.argv[1])
