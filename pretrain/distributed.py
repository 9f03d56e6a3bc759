"""Process-group helpers that also work in a plain single process (no group initialised).

The one non-obvious piece is ``all_gather_grad``: contrastive losses use every process's embeddings
as negatives, so the gather must send gradients back to the process that produced each slice.
``accelerator.gather`` and ``dist.all_gather`` do not (the gathered copies are leaves), which
silently drops the gradient through the other processes' keys. ``torch.distributed.nn.functional.
all_gather`` does: its backward sums, over processes, the gradients of each slice and returns each
process its own slice's sum (reduce-scatter, emulated with all-to-all on gloo).
"""

from __future__ import annotations

import torch.distributed as dist
import torch.distributed._functional_collectives as fc
from torch import Tensor

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
