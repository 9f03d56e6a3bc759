"""VICReg's and Barlow Twins' global-batch statistics across processes, and the shipped variants
that get them wrong.

The 2-process check runs this file as a script under ``torchrun --standalone`` (gloo, CPU): each
rank holds half of a fixed global batch of views; the loss averaged over processes and the
process-averaged gradient of every parameter (what DDP applies) must equal those of one process
holding the whole batch (computed in the pytest process), fp64, relative error <= 1e-10. The
heads train (their BN over the global batch through ``AllReduceBatchNorm1d``); the backbones run
in eval mode (their BatchNorm2d layers stay per process unless ``train.sync_bn=true``).

Planted variants, run through the same check, which they must fail:
- VICReg with a gather whose backward returns only the local slice of the gradient (lightly
  #1528): the variance/covariance gradient is 1/P of the true one; the test checks it is exactly
  ``invariance gradient + (variance/covariance gradient) / 2``.
- Barlow Twins with a plain ``torch.distributed.all_reduce`` of C inside the loss (the reference
  code's and solo-learn's; lightly #1977): the gradient is exactly half (1/P) of the true one.
- Barlow Twins standardised with each process's own batch statistics (solo-learn): another function.
"""

from __future__ import annotations

import sys

import pytest
import torch
import torch.distributed as dist
from methodkit import gray
from torchrun import results_fixture, save_and_leave

from selfsup.config import load_config
from selfsup.pretrain.build import build_method
from selfsup.pretrain.distributed import all_gather_grad, get_rank, get_world_size
from selfsup.pretrain.methods.barlow_twins import barlow_twins_loss, cross_correlation
from selfsup.pretrain.methods.vicreg import vicreg_terms

GLOBAL_N, SIDE = 8, 12
INFO = gray(SIDE)
HEADS = {"vicreg": ["method.vicreg.expander_hidden=24", "method.vicreg.expander_out=12"],
         "barlow_twins": ["method.barlow_twins.proj_hidden=24", "method.barlow_twins.proj_out=12"]}  # fmt: skip
# name -> (method, dtype, variant); "exact" is the method's own loss_from_views
CASES = {
    "vicreg_fp64": ("vicreg", torch.float64, "exact"),
    "vicreg_fp32": ("vicreg", torch.float32, "exact"),
    "vicreg_fp64_local_slice_gather": ("vicreg", torch.float64, "local_slice_gather"),
    "vicreg_fp64_invariance_only": ("vicreg", torch.float64, "invariance_only"),
    "vicreg_fp64_regularisers_only": ("vicreg", torch.float64, "regularisers_only"),
    "barlow_fp64": ("barlow_twins", torch.float64, "exact"),
    "barlow_fp32": ("barlow_twins", torch.float32, "exact"),
    "barlow_fp64_plain_all_reduce": ("barlow_twins", torch.float64, "plain_all_reduce"),
    "barlow_fp64_per_process_standardisation": ("barlow_twins", torch.float64, "per_process_stats"),
}


# ---------------------------------------------------------------- the planted wrong collectives
class _LocalSliceGather(torch.autograd.Function):
    """All-gather whose backward returns this rank's slice of its own gradient, without summing
    the other ranks' gradients of that slice (lightly's GatherLayer before #1531)."""

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.n = x.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        return grad[get_rank() * ctx.n : (get_rank() + 1) * ctx.n]


def local_slice_gather(x: torch.Tensor) -> torch.Tensor:
    return x if get_world_size() == 1 else _LocalSliceGather.apply(x)


def plain_all_reduce(x: torch.Tensor) -> torch.Tensor:
    """``dist.all_reduce`` inside the graph: the value is the sum, autograd sees the local term."""
    if get_world_size() == 1:
        return x
    total = x.detach().clone()
    dist.all_reduce(total)
    return x + (total - x.detach())


def per_process(x: torch.Tensor) -> torch.Tensor:
    """No reduction: each process's own statistics."""
    return x


# ---------------------------------------------------------------- one rank's computation
def _setup(method: str, dtype: torch.dtype):
    """Same weights and the same global views in every process; heads train, backbone eval."""
    torch.manual_seed(0)
    model = build_method(load_config(None, [f"method.name={method}", "model.backbone=resnet_small",
                                            "model.width=0.25", "model.stem=cifar_s2", *HEADS[method]]), INFO)  # fmt: skip
    model = model.to(dtype).train()
    model.backbone.eval()
    g = torch.Generator().manual_seed(1)
    v1, v2 = (torch.randn(GLOBAL_N, 1, SIDE, SIDE, generator=g).to(dtype) for _ in range(2))
    return model, v1, v2


