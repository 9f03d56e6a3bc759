"""What every method receives about the data, and the contract the training loop relies on.

A method is an ``nn.Module`` constructed as ``Method(cfg, info)`` that builds its own backbone
(``self.backbone``) and its own on-device augmentation, and whose ``forward(images)`` takes a uint8
batch ``[B, C, H, W]`` already on the training device and returns ``(loss, logs)``: a scalar loss
tensor and a dict of scalars to log. The training loop never looks inside.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DataInfo:
    """Shape and statistics of the images a method will see (read from the shard manifest)."""

    channels: int
    image_size: int  # square side in pixels
    mean: tuple[float, ...]  # per channel, in [0, 1] units
    std: tuple[float, ...]
