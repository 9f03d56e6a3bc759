"""Masked autoencoder (He et al. 2021): initial contract; the owner fills in the method."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class MAEConfig:
    mask_ratio: float = 0.75
    decoder_dim: int = 128
    decoder_depth: int = 2
    decoder_heads: int = 4
    norm_pix_loss: bool = False
