"""What every part of the pipeline needs to know about the images: shape and normalisation."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DataInfo:
    """Shape and statistics of the images a method will see (read from the shard manifest)."""

    channels: int
    image_size: int  # square side in pixels
    mean: tuple[float, ...]  # per channel, in [0, 1] units
    std: tuple[float, ...]
