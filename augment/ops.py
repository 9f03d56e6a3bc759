"""Batched per-sample image ops shared by the view recipes (augment/views.py), CPU-fast and free of
host syncs on accelerators."""

from __future__ import annotations

import kornia
import torch
from torch.nn import functional as F


def take(values: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """``values`` at ``rows`` (all of them for None)."""
    return values if rows is None else values.index_select(0, rows)


def on_rows(x: torch.Tensor, mask: torch.Tensor, op) -> torch.Tensor:
    """``x`` with ``op(rows, index)`` applied to the rows where ``mask`` is True.

    CPU: ``op`` sees only those rows (``index`` = their positions), so a p = 0.5 op costs half;
    ``x`` is changed in place. Elsewhere: ``op(x, None)`` on every row, then ``torch.where``.
    """
    if x.device.type != "cpu":
        return torch.where(mask[:, None, None, None], op(x, None), x)
    rows = mask.nonzero().squeeze(1)
    if len(rows) == len(x):
        return op(x, None)
    if len(rows):
        x.index_copy_(0, rows, op(x.index_select(0, rows), rows))
    return x


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel: int) -> torch.Tensor:
    """Per-sample Gaussian blur: ``kornia.filters.gaussian_blur2d(x, (k, k), sigma, "reflect")``
    (to ~1e-9) as two 1-D grouped convolutions.

    Tail weights below 1e-12 are set to 0: a small sigma (0.1 px) puts subnormal floats
    (< 1.2e-38) in the kernel's tail, and CPU arithmetic on subnormals is ~10x slower (measured at
    224 px, k = 23: 2.3 vs 0.27 ms per image and pass); that is what makes Kornia's blur slow here.
    """
    n, c, h, w = x.shape
    weights = kornia.filters.get_gaussian_kernel1d(kernel, sigma[:, None])  # [N, k]
    weights = weights.masked_fill(weights < 1e-12, 0.0)
    weights = weights.to(x.dtype).repeat_interleave(c, 0)  # one per (sample, channel)
    pad = kernel // 2
    y = F.pad(x, (pad, pad, 0, 0), mode="reflect").view(1, n * c, h, w + 2 * pad)
    y = F.conv2d(y, weights.view(n * c, 1, 1, kernel), groups=n * c).view(n, c, h, w)
    y = F.pad(y, (0, 0, pad, pad), mode="reflect").view(1, n * c, h + 2 * pad, w)
    return F.conv2d(y, weights.view(n * c, 1, kernel, 1), groups=n * c).view(n, c, h, w)
