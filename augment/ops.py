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
        # not a broadcast view (later ops write into it), and x's dtype: under autocast a
        # convolution returns bfloat16/float16, which index_copy_ refuses and torch.where promotes
        return op(x, None).to(x.dtype).contiguous()
    if len(rows):
        x.index_copy_(0, rows, op(x.index_select(0, rows), rows).to(x.dtype))
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


def shift_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the HSV hue of RGB ``x`` in [0, 1] by ``shift`` (fraction of the circle, per sample).

    Same result as ``kornia.enhance.adjust_hue(x, 2 * pi * shift)`` (to ~1e-6), but ~2.5x faster
    on CPU (measured at 32 px): hue rotation keeps max and min per pixel, so the new RGB comes from
    the closed-form HSV->RGB formula without building the HSV image or the sextant lookup.
    """
    r, g, b = x.unbind(1)
    v, m = x.amax(1), x.amin(1)
    c = v - m
    inv = 1.0 / torch.where(c > 0, c, 1.0)
    h = torch.where(
        v == r, (g - b) * inv, torch.where(v == g, (b - r) * inv + 2, (r - g) * inv + 4)
    )
    h = h + (6 * shift).view(-1, 1, 1)
    n = torch.tensor([5.0, 3.0, 1.0], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    k = torch.remainder(n + h.unsqueeze(1), 6.0)
    return v.unsqueeze(1) - c.unsqueeze(1) * torch.clamp(torch.minimum(k, 4 - k), 0, 1)


def colour_jitter(x: torch.Tensor, factors: torch.Tensor, hue: bool = True) -> torch.Tensor:
    """Brightness, contrast, saturation, hue (``factors`` [N, 4]) as torchvision/PIL define them,
    in that order, on grey or RGB ``x`` in [0, 1]; ``x`` itself is left as it was.

    Bitwise Kornia's ``adjust_brightness_accumulative``, ``adjust_contrast_with_mean_subtraction``
    and ``adjust_saturation_with_gray_subtraction`` then ``shift_hue`` (the same products and sums,
    tested), written in place after the first op: at 224 px each of Kornia's ops allocates two or
    three images (1.2-1.3x on this op at 224 px).
    """
    b, c, s, h = factors.to(x.dtype).view(-1, 4, 1, 1, 1).unbind(1)
    x = (x * b).clamp_(0.0, 1.0)  # a new tensor: on_rows' torch.where reads x again
    rgb = x.shape[1] == 3
    mean = kornia.color.rgb_to_grayscale(x).mean((-2, -1), True) if rgb else x.mean((-3, -2, -1), True)
    x.mul_(c).add_(mean * (1 - c)).clamp_(0.0, 1.0)
    if rgb:
        gray = (1 - s) * kornia.color.rgb_to_grayscale(x)  # before x changes
        x.mul_(s).add_(gray).clamp_(0.0, 1.0)
        if hue:
            x = shift_hue(x, h.view(-1))
    return x
