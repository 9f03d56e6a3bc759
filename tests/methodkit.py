"""What the method tests share: a small grey image description, a method built from overrides
with torch's seed 0 (so two builds start from the same weights), and seeded uint8 images."""

from __future__ import annotations

import torch

from selfsup.config import load_config
from selfsup.data_info import DataInfo
from selfsup.pretrain.build import build_method


def gray(side: int) -> DataInfo:
    return DataInfo(channels=1, image_size=side, mean=(0.5,), std=(0.25,))


def seeded_method(cls: type, overrides: list[str], info: DataInfo):
    """``build_method`` of the overrides after ``torch.manual_seed(0)``; must build a ``cls``."""
    torch.manual_seed(0)
    model = build_method(load_config(None, overrides), info)
    assert isinstance(model, cls), f"{overrides} built {type(model).__name__}, not {cls.__name__}"
    return model


def gray_images(n: int, side: int, seed: int = 3) -> torch.Tensor:
    return torch.randint(0, 256, (n, 1, side, side), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
