"""kNN accuracy of the backbone during pretraining (``eval.every_epochs``): a training hook that
``selfsup pretrain`` hands to the loop, so the loop itself knows nothing of evaluation."""

from __future__ import annotations

import torch

from selfsup.config import Config
from selfsup.eval.features import extract_features
from selfsup.eval.knn import knn_classify
from selfsup.pretrain.data.stream import ShardSet, load_arrays
from selfsup.pretrain.hooks import HookContext, TrainHook


class PeriodicKNN(TrainHook):
    """Every ``eval.every_epochs`` epochs: kNN top-1/top-5 of the current backbone's features on
    ``data.test`` against ``data.train``, logged as ``eval/knn_*`` at that step (rank 0; the other
    ranks wait at the loop's barrier)."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self._arrays = None

    @torch.no_grad()
    def on_epoch_end(self, ctx: HookContext) -> None:
        cfg = self.cfg
        if not ctx.is_main or ctx.epoch % cfg.eval.every_epochs:
            return
        if self._arrays is None:  # read once per run
            train_x, train_y, _ = load_arrays(ShardSet.open(cfg.data.train))
            test_x, test_y, _ = load_arrays(ShardSet.open(cfg.data.test))
            self._arrays = (train_x, train_y, test_x, test_y)
        train_x, train_y, test_x, test_y = self._arrays
        info = ctx.method.info
        kw = {"mean": info.mean, "std": info.std, "batch_size": cfg.eval.batch_size}
        f_train = extract_features(ctx.method.backbone, train_x, **kw)
        f_test = extract_features(ctx.method.backbone, test_x, **kw)
        res = knn_classify(f_train, train_y, f_test, test_y, k=tuple(cfg.eval.knn_k),
                           temperature=cfg.eval.knn_temperature)  # fmt: skip
        ctx.log.log(ctx.step, {f"eval/{k}": v for k, v in res.items() if isinstance(v, (int, float))})


def periodic_hooks(cfg: Config) -> list[TrainHook]:
    """The periodic kNN hook when the config asks for it (``eval.every_epochs`` and ``data.test``)."""
    return [PeriodicKNN(cfg)] if cfg.eval.every_epochs and cfg.data.test else []
