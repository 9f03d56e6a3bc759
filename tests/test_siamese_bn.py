"""Batch norm across processes: ``AllReduceBatchNorm1d`` in the BYOL / SimSiam heads, and
``train.sync_bn=true`` on CPU, which converts every BatchNorm of the model to its all-reduce twin.

The 2-process check runs this file as a script under ``torchrun --standalone`` (gloo, CPU): each
rank holds half of a fixed global batch of views; the averaged loss, the process-averaged
gradient of every trainable parameter (what DDP applies) and the heads' BN running statistics
must equal those of one process holding the whole batch (computed in the pytest process). The
heads are in training mode (batch statistics: the point of the test); the backbones run in eval
mode, because their BatchNorm2d layers stay per process unless ``train.sync_bn=true``; the
``*_sync_all`` cases convert the whole model (``convert_allreduce_batchnorm``, what the loop does
on CPU for ``train.sync_bn=true``) and train the backbone's BatchNorm2d layers too. With
``sync_head_bn=false`` the same check fails: per-process statistics are a different function.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from methodkit import gray
from torch import nn
from torchrun import results_fixture, save_and_leave

from selfsup.config import load_config
from selfsup.pretrain.build import build_method
from selfsup.pretrain.distributed import (
    AllReduceBatchNorm1d,
    AllReduceBatchNorm2d,
    convert_allreduce_batchnorm,
    get_world_size,
)
from selfsup.pretrain.run.rundir import latest_checkpoint

GLOBAL_N, SIDE = 8, 12
INFO = gray(SIDE)
HEADS = {"byol": ["method.byol.proj_hidden=24", "method.byol.proj_out=12", "method.byol.pred_hidden=20"],
         "simsiam": ["method.simsiam.proj_hidden=24", "method.simsiam.proj_out=12",
                     "method.simsiam.pred_hidden=6"]}  # fmt: skip
# name -> (method, dtype, sync_head_bn, every BN synchronised and the backbone training)
CASES = {
    "byol_fp64": ("byol", torch.float64, True, False),
    "byol_fp32": ("byol", torch.float32, True, False),
    "simsiam_fp64": ("simsiam", torch.float64, True, False),
    "byol_fp64_per_process_bn": ("byol", torch.float64, False, False),
    "simsiam_fp64_per_process_bn": ("simsiam", torch.float64, False, False),
    "simsiam_fp64_sync_all": ("simsiam", torch.float64, False, True),
    "simclr_fp64_sync_all": ("simclr", torch.float64, False, True),
    "simclr_fp64_per_process_all": ("simclr", torch.float64, False, False),
}


def _setup(method: str, dtype: torch.dtype, sync: bool, sync_all: bool = False):
    """Same weights and the same global views in every process; heads train, backbones eval
    (unless ``sync_all``: every BN converted to its all-reduce twin, the backbone training)."""
    head = [f"method.{method}.sync_head_bn={str(sync).lower()}", *HEADS[method]] if method in HEADS else []
    overrides = [f"method.name={method}", "model.backbone=resnet_small", "model.width=0.25",
                 "model.stem=cifar_s2", *head]  # fmt: skip
    torch.manual_seed(0)
    model = build_method(load_config(None, overrides), INFO).to(dtype).train()
    if sync_all:
        convert_allreduce_batchnorm(model)
    for name in ("backbone", "target_backbone"):
        if hasattr(model, name) and not sync_all and method != "simclr":
            getattr(model, name).eval()
    g = torch.Generator().manual_seed(1)
    v1, v2 = (torch.randn(GLOBAL_N, 1, SIDE, SIDE, generator=g).to(dtype) for _ in range(2))
    return model, v1, v2


def _bn_stats(model: nn.Module) -> dict[str, torch.Tensor]:
    """Running statistics of the batch norms in training mode (those that saw batch statistics)."""
    return {f"{m}.{n}": b.detach().clone() for m, mod in model.named_modules() if mod.training
            for n, b in mod.named_buffers(recurse=False) if "running" in n}  # fmt: skip


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _mean_over_processes(x: torch.Tensor) -> torch.Tensor:
    y = x.detach().clone()
    if get_world_size() > 1:
        dist.all_reduce(y)
        y /= get_world_size()
    return y


def _run(method: str, dtype: torch.dtype, sync: bool, sync_all: bool, rows: slice) -> dict:
    model, v1, v2 = _setup(method, dtype, sync, sync_all)
    loss, _ = model.loss_from_views(v1[rows], v2[rows])
    loss.backward()
    return {"loss": _mean_over_processes(loss),
            "grads": {k: _mean_over_processes(g) for k, g in _grads(model).items()},  # as DDP averages
            "stats": _bn_stats(model)}  # fmt: skip


def _worker(out_path: str) -> None:
    """One rank of the 2-process check (run by torchrun)."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)  # the gloo process group, as the training loop gets it
    rank, world = accelerator.process_index, accelerator.num_processes
    n = GLOBAL_N // world
    results = {name: _run(*case, slice(rank * n, (rank + 1) * n)) for name, case in CASES.items()}
    save_and_leave(results, out_path)


two_process_results = results_fixture(__file__)


