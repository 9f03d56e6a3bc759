"""SimCLR multi-crop: the multi-positive InfoNCE against the formula written out, NT-Xent for two
views, and the small views of a uint8 batch (2 processes vs 1: tests/test_simclr.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_simclr import INFO, SIDE, TAU, _config

from selfsup.pretrain.build import build_method
from selfsup.pretrain.methods.simclr import info_nce, multi_crop_info_nce


def _naive_multi_crop(z: list[torch.Tensor], tau: float) -> torch.Tensor:
    """Multi-positive InfoNCE written out: for anchor (view a, image i) and each positive (view b,
    image i), b != a: -log(e^s / (e^s + sum of e^s' over every view of every other image))."""
    views, n = len(z), z[0].shape[0]
    unit = [F.normalize(v, dim=1) for v in z]
    losses = []
    for a in range(views):
        for i in range(n):
            negatives = sum(torch.exp(unit[a][i] @ unit[c][k] / tau)
                            for c in range(views) for k in range(n) if k != i)  # fmt: skip
            terms = [-torch.log(torch.exp(unit[a][i] @ unit[b][i] / tau)
                                / (torch.exp(unit[a][i] @ unit[b][i] / tau) + negatives))
                     for b in range(views) if b != a]  # fmt: skip
            losses.append(torch.stack(terms).mean())
    return torch.stack(losses).mean()


@pytest.mark.parametrize("views", [2, 3, 5])
def test_multi_crop_info_nce_matches_the_formula_and_is_nt_xent_for_two_views(views: int) -> None:
    g = torch.Generator().manual_seed(views)
    z = [torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(views)]
    out = multi_crop_info_nce(z, TAU)
    ref = _naive_multi_crop(z, TAU)
    torch.testing.assert_close(out.loss, ref, rtol=1e-12, atol=0)
    for a, b in zip(torch.autograd.grad(out.loss, z), torch.autograd.grad(ref, z), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    if views == 2:
        torch.testing.assert_close(out.loss, info_nce(*z, TAU).loss, rtol=1e-12, atol=0)
    # accuracy: identical views of each image make every top-1 a positive
    same = [torch.eye(4, 6, dtype=torch.float64)] * views
    assert multi_crop_info_nce(same, TAU).acc.item() == 1.0


def test_multi_crop_forward_on_uint8_images_uses_small_views() -> None:
    cfg = _config(extra=("method.simclr.small_crops=2", "method.simclr.small_size=6"))
    torch.manual_seed(0)
    model = build_method(cfg, INFO).train()
    assert model.small_views.size == 6 and tuple(model.small_views.cfg.scale) == (0.05, 0.3)
    images = torch.randint(0, 256, (4, 1, SIDE, SIDE), dtype=torch.uint8)
    loss, logs = model(images)
    loss.backward()
    assert torch.isfinite(loss) and set(logs) == {"loss", "acc", "pos_sim"}
    assert all(p.grad is not None for p in model.parameters())
