"""SimCLR: NT-Xent against a naive formula, chunked / GradCache / 2-process equivalence.

The 2-process check runs this file as a script under ``torchrun --standalone`` (gloo, CPU,
``Accelerator(cpu=True)`` with DDP): every rank holds half of a fixed global batch, and the
averaged loss and the DDP-averaged gradient of every parameter must equal those of one process
holding the whole batch (computed here in the pytest process). Models run in eval mode so that
batch norm uses running statistics: with per-process batch statistics the two set-ups compute
different functions whatever the gather does (SyncBatchNorm would be needed, and it is GPU-only).
"""

from __future__ import annotations

import math
import sys

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from methodkit import gray
from torchrun import results_fixture, save_and_leave

from selfsup.config import load_config
from selfsup.pretrain.build import build_method
from selfsup.pretrain.distributed import get_rank, get_world_size
from selfsup.pretrain.methods import METHODS, StepContext
from selfsup.pretrain.methods.simclr import SimCLR, grad_cache_step, info_nce, multi_crop_info_nce

TAU = 0.2
GLOBAL_N = 8
SIDE = 12
INFO = gray(SIDE)
# name -> (dtype, loss_chunk, grad_cache_chunk, gather is differentiable)
CASES = {
    "fp64_plain": (torch.float64, 0, 0, True),
    "fp64_chunked": (torch.float64, 3, 0, True),
    "fp64_gradcache": (torch.float64, 5, 3, True),
    "fp32_plain": (torch.float32, 0, 0, True),
    "fp64_detached_gather": (torch.float64, 0, 0, False),
}


def _config(chunk: int = 0, grad_cache: int = 0, extra: tuple[str, ...] = ()):
    return load_config(
        None,
        [
            "model.backbone=resnet_small",
            "model.width=0.25",
            "model.stem=cifar_s2",
            "method.simclr.proj_hidden=32",
            "method.simclr.proj_out=16",
            f"method.simclr.temperature={TAU}",
            f"method.simclr.loss_chunk={chunk}",
            f"method.simclr.grad_cache_chunk={grad_cache}",
            *extra,
        ],
    )


