"""Raw pixels to floats: the one place that knows the pixel depth (8 bits, or 16 bits as int32)."""

from __future__ import annotations

import torch


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """Raw pixels -> float32 in [0, 1]: uint8 / 255 (unchanged from before 16-bit support), or
    16-bit pixels (int32 holding 0..65535, what ``ShardSet.decode`` gives for ``u16``) / 65535."""
    return x.float().div_(255.0 if x.dtype == torch.uint8 else 65535.0)


MAX_CHANNELS = 16


def check_channels(cfg, channels: int) -> None:
    """Channel counts a view recipe can take: 1..16. Grayscale (``augment.gray_p``) is defined
    for RGB only; grey (C=1) keeps today's behaviour (it is skipped), any other C refuses it."""
    if not 1 <= channels <= MAX_CHANNELS:
        raise ValueError(f"channels: expected 1..{MAX_CHANNELS} (from the data), got {channels}")
    if channels != 3 and channels != 1 and cfg.recipe in ("simclr", "byol") and cfg.gray_p > 0:
        raise ValueError(f"augment.gray_p={cfg.gray_p}: grayscale needs RGB images, these have {channels} "
                         "channels; set augment.gray_p=0 (colour jitter is per-channel brightness/contrast)")


def channel_jitter(x: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Colour jitter for C not in {1, 3}: brightness then contrast, each channel around its own
    mean (hue and saturation have no meaning without RGB). ``factors`` is ``[B, 4]`` as
    ``ops.colour_jitter`` takes it (brightness, contrast, saturation, hue); the last two are unused."""
    b = factors[:, 0].view(-1, 1, 1, 1)
    c = factors[:, 1].view(-1, 1, 1, 1)
    x = (x * b).clamp_(0.0, 1.0)
    return (x * c + x.mean((-2, -1), keepdim=True) * (1 - c)).clamp_(0.0, 1.0)