def _loss(model, v1: torch.Tensor, v2: torch.Tensor, variant: str) -> torch.Tensor:
    if variant == "exact":
        return model.loss_from_views(v1, v2)[0]
    head = model.expander if model.name == "vicreg" else model.projector
    z1, z2 = head(model.backbone(v1)), head(model.backbone(v2))
    if model.name == "vicreg":
        cfg = model.cfg
        gather = local_slice_gather if variant == "local_slice_gather" else all_gather_grad
        t = vicreg_terms(z1, z2, cfg.eps, gather=gather)
        inv = cfg.sim_coeff * t["invariance"]
        reg = cfg.std_coeff * t["variance"] + cfg.cov_coeff * t["covariance"]
        return {"invariance_only": inv, "regularisers_only": reg}.get(variant, inv + reg)
    sums = {"plain_all_reduce": {"corr_sum": plain_all_reduce}, "per_process_stats": {"stats_sum": per_process}}
    c = cross_correlation(z1, z2, model.cfg.eps, **sums[variant])
    return model.cfg.scale_loss * barlow_twins_loss(c, model.cfg.off_diagonal_weight())[0]


def _mean_over_processes(x: torch.Tensor) -> torch.Tensor:
    y = x.detach().clone()
    if get_world_size() > 1:
        dist.all_reduce(y)
        y /= get_world_size()
    return y


def run_case(method: str, dtype: torch.dtype, variant: str, rows: slice) -> dict:
    model, v1, v2 = _setup(method, dtype)
    loss = _loss(model, v1[rows], v2[rows], variant)
    loss.backward()
    grads = {n: _mean_over_processes(p.grad) for n, p in model.named_parameters()}  # as DDP averages
    return {"loss": _mean_over_processes(loss), "grads": grads}


def _worker(out_path: str) -> None:
    """One rank of the 2-process check (run by torchrun)."""
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    n = GLOBAL_N // world
    results = {name: run_case(*case, slice(rank * n, (rank + 1) * n)) for name, case in CASES.items()}
    save_and_leave(results, out_path)


# ---------------------------------------------------------------- the checks
two_process_results = results_fixture(__file__)


def rel_err(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> float:
    """Worst ``||got - ref|| / ||ref||`` over the parameters."""
    assert got.keys() == ref.keys() and ref
    return max((torch.linalg.norm(got[k] - ref[k]) / torch.linalg.norm(ref[k])).item() for k in ref)


def loss_err(got: dict, ref: dict) -> float:
    return abs(got["loss"].item() - ref["loss"].item()) / abs(ref["loss"].item())


def reference(case: str) -> dict:
    """One process holding the whole global batch, the method's own loss."""
    method, dtype, _ = CASES[case]
    return run_case(method, dtype, "exact", slice(None))


@pytest.mark.slow  # torchrun start-up: ~15-25 s on 2 shared cores, paid once per module
@pytest.mark.parametrize(("case", "tol"), [("vicreg_fp64", 1e-10), ("vicreg_fp32", 1e-5),
                                           ("barlow_fp64", 1e-10), ("barlow_fp32", 1e-5)])  # fmt: skip
def test_two_processes_equal_one_process_on_the_whole_batch(two_process_results: dict, case: str, tol: float) -> None:
    ref, got = reference(case), two_process_results[case]
    assert loss_err(got, ref) <= tol
    assert rel_err(got["grads"], ref["grads"]) <= tol
    assert any(k.startswith("backbone.") and v.abs().sum() > 0 for k, v in ref["grads"].items())


@pytest.mark.slow
@pytest.mark.parametrize("case", ["vicreg_fp64_local_slice_gather", "barlow_fp64_plain_all_reduce",
                                  "barlow_fp64_per_process_standardisation"])  # fmt: skip
def test_planted_variants_fail_the_same_check(two_process_results: dict, case: str) -> None:
    ref, got = reference(case.split("_fp64")[0] + "_fp64"), two_process_results[case]
    assert rel_err(got["grads"], ref["grads"]) > 1e-2
    if case == "barlow_fp64_per_process_standardisation":
        assert loss_err(got, ref) > 1e-3  # a different function of the global batch
    else:
        assert loss_err(got, ref) <= 1e-10  # the value is right; only the gradient is wrong


@pytest.mark.slow
def test_the_planted_gradients_are_the_diagnosed_fractions(two_process_results: dict) -> None:
    """Plain all-reduce: exactly 1/P of Barlow's gradient. Local-slice gather: VICReg's invariance
    gradient intact, its variance/covariance gradient 1/P (checked on the 2-process runs of each
    part alone, which are exact: the check can tell them apart)."""
    world = 2
    ref = reference("barlow_fp64")["grads"]
    assert rel_err(two_process_results["barlow_fp64_plain_all_reduce"]["grads"],
                   {k: v / world for k, v in ref.items()}) <= 1e-10  # fmt: skip
    inv = two_process_results["vicreg_fp64_invariance_only"]["grads"]
    reg = two_process_results["vicreg_fp64_regularisers_only"]["grads"]
    full = reference("vicreg_fp64")["grads"]
    assert rel_err({k: inv[k] + reg[k] for k in inv}, full) <= 1e-10  # the two parts are exact
    assert rel_err(two_process_results["vicreg_fp64_local_slice_gather"]["grads"],
                   {k: inv[k] + reg[k] / world for k in inv}) <= 1e-10  # fmt: skip


if __name__ == "__main__":
    _worker(sys.argv[1])