def _setup(dtype: torch.dtype, chunk: int = 0, grad_cache: int = 0):
    """Same model weights and the same global views in every process (fixed seeds)."""
    torch.manual_seed(0)
    model = build_method(_config(chunk, grad_cache), INFO).to(dtype).eval()
    g = torch.Generator().manual_seed(1)
    v1 = torch.randn(GLOBAL_N, 1, SIDE, SIDE, generator=g).to(dtype)
    v2 = torch.randn(GLOBAL_N, 1, SIDE, SIDE, generator=g).to(dtype)
    return model, v1, v2


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over processes, without gradient."""
    if get_world_size() == 1:
        return x.detach()
    y = x.detach().clone()
    dist.all_reduce(y, op=dist.ReduceOp.SUM)
    return y / get_world_size()


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _detached_gather(x: torch.Tensor) -> torch.Tensor:
    """The WRONG gather: other ranks' slices come back as constants (no gradient to their owner)."""
    parts = [torch.empty_like(x) for _ in range(get_world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    parts[get_rank()] = x
    return torch.cat(parts)


def _worker(out_path: str) -> None:
    """One rank of the 2-process check (run by torchrun)."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    rank, world = accelerator.process_index, accelerator.num_processes
    n = GLOBAL_N // world
    local = slice(rank * n, (rank + 1) * n)
    results = {}
    for name, (dtype, chunk, grad_cache, differentiable) in CASES.items():
        model, v1, v2 = _setup(dtype, chunk, grad_cache)
        ddp = accelerator.prepare(model)
        if grad_cache:
            ctx = StepContext(ddp, accelerator.backward, lambda ddp=ddp: accelerator.no_sync(ddp))
            loss, _ = grad_cache_step(model, v1[local], v2[local], ctx)
        else:
            z1, z2 = ddp(torch.cat([v1[local], v2[local]]), embed_only=True).chunk(2)
            gather = {} if differentiable else {"gather": _detached_gather}
            loss = info_nce(z1, z2, TAU, chunk=chunk, **gather).loss
            accelerator.backward(loss)
        results[name] = {"loss": all_reduce_mean(loss), "grads": _grads(model)}
    model, views = _setup_multi_crop()
    ddp = accelerator.prepare(model)
    z = ddp(torch.cat([v[local] for v in views]), embed_only=True).chunk(len(views))
    loss = multi_crop_info_nce(list(z), TAU).loss
    accelerator.backward(loss)
    results["fp64_multi_crop"] = {"loss": all_reduce_mean(loss), "grads": _grads(model)}
    save_and_leave(results, out_path)


def _reference(dtype: torch.dtype) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss and gradients of one process holding the whole global batch."""
    model, v1, v2 = _setup(dtype)
    z1, z2 = model.embed(torch.cat([v1, v2])).chunk(2)
    loss = info_nce(z1, z2, TAU).loss
    loss.backward()
    return loss.detach(), _grads(model)


def _setup_multi_crop():
    """Four views per image (as two full and two small crops would give, here all one size)."""
    model, v1, v2 = _setup(torch.float64)
    g = torch.Generator().manual_seed(2)
    extra = [torch.randn(GLOBAL_N, 1, SIDE, SIDE, generator=g, dtype=torch.float64) for _ in range(2)]
    return model, [v1, v2, *extra]


def _reference_multi_crop() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model, views = _setup_multi_crop()
    loss = multi_crop_info_nce(list(model.embed(torch.cat(views)).chunk(len(views))), TAU).loss
    loss.backward()
    return loss.detach(), _grads(model)


def _max_rel_err(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> float:
    """Worst, over parameters, of ||got - ref|| / ||ref||."""
    assert got.keys() == ref.keys()
    return max((torch.linalg.norm(got[k] - ref[k]) / torch.linalg.norm(ref[k])).item() for k in ref)


two_process_results = results_fixture(__file__)


@pytest.mark.slow  # torchrun start-up: ~15-25 s on 2 shared cores, paid once per module
@pytest.mark.parametrize(
    ("case", "tol"),
    [
        ("fp64_plain", 1e-10),
        ("fp64_chunked", 1e-10),
        ("fp64_gradcache", 1e-10),
        ("fp32_plain", 1e-5),
    ],
)
def test_two_processes_equal_one_process(two_process_results: dict, case: str, tol: float) -> None:
    dtype = CASES[case][0]
    ref_loss, ref_grads = _reference(dtype)
    got = two_process_results[case]
    assert abs(got["loss"].item() - ref_loss.item()) <= tol * abs(ref_loss.item())
    assert _max_rel_err(got["grads"], ref_grads) <= tol


@pytest.mark.slow
def test_multi_crop_two_processes_equal_one_process(two_process_results: dict) -> None:
    ref_loss, ref_grads = _reference_multi_crop()
    got = two_process_results["fp64_multi_crop"]
    assert abs(got["loss"].item() - ref_loss.item()) <= 1e-10 * abs(ref_loss.item())
    assert _max_rel_err(got["grads"], ref_grads) <= 1e-10


@pytest.mark.slow
def test_detached_gather_fails_the_same_check(two_process_results: dict) -> None:
    ref_loss, ref_grads = _reference(torch.float64)
    got = two_process_results["fp64_detached_gather"]
    # the forward value is right, which is why this bug goes unnoticed ...
    assert abs(got["loss"].item() - ref_loss.item()) <= 1e-10 * abs(ref_loss.item())
    # ... but the gradient misses what the other rank's anchors send back through the keys
    assert _max_rel_err(got["grads"], ref_grads) > 1e-2


def _naive_nt_xent(z1: torch.Tensor, z2: torch.Tensor, tau: float) -> torch.Tensor:
    """Chen et al. (2020), eq. 1 and algorithm 1, written out term by term."""
    z = torch.cat([z1, z2])
    m, n = z.shape[0], z1.shape[0]
    losses = []
    for i in range(m):
        sim = torch.stack([(z[i] @ z[k]) / (z[i].norm() * z[k].norm()) for k in range(m)]) / tau
        pos = (i + n) % m
        denom = sum(torch.exp(sim[k]) for k in range(m) if k != i)
        losses.append(-torch.log(torch.exp(sim[pos]) / denom))
    return torch.stack(losses).mean()


@pytest.mark.parametrize("chunk", [0, 1, 3, 7, 100])
def test_info_nce_matches_the_paper_formula(chunk: int) -> None:
    g = torch.Generator().manual_seed(0)
    z1 = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    out = info_nce(z1, z2, TAU, chunk=chunk)
    got = torch.autograd.grad(out.loss, (z1, z2))
    ref = _naive_nt_xent(z1, z2, TAU)
    want = torch.autograd.grad(ref, (z1, z2))
    torch.testing.assert_close(out.loss, ref, rtol=1e-12, atol=0)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_chunked_gradient_passes_gradcheck() -> None:
    g = torch.Generator().manual_seed(1)
    z1 = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: info_nce(a, b, 0.5, chunk=3).loss, (z1, z2))


def test_accuracy_counts_top1_positive() -> None:
    z1 = torch.eye(4, 6, dtype=torch.float64)
    z2 = z1.clone()
    z2[0] = z1[1]  # image 0's second view looks exactly like image 1
    out = info_nce(z1, z2, TAU, chunk=3)
    # anchors 1 (view 1 of image 1) and 4 (view 2 of image 0) tie between two keys; argmax picks
    # the first, wrong for anchor 4 (picks key 1) and for view-1 anchor 0, whose positive is key 4
    rows = torch.cat([z1, z2]) @ torch.cat([z1, z2]).T
    rows.fill_diagonal_(-1)
    pos = (torch.arange(8) + 4) % 8
    expected = (rows.argmax(1) == pos).double().mean()
    assert out.acc.item() == expected.item() < 1.0
    assert info_nce(z1, z1.clone(), TAU).acc.item() == 1.0


def _saved_bytes(fn) -> int:
    """Bytes of the tensors autograd keeps for backward while ``fn`` runs."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def test_chunked_loss_keeps_no_n_by_n_matrix() -> None:
    n, d = 256, 8
    z1 = torch.randn(n, d, requires_grad=True)
    z2 = torch.randn(n, d, requires_grad=True)
    matrix = (2 * n) * (2 * n) * 4
    plain = _saved_bytes(lambda: info_nce(z1, z2, TAU).loss)
    chunked = _saved_bytes(lambda: info_nce(z1, z2, TAU, chunk=64).loss)
    assert plain >= matrix
    assert chunked <= 8 * (2 * n) * d * 4 < matrix / 4


@pytest.fixture
def accelerator():
    """A real single-process Accelerator; its global state is cleared afterwards as accelerate's
    own AccelerateTestCase does, so later tests may build one with other settings."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    yield Accelerator(cpu=True)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def test_gradcache_equals_plain_in_one_process(accelerator) -> None:
    ref_loss, ref_grads = _reference(torch.float64)
    model, v1, v2 = _setup(torch.float64, chunk=0, grad_cache=3)  # 8 = 3 + 3 + 2
    wrapped = accelerator.prepare(model)
    ctx = StepContext(wrapped, accelerator.backward, lambda: accelerator.no_sync(wrapped))
    loss, logs = grad_cache_step(model, v1, v2, ctx)
    assert abs(loss.item() - ref_loss.item()) <= 1e-12 * ref_loss.item()
    assert float(logs["loss"]) == pytest.approx(ref_loss.item(), rel=1e-12)
    assert _max_rel_err(_grads(model), ref_grads) <= 1e-10


def test_forward_on_uint8_images_trains_every_parameter() -> None:
    torch.manual_seed(0)
    model = build_method(_config(chunk=5), INFO)
    images = torch.randint(0, 256, (6, 1, SIDE, SIDE), dtype=torch.uint8)
    loss, logs = model(images)
    assert set(logs) == {"loss", "acc", "pos_sim", "infonce_mi_bound"}
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in logs.values())  # no host sync
    assert float(logs["infonce_mi_bound"]) == pytest.approx(math.log(2 * 6 - 1) - float(logs["loss"]))
    assert torch.isfinite(loss) and loss.item() == pytest.approx(float(logs["loss"]))
    assert 0.0 <= logs["acc"] <= 1.0 and -1.0 <= logs["pos_sim"] <= 1.0
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    assert not model.owns_backward


def test_train_step_on_uint8_images_in_gradcache_mode(accelerator) -> None:
    torch.manual_seed(0)
    model = build_method(_config(grad_cache=4), INFO)
    assert model.owns_backward
    wrapped = accelerator.prepare(model)
    images = torch.randint(0, 256, (10, 1, SIDE, SIDE), dtype=torch.uint8)
    ctx = StepContext(wrapped, accelerator.backward, lambda: accelerator.no_sync(wrapped))
    loss, logs = model.train_step(images, ctx)
    assert not loss.requires_grad and loss.item() == pytest.approx(float(logs["loss"]))
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_registry_builds_simclr_and_names_unknown_methods() -> None:
    assert set(METHODS) == {"simclr", "simclr_ae", "mae", "dae", "ae", "sparse_ae", "cae", "vae", "beta_vae", "byol",
                            "simsiam", "mocov3", "vicreg", "barlow_twins", "dino", "distill"}
    cfg = _config()
    assert isinstance(build_method(cfg, INFO), SimCLR)
    cfg.method.name = "byol9"
    with pytest.raises(ValueError, match="byol9"):
        build_method(cfg, INFO)


def test_bad_inputs_are_named() -> None:
    z = torch.randn(4, 3)
    with pytest.raises(ValueError, match="z1 and z2"):
        info_nce(z, torch.randn(5, 3), TAU)
    with pytest.raises(ValueError, match="temperature"):
        info_nce(z, z, 0.0)
    with pytest.raises(ValueError, match="loss_chunk"):
        info_nce(z, z, TAU, chunk=-1)
    with pytest.raises(ValueError, match="proj_layers"):
        build_method(_config(extra=("method.simclr.proj_layers=0",)), INFO)


def test_cosine_is_scale_invariant() -> None:
    """Embeddings are L2-normalised inside the loss: rescaling an embedding changes nothing."""
    z1, z2 = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    a = info_nce(z1, z2, TAU).loss
    b = info_nce(z1 * 7.0, F.normalize(z2, dim=1), TAU).loss
    torch.testing.assert_close(a, b, rtol=1e-13, atol=0)


if __name__ == "__main__":
    _worker(sys.argv[1])
