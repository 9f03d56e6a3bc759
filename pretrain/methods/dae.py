"""Denoising autoencoder (Vincent et al. 2008): initial contract; the owner fills in the method."""

from __future__ import annotations

from dataclasses import dataclass, field

from selfsup.augment.corrupt import CorruptConfig


@dataclass
class DAEConfig:
    loss: str = "mse"  # mse | l1 | huber
    huber_delta: float = 1.0
    corrupt: CorruptConfig = field(default_factory=CorruptConfig)
