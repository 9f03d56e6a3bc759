"""Raw pixels to floats: the one place that knows the pixel depth (8 bits, or 16 bits as int32)."""

from __future__ import annotations

import torch


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """Raw pixels -> float32 in [0, 1]: uint8 / 255 (unchanged from before 16-bit support), or
    16-bit pixels (int32 holding 0..65535, what ``ShardSet.decode`` gives for ``u16``) / 65535."""
    return x.float().div_(255.0 if x.dtype == torch.uint8 else 65535.0)
