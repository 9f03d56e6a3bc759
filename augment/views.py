"""View recipes that run batched on the training device (Kornia).

Initial contract only: the owner of augment/ fills in the recipes.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class AugmentConfig:
    """Which views a method sees. ``mean``/``std`` empty means: take them from the shard manifest."""

    recipe: str = "simclr"  # simclr | byol | mae | none
    size: int = 0  # output side in pixels; 0 = the shard images' size
    scale: tuple[float, float] = (0.2, 1.0)
    ratio: tuple[float, float] = (0.75, 1.3333333333333333)
    flip_p: float = 0.5
    jitter_strength: float = 0.5
    jitter_p: float = 0.8
    gray_p: float = 0.2
    blur_p: float = 0.0
    solarize_p: float = 0.0
    mean: list[float] | None = None
    std: list[float] | None = None
