"""The training loop's non-finite guard: every micro-batch's loss and the step's gradient norm.

With ``train.accumulate > 1`` a step is several forward/backward passes; a non-finite loss in any
of them poisons the accumulated gradients, and a finite loss can still give non-finite gradients
(an infinite derivative, an overflow in the backward pass). The guard therefore

* ORs ``~isfinite(loss)`` of every micro-batch into one flag on the device (no host sync per
  micro-batch),
* checks the gradient norm of the step (``clip_grad_norm_`` computes it anyway) — except under a
  gradient scaler (fp16), whose job is exactly to skip steps with overflowing gradients,
* agrees with the other ranks in the one all-reduce the loop already makes per step (together with
  the stop-signal flag),
* keeps what the step changes besides the parameters (BatchNorm statistics, every RNG, the data
  loader's counters) as they were before the step, so that a step found non-finite can be undone
  and a ``nan_policy=stop`` checkpoint equals the last good state exactly.
"""

from __future__ import annotations

import torch
from torch import nn

from selfsup.pretrain.run.rundir import rng_state, set_rng_state


class FiniteGuard:
    def __init__(self, device: torch.device, check_grads: bool = True) -> None:
        self.bad = torch.zeros((), dtype=torch.bool, device=device)
        self.check_grads = check_grads
        self._buffers: list[torch.Tensor] = []
        self._rng: dict | None = None
        self._loader: dict | None = None

    def begin(self, method: nn.Module, loader=None) -> None:
        """At the first micro-batch of a step, before its forward: remember the state the step may
        change (the loader's counters as before that micro-batch was drawn)."""
        self._buffers = [b.detach().clone() for b in method.buffers()]
        self._rng = rng_state()
        self._loader = loader.state_dict(before_last_batch=True) if loader is not None else None
        self.bad.zero_()

    def loss(self, loss: torch.Tensor) -> None:
        """After each micro-batch (a device op, no sync)."""
        self.bad |= ~torch.isfinite(loss.detach()).all()

    def agree(self, grad_norm: torch.Tensor | float, stop: bool, world: int, reduce=None) -> tuple[bool, bool]:
        """(finite on every rank, stop asked on any rank): the step's one host sync."""
        bad = self.bad.float()
        if self.check_grads:
            g = torch.as_tensor(grad_norm, device=self.bad.device)
            bad = bad + (~torch.isfinite(g)).float()
        flags = torch.stack([bad, torch.tensor(float(stop), device=self.bad.device)])
        if world > 1:
            flags = reduce(flags, "sum")
        flags = flags.cpu()
        return bool(flags[0] == 0), bool(flags[1] > 0)

    @torch.no_grad()
    def undo(self, method: nn.Module, loader=None, everything: bool = False) -> None:
        """Put back the BatchNorm statistics of before the step; with ``everything`` also the RNG
        states and the loader's counters (for a checkpoint of the last good state)."""
        for b, saved in zip(method.buffers(), self._buffers, strict=True):
            b.copy_(saved)
        if everything:
            if self._rng is not None:
                set_rng_state(self._rng)
            if loader is not None and self._loader is not None:
                loader.load_state_dict(self._loader)
