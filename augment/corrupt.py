"""Corruptions for denoising autoencoders (Vincent et al. 2008); the clean image stays the target.

``corrupt`` works on float images in whatever units the caller trains in (normally the normalised
image), batched on the images' device, with per-sample noise from an optional ``torch.Generator``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from selfsup.augment.views import check_generator

KINDS = ("none", "gaussian", "multiplicative", "mask", "saltpepper")


@dataclass
class CorruptConfig:
    kind: str = "gaussian"  # none | gaussian | multiplicative | mask | saltpepper
    sigma: float = 0.3  # gaussian: noise std (normalised units); multiplicative: std of the factor
    fraction: float = 0.3  # mask / salt-and-pepper: fraction of pixels (or patches) hit
    patch: int = 1  # mask: side of the zeroed squares (1 = single pixels)


def check_corrupt_config(cfg: CorruptConfig) -> None:
    """Raise an error naming the bad ``corrupt.*`` key."""
    if cfg.kind not in KINDS:
        raise ValueError(f"corrupt.kind: '{cfg.kind}' is not one of {', '.join(KINDS)}")
    if cfg.sigma < 0:
        raise ValueError(f"corrupt.sigma: must be >= 0, got {cfg.sigma}")
    if not 0.0 <= cfg.fraction <= 1.0:
        raise ValueError(f"corrupt.fraction: a fraction in [0, 1], got {cfg.fraction}")
    if cfg.patch < 1:
        raise ValueError(
            f"corrupt.patch: the side of a masked square must be >= 1, got {cfg.patch}"
        )


def _exact_fraction_mask(
    batch: int, rows: int, cols: int, fraction: float, device, generator
) -> torch.Tensor:
    """Boolean ``[B, rows, cols]`` with exactly round(fraction * rows * cols) cells set per sample.

    An exact count (rather than independent coin flips) gives every sample the same difficulty.
    """
    cells = rows * cols
    hit = round(fraction * cells)
    scores = torch.rand(batch, cells, device=device, generator=generator)
    ranks = scores.argsort(dim=1).argsort(dim=1)
    return (ranks < hit).view(batch, rows, cols)


def corrupt(
    x: torch.Tensor,
    cfg: CorruptConfig,
    generator: torch.Generator | None = None,
    value_range: tuple[float | torch.Tensor, float | torch.Tensor] | None = None,
) -> torch.Tensor:
    """A corrupted copy of float images ``x`` ``[B, C, H, W]``; ``x`` itself is left unchanged.

    - ``gaussian``: ``x + sigma * N(0, 1)``, independently per element (additive noise).
    - ``multiplicative``: ``x * eps`` with ``eps ~ N(1, sigma^2)`` independently per element (the
      notes' ``x̂ = x ε``; speckle, or Gaussian dropout). It scales intensities, so it is applied
      about black: ``low + (x - low) * eps`` with ``low`` from ``value_range`` (the image of pixel
      value 0 in ``x``'s units; black stays black); without ``value_range``, about 0 of ``x``'s units.
    - ``mask``: exactly ``fraction`` of the pixels (``patch`` = 1) or of the ``patch``-sided squares
      of each image set to 0 in all channels (0 is the dataset mean when ``x`` is normalised).
    - ``saltpepper``: exactly ``fraction`` of the pixels of each image set, in all channels, to
      white or black with equal odds. Black and white in ``x``'s units come from ``value_range``
      (low, high; each a float or one value per channel); by default the batch's per-channel
      minimum and maximum.
    - ``none``: ``x`` unchanged.
    """
    check_corrupt_config(cfg)
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"corrupt: expected a float image tensor, got {got}")
    if x.ndim != 4:
        raise ValueError(f"corrupt: expected shape [B, C, H, W], got {tuple(x.shape)}")
    check_generator(generator, x.device)
    batch, _, height, width = x.shape
    if cfg.kind == "none":
        return x
    if cfg.kind == "gaussian":
        noise = torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
        return x + cfg.sigma * noise
    if cfg.kind == "multiplicative":
        eps = 1.0 + cfg.sigma * torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
        if value_range is None:
            return x * eps
        low = torch.as_tensor(value_range[0], dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1)
        return low + (x - low) * eps
    if cfg.kind == "mask":
        p = cfg.patch
        rows, cols = -(-height // p), -(-width // p)
        cells = _exact_fraction_mask(batch, rows, cols, cfg.fraction, x.device, generator)
        hit = cells.repeat_interleave(p, 1).repeat_interleave(p, 2)[:, :height, :width]
        return x.masked_fill(hit[:, None], 0.0)
    hit = _exact_fraction_mask(batch, height, width, cfg.fraction, x.device, generator)[:, None]
    salt = torch.rand(batch, 1, height, width, device=x.device, generator=generator) < 0.5
    if value_range is None:
        low = x.amin(dim=(0, 2, 3), keepdim=True)
        high = x.amax(dim=(0, 2, 3), keepdim=True)
    else:
        low, high = (
            torch.as_tensor(v, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1)
            for v in value_range
        )
    extreme = torch.where(salt, high, low)
    return torch.where(hit, extreme, x)
