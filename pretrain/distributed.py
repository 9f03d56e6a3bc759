"""Process-group helpers that also work in a plain single process (no group initialised).

The one non-obvious piece is ``all_gather_grad``: contrastive losses use every process's embeddings
as negatives, so the gather must send gradients back to the process that produced each slice.
``accelerator.gather`` and ``dist.all_gather`` do not (the gathered copies are leaves), which
silently drops the gradient through the other processes' keys. ``torch.distributed.nn.functional.
all_gather`` does: its backward sums, over processes, the gradients of each slice and returns each
process its own slice's sum (reduce-scatter, emulated with all-to-all on gloo).

``AllReduceBatchNorm1d``/``2d`` build on it: batch norms whose batch mean and variance are those of
the global batch (every process's rows), with gradients that flow back through the reduction, so a
network trained on N processes computes the function and the gradient one process would on the
concatenated batch. torch's SyncBatchNorm does the same but refuses CPU tensors.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as fc
from torch import Tensor, nn

# newer torch names it all_gather_single_autograd and warns on the old name; older torch has only that one.
_gather_autograd = getattr(fc, "all_gather_single_autograd", None) or fc.all_gather_tensor_autograd


def is_distributed() -> bool:
    """True when a process group is initialised (under torchrun / accelerate launch / srun)."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def all_gather_grad(x: Tensor) -> Tensor:
    """Concatenate ``x`` from every process along dim 0 (rank order), differentiably.

    Every process must pass a tensor of the same shape. With one process this is ``x`` itself.
    """
    if get_world_size() == 1:
        return x
    # the functional collective carries gradients back to each owner (the older
    # torch.distributed.nn.functional.all_gather does too, but is deprecated)
    return _gather_autograd(x.contiguous(), gather_dim=0, group=dist.group.WORLD)


class _AllReduceSum(torch.autograd.Function):
    """``y = sum_r x_r`` on every process; backward: ``dx_r = sum_r' dy_r'`` (an all-reduce too),
    since every process's ``y`` depends on every ``x_r``."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        y = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(y, op=dist.ReduceOp.SUM)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        g = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(g, op=dist.ReduceOp.SUM)
        return g


def all_reduce_sum_grad(x: Tensor) -> Tensor:
    """Sum of ``x`` over processes, differentiably (each process gets the gradient of the sum of
    every process's loss w.r.t. its own ``x``). With one process this is ``x`` itself.

    One all-reduce forward and one backward (ring: ``2 (P - 1) / P * x.numel()`` elements sent per
    process each way), not a gather: a gather-then-sum would move and hold ``P`` copies of ``x``,
    which for Barlow Twins' 8192 x 8192 cross-correlation is 16 GiB per process at 64 processes."""
    if get_world_size() == 1:
        return x
    return _AllReduceSum.apply(x)


class _AllReduceBatchNorm:
    """Training-mode batch statistics of the global batch, over every dim but the channels (1).

    With one process, or in eval mode, it is the plain torch BatchNorm it extends (same parameters,
    buffers and state-dict keys). In training with several processes, the per-channel sum and
    count, then the sum of squared deviations from the global mean, are all-reduced with
    ``all_reduce_sum_grad`` (two collectives of ``C + 1`` and ``C`` numbers), in fp32 at least;
    the running statistics get the global mean and unbiased variance. Processes may hold
    different batch sizes. ``SyncBatchNorm.convert_sync_batchnorm`` turns it into SyncBatchNorm
    (same result on CUDA).
    """

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or get_world_size() == 1:
            return super().forward(x)
        self._check_input_dim(x)
        dims = [0, *range(2, x.ndim)]
        shape = [1, -1] + [1] * (x.ndim - 2)
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        stats = torch.cat([xf.sum(dims), xf.new_full((1,), float(x.numel() // x.shape[1]))])
        stats = all_reduce_sum_grad(stats)
        count = stats[-1].detach()
        mean = stats[:-1] / count
        dev = xf - mean.view(shape)
        var = all_reduce_sum_grad(dev.pow(2).sum(dims)) / count  # biased: what normalises the batch
        out = dev * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = self.momentum
                if factor is None:  # cumulative moving average, as torch's BatchNorm
                    factor = 1.0 / float(self.num_batches_tracked)
                unbiased = var * (count / (count - 1).clamp(min=1))
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)
        return out.to(x.dtype)


class AllReduceBatchNorm1d(_AllReduceBatchNorm, nn.BatchNorm1d):
    """``nn.BatchNorm1d`` ([B, C] or [B, C, L]) with the global batch's statistics in training."""


class AllReduceBatchNorm2d(_AllReduceBatchNorm, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` ([B, C, H, W]) with the global batch's statistics in training."""


def convert_allreduce_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm1d/2d in ``module`` by its all-reduce twin (weights, buffers, keys
    and ``requires_grad`` kept, so a momentum/EMA network's BN stays frozen, as torch's
    ``convert_sync_batchnorm`` keeps it): batch norm over the global batch on any device and
    backend (gloo on CPU too), where torch's SyncBatchNorm needs CUDA. Returns ``module``
    (changed in place below it)."""
    twins = {nn.BatchNorm1d: AllReduceBatchNorm1d, nn.BatchNorm2d: AllReduceBatchNorm2d}
    for name, child in module.named_children():
        twin = twins.get(type(child))
        if twin is None:
            convert_allreduce_batchnorm(child)
            continue
        like = next(iter(child.state_dict().values()), None)  # device and float dtype of the original
        new = twin(child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats)
        if like is not None:
            new.to(device=like.device, dtype=like.dtype)
        new.load_state_dict(child.state_dict())
        for pname, p in child.named_parameters(recurse=False):  # frozen stays frozen (an EMA target's BN)
            getattr(new, pname).requires_grad_(p.requires_grad)
        new.train(child.training)
        setattr(module, name, new)
    return module
