"""SimSiam (Chen & He 2021, "Exploring simple Siamese representation learning"): BYOL without the
momentum network; the stop-gradient alone keeps the representation from collapsing.

One backbone for both views -> projector (3-layer MLP, BN after every Linear, the output BN
without scale and shift; 2048-d) -> predictor (bottleneck MLP 2048 -> 512 -> 2048, BN on the hidden
layer only). With ``z = projector(backbone(v))``, ``p = predictor(z)`` and ``sg`` = stop-gradient:

    L = -1/2 [ mean_b cos(p1, sg(z2)) + mean_b cos(p2, sg(z1)) ]      (in [-1, 1])

The paper trains the predictor at a fixed learning rate while the rest follows the cosine
schedule (its table 1 / the reference code's ``--fix-pred-lr``): ``fixed_predictor_lr`` puts
``predictor.*`` in an optimiser group the schedule leaves alone (``param_groups_options``).

The two ablations of the paper's section 4.1 are class attributes, not config keys: a subclass
flips them (tests/collapse_method.py does, to show the collapse monitor ``collapse_std`` fall;
with the stop-gradient it stays near 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from selfsup.augment.views import Views
from selfsup.data_info import DataInfo
from selfsup.pretrain.methods.base import COLLAPSE_LOG, Logs, Method
from selfsup.pretrain.methods.registry import register_method
from selfsup.pretrain.methods.siamese import collapse_std, cosine, mlp


@dataclass
class SimSiamConfig:
    proj_hidden: int = 2048
    proj_out: int = 2048
    proj_layers: int = 3  # the paper's ImageNet projector; its CIFAR experiments use 2
    pred_hidden: int = 512
    fixed_predictor_lr: bool = True  # the predictor keeps the initial lr (no warmup/decay)
    sync_head_bn: bool = True  # heads' BN over the global batch when there are several processes

    def check(self) -> None:
        for key in ("proj_hidden", "proj_out", "proj_layers", "pred_hidden"):
            if getattr(self, key) < 1:
                raise ValueError(f"method.simsiam.{key} must be >= 1, got {getattr(self, key)}")


def simsiam_loss(p1: Tensor, p2: Tensor, z1: Tensor, z2: Tensor, stop_gradient: bool = True) -> Tensor:
    """``-1/2 [cos(p1, sg(z2)) + cos(p2, sg(z1))]`` averaged over the batch; without
    ``stop_gradient`` (the paper's collapsing ablation) the gradient also flows through ``z``."""
    if stop_gradient:
        z1, z2 = z1.detach(), z2.detach()
    return -0.5 * (cosine(p1, z2).mean() + cosine(p2, z1).mean())


@register_method("simsiam", SimSiamConfig)
class SimSiam(Method):
    """SimSiam: shared backbone + projector, a predictor, negative cosine with stop-gradient."""

    stop_gradient: ClassVar[bool] = True  # False only in the collapse demonstration
    use_predictor: ClassVar[bool] = True  # False only in the collapse demonstration
    exported: ClassVar[str] = (
        "the backbone (`backbone.*`, shared by both views); projector and predictor are dropped"
    )

    def __init__(self, cfg: SimSiamConfig, backbone: nn.Module, views: Views, info: DataInfo):
        super().__init__(cfg, backbone, views, info)
        cfg.check()
        sync = cfg.sync_head_bn
        self.projector = mlp(backbone.feature_dim, cfg.proj_hidden, cfg.proj_out, cfg.proj_layers,
                             last_bn=True, last_bn_affine=False, sync_bn=sync)  # fmt: skip
        self.predictor = (
            mlp(cfg.proj_out, cfg.pred_hidden, cfg.proj_out, 2, sync_bn=sync)
            if self.use_predictor else nn.Identity()
        )  # fmt: skip

    def param_groups_options(self) -> dict[str, dict[str, Any]]:
        if self.cfg.fixed_predictor_lr and self.use_predictor:
            return {"predictor.": {"fixed_lr": True}}
        return {}

    def loss_from_views(self, v1: Tensor, v2: Tensor) -> tuple[Tensor, Logs]:
        """Loss of two aligned batches of float views; each view is its own forward pass."""
        z1, z2 = self.projector(self.backbone(v1)), self.projector(self.backbone(v2))
        p1, p2 = self.predictor(z1), self.predictor(z2)
        loss = simsiam_loss(p1, p2, z1, z2, stop_gradient=self.stop_gradient)
        return loss, {"loss": loss.detach(), COLLAPSE_LOG: collapse_std(torch.cat([z1, z2]))}

    def forward(self, images: Tensor) -> tuple[Tensor, Logs]:
        return self.loss_from_views(*self.make_views(images))
