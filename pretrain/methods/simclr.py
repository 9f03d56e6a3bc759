"""SimCLR (Chen et al. 2020): initial contract; the owner fills in the method."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class SimCLRConfig:
    temperature: float = 0.2
    proj_hidden: int = 512
    proj_out: int = 128
    proj_layers: int = 2
    loss_chunk: int = 0  # rows of the logit matrix per chunk; 0 = whole matrix at once
    grad_cache_chunk: int = 0  # >0: GradCache mode, embed sub-batches of this size