def _rel_err(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], floor: float = 0.0) -> float:
    """Worst ``||got - ref|| / max(||ref||, floor)`` over the entries (``floor``: running means
    that are 0 up to rounding, behind a Linear fed by a BN output, compare absolutely)."""
    assert got.keys() == ref.keys() and ref
    return max((torch.linalg.norm(got[k] - ref[k]) / torch.linalg.norm(ref[k]).clamp(min=floor)).item()
               for k in ref)  # fmt: skip


@pytest.mark.slow  # torchrun start-up: ~15-25 s on 2 shared cores, paid once per module
@pytest.mark.parametrize(("case", "tol"), [("byol_fp64", 1e-10), ("byol_fp32", 1e-5), ("simsiam_fp64", 1e-10),
                                           ("simsiam_fp64_sync_all", 1e-10), ("simclr_fp64_sync_all", 1e-10)])
def test_two_processes_equal_one_process_on_the_whole_batch(two_process_results: dict, case: str, tol: float) -> None:
    method, dtype, sync, sync_all = CASES[case]
    ref = _run(method, dtype, sync, sync_all, slice(None))  # one process: plain BatchNorm1d on all rows
    got = two_process_results[case]
    assert abs(got["loss"].item() - ref["loss"].item()) <= tol * abs(ref["loss"].item())
    assert _rel_err(got["grads"], ref["grads"]) <= tol
    assert any(k.startswith("backbone.") for k in ref["grads"])  # the heads' gradient reaches it
    if sync_all:  # the backbone's BatchNorm2d statistics are the global batch's too
        assert any(k.startswith("backbone.") for k in ref["stats"])
    assert _rel_err(got["stats"], ref["stats"], floor=1.0) <= tol  # rank 0's statistics are global


@pytest.mark.slow
@pytest.mark.parametrize(("case", "reference"), [
    ("byol_fp64_per_process_bn", "byol_fp64"), ("simsiam_fp64_per_process_bn", "simsiam_fp64"),
    ("simclr_fp64_per_process_all", "simclr_fp64_sync_all")])
def test_per_process_bn_fails_the_same_check(two_process_results: dict, case: str, reference: str) -> None:
    ref = _run(*CASES[reference], slice(None))
    got = two_process_results[case]
    assert _rel_err(got["grads"], ref["grads"]) > 1e-3
    assert _rel_err(got["stats"], ref["stats"], floor=1.0) > 1e-3


def test_allreduce_bn_is_batchnorm_in_one_process() -> None:
    torch.manual_seed(0)
    plain, ours = nn.BatchNorm1d(5, momentum=None), AllReduceBatchNorm1d(5, momentum=None)
    ours.load_state_dict(plain.state_dict())
    x = torch.randn(7, 5, requires_grad=True)
    for _ in range(2):
        a, b = plain(x), ours(x)
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    ga, = torch.autograd.grad(plain(x).pow(3).sum(), x)  # fmt: skip
    gb, = torch.autograd.grad(ours(x).pow(3).sum(), x)  # fmt: skip
    torch.testing.assert_close(ga, gb, rtol=0, atol=0)
    assert ours.state_dict().keys() == plain.state_dict().keys()
    for k, v in plain.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[k], v, rtol=0, atol=0)
    # SyncBatchNorm conversion (train.sync_bn on CUDA) recognises it as a batch norm
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(ours))
    assert isinstance(converted[0], nn.SyncBatchNorm)


def test_allreduce_bn2d_is_batchnorm2d_in_one_process_and_conversion_keeps_weights() -> None:
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.Sequential(nn.Flatten(), nn.BatchNorm1d(12)))
    for _ in range(2):  # non-trivial running statistics and affine parameters
        plain(torch.randn(4, 2, 4, 4))
    with torch.no_grad():
        plain[1].weight.uniform_(0.5, 2)
    ours = convert_allreduce_batchnorm(copy.deepcopy(plain))
    assert [type(m) for m in ours.modules() if "Norm" in type(m).__name__] == [AllReduceBatchNorm2d, AllReduceBatchNorm1d]
    assert ours.state_dict().keys() == plain.state_dict().keys()
    x = torch.randn(5, 2, 4, 4)
    for mode in (True, False):
        plain.train(mode), ours.train(mode)
        torch.testing.assert_close(ours(x), plain(x), rtol=0, atol=0)
    for k, v in plain.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[k], v, rtol=0, atol=0)


@pytest.mark.slow
def test_sync_bn_trains_on_cpu_with_two_processes(tmp_path: Path, small_shards: str) -> None:
    """``train.sync_bn=true`` under gloo (CPU): every BN of the model is an all-reduce twin."""
    env = {**os.environ, "WANDB_MODE": "off", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "ACCELERATE_USE_CPU": "1"}  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "selfsup.launch.cli", "pretrain", f"data.train={small_shards}", f"run_dir={tmp_path / 'run'}",
           "method.name=simclr", "model.width=0.25", "data.batch_size=16", "train.sync_bn=true",
           "train.max_steps=2", "log.wandb=off", "log.progress=false"]  # fmt: skip
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    state = torch.load(latest_checkpoint(tmp_path / "run" / "checkpoints"), weights_only=False)
    assert state["step"] == 2 and int(state["model"]["backbone.bn1.num_batches_tracked"]) == 2


if __name__ == "__main__":
    _worker(sys.argv[1])
