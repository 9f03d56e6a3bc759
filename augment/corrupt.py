"""Corruptions for denoising autoencoders; the clean image stays the target."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class CorruptConfig:
    kind: str = "gaussian"  # none | gaussian | mask | saltpepper
    sigma: float = 0.3  # gaussian noise std, in units of the normalised image
    fraction: float = 0.3  # mask / salt-and-pepper: fraction of pixels (or patches) hit
    patch: int = 1  # mask: side of the zeroed squares (1 = single pixels)
