"""A toy method written against the method contract alone: the whole of what a contributor writes.

Run as a script, this file registers the method (by defining it) and hands its arguments to the
``selfsup`` CLI: ``python tests/toy_method.py pretrain method.name=toy ...``. The tests
(test_method_contract.py) train it that way, in a fresh process, so the pytest process's registry
keeps only the project's own methods.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from selfsup.pretrain.methods import Method, register_method


@dataclass
class ToyConfig:
    dim: int = 16

    def check(self) -> None:
        if self.dim < 1:
            raise ValueError(f"method.toy.dim must be >= 1, got {self.dim}")


@register_method("toy", ToyConfig)
class Toy(Method):
    """Aligns two views' projections (a ~20-line method using only the contract)."""

    def __init__(self, cfg: ToyConfig, backbone: nn.Module, views, info) -> None:
        super().__init__(cfg, backbone, views, info)
        self.head = nn.Linear(backbone.feature_dim, cfg.dim)
        self.register_buffer("last_step", torch.zeros((), dtype=torch.long))

    def forward(self, images: torch.Tensor):
        v1, v2 = self.views(images, n_views=2)
        z1, z2 = F.normalize(self.head(self.backbone(torch.cat([v1, v2]))), dim=1).chunk(2)
        align = (z1 - z2).pow(2).sum(1).mean()
        spread = (z1 @ z1.T).pow(2).mean()  # keeps the projections from collapsing to one point
        return align + spread, {"align": align.detach()}

    def after_step(self, step: int, total_steps: int) -> None:
        self.last_step.fill_(step)


if __name__ == "__main__":
    from selfsup.launch.cli.main import main

    sys.exit(main(sys.argv[1:]))
