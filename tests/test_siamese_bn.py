"""Batch norm across processes for the BYOL / SimSiam heads: ``AllReduceBatchNorm1d``.

The 2-process check runs this file as a script under ``torchrun --standalone`` (gloo, CPU): each
rank holds half of a fixed global batch of views; the averaged loss, the process-averaged
gradient of every trainable parameter (what DDP applies) and the heads' BN running statistics
must equal those of one process holding the whole batch (computed in the pytest process). The
heads are in training mode (batch statistics: the point of the test); the backbones run in eval
mode, because their BatchNorm2d layers stay per process (``train.sync_bn=true`` converts them
to SyncBatchNorm on CUDA; on CPU it is a clear error, checked below). With
``sync_head_bn=false`` the same check fails: per-process statistics are a different function.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from selfsup.config import load_config
from selfsup.data_info import DataInfo
from selfsup.pretrain.build import build_method
from selfsup.pretrain.distributed import AllReduceBatchNorm1d, get_world_size

GLOBAL_N, SIDE = 8, 12
INFO = DataInfo(channels=1, image_size=SIDE, mean=(0.5,), std=(0.25,))
HEADS = {"byol": ["method.byol.proj_hidden=24", "method.byol.proj_out=12", "method.byol.pred_hidden=20"],
         "simsiam": ["method.simsiam.proj_hidden=24", "method.simsiam.proj_out=12",
                     "method.simsiam.pred_hidden=6"]}  # fmt: skip
# name -> (method, dtype, sync_head_bn)
CASES = {
    "byol_fp64": ("byol", torch.float64, True),
    "byol_fp32": ("byol", torch.float32, True),
    "simsiam_fp64": ("simsiam", torch.float64, True),
    "byol_fp64_per_process_bn": ("byol", torch.float64, False),
    "simsiam_fp64_per_process_bn": ("simsiam", torch.float64, False),
}


def _setup(method: str, dtype: torch.dtype, sync: bool):
    """Same weights and the same global views in every process; heads train, backbones eval."""
    overrides = [f"method.name={method}", "model.backbone=resnet_small", "model.width=0.25",
                 "model.stem=cifar_s2", f"method.{method}.sync_head_bn={str(sync).lower()}", *HEADS[method]]  # fmt: skip
    torch.manual_seed(0)
    model = build_method(load_config(None, overrides), INFO).to(dtype).train()
    for name in ("backbone", "target_backbone"):
        if hasattr(model, name):
            getattr(model, name).eval()
    g = torch.Generator().manual_seed(1)
    v1, v2 = (torch.randn(GLOBAL_N, 1, SIDE, SIDE, generator=g).to(dtype) for _ in range(2))
    return model, v1, v2


def _bn_stats(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: b.detach().clone() for n, b in model.named_buffers()
            if "running" in n and "backbone" not in n}  # fmt: skip


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _mean_over_processes(x: torch.Tensor) -> torch.Tensor:
    y = x.detach().clone()
    if get_world_size() > 1:
        dist.all_reduce(y)
        y /= get_world_size()
    return y


def _run(method: str, dtype: torch.dtype, sync: bool, rows: slice) -> dict:
    model, v1, v2 = _setup(method, dtype, sync)
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
    if rank == 0:
        torch.save(results, out_path)


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("ddp_bn") / "results.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(Path(__file__).resolve()), str(out)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return torch.load(out, weights_only=True)


def _rel_err(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], floor: float = 0.0) -> float:
    """Worst ``||got - ref|| / max(||ref||, floor)`` over the entries (``floor``: running means
    that are 0 up to rounding, behind a Linear fed by a BN output, compare absolutely)."""
    assert got.keys() == ref.keys() and ref
    return max((torch.linalg.norm(got[k] - ref[k]) / torch.linalg.norm(ref[k]).clamp(min=floor)).item()
               for k in ref)  # fmt: skip


@pytest.mark.slow  # torchrun start-up: ~15-25 s on 2 shared cores, paid once per module
@pytest.mark.parametrize(("case", "tol"), [("byol_fp64", 1e-10), ("byol_fp32", 1e-5), ("simsiam_fp64", 1e-10)])
def test_two_processes_equal_one_process_on_the_whole_batch(two_process_results: dict, case: str, tol: float) -> None:
    method, dtype, sync = CASES[case]
    ref = _run(method, dtype, sync, slice(None))  # one process: plain BatchNorm1d on all rows
    got = two_process_results[case]
    assert abs(got["loss"].item() - ref["loss"].item()) <= tol * abs(ref["loss"].item())
    assert _rel_err(got["grads"], ref["grads"]) <= tol
    assert any(k.startswith("backbone.") for k in ref["grads"])  # the heads' gradient reaches it
    assert _rel_err(got["stats"], ref["stats"], floor=1.0) <= tol  # rank 0's statistics are global


@pytest.mark.slow
@pytest.mark.parametrize("case", ["byol_fp64_per_process_bn", "simsiam_fp64_per_process_bn"])
def test_per_process_head_bn_fails_the_same_check(two_process_results: dict, case: str) -> None:
    method, dtype, _ = CASES[case]
    ref = _run(method, dtype, True, slice(None))
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


def test_sync_bn_on_cpu_is_a_config_error(tmp_path: Path, small_shards: str) -> None:
    env = {**os.environ, "WANDB_MODE": "off", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "selfsup.launch.cli", "pretrain", f"data.train={small_shards}",
           f"run_dir={tmp_path / 'run'}", "method.name=byol", "train.sync_bn=true",
           "train.max_steps=1", "log.wandb=off", "log.progress=false"]  # fmt: skip
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "train.sync_bn=true needs CUDA devices" in r.stdout + r.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


if __name__ == "__main__":
    _worker(sys.argv[1])
