"""SimSiam without its stop-gradient and without its predictor (Chen & He 2021, section 4.1): the
two views' outputs are simply pulled together, and the trivial solution, one output for every
image, is reached within a short run. Registered here, not in the package: it exists to show the
collapse monitor fall (tests/test_simsiam.py runs it through the real CLI, as toy_method.py does).

The projector also loses its output BatchNorm. That BN holds every output dimension's batch
variance at 1, so the outputs can only collapse once the pre-BN variance of most dimensions has
shrunk far below BN's epsilon: measured here (small ResNet, batch 64, SGD), ``collapse_std`` was
still 0.93 after 60 steps at lr 0.1 and 0.76 after 150 steps at lr 1.0 with it, against 0.09
after 20 steps at lr 0.5 without it (loss -0.994, i.e. the two views' outputs identical).

    python tests/collapse_method.py pretrain method.name=simsiam_collapse ...
"""

from __future__ import annotations

import sys

from selfsup.pretrain.methods import register_method
from selfsup.pretrain.methods.siamese import mlp
from selfsup.pretrain.methods.simsiam import SimSiam, SimSiamConfig


@register_method("simsiam_collapse", SimSiamConfig)
class CollapsingSimSiam(SimSiam):
    """SimSiam with neither stop-gradient nor predictor: collapses (the paper's ablation)."""

    stop_gradient = False
    use_predictor = False

    def __init__(self, cfg: SimSiamConfig, backbone, views, info) -> None:
        super().__init__(cfg, backbone, views, info)
        self.projector = mlp(backbone.feature_dim, cfg.proj_hidden, cfg.proj_out, cfg.proj_layers)


if __name__ == "__main__":
    from selfsup.launch.cli.main import main

    sys.exit(main(sys.argv[1:]))
