"""Barlow Twins: the cross-correlation and loss against a written-out formula and closed forms,
the projector's shape, the logs and fp32 statistics under autocast, bad config values named, and
(slow) a SIGKILLed run resumed bitwise. The 2-process checks are in tests/test_vicreg_barlow_ddp.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from methodkit import gray, seeded_method
from torch import nn

from selfsup.config import ConfigError, load_config
from selfsup.pretrain.distributed import AllReduceBatchNorm1d
from selfsup.pretrain.methods.barlow_twins import (
    BarlowTwins,
    BarlowTwinsConfig,
    barlow_twins_loss,
    cross_correlation,
)

INFO = gray(12)
SMALL = ["method.name=barlow_twins", "model.backbone=resnet_small", "model.stem=cifar_s2", "model.width=0.25",
         "method.barlow_twins.proj_hidden=32", "method.barlow_twins.proj_out=16"]  # fmt: skip


def _model(*extra: str) -> BarlowTwins:
    return seeded_method(BarlowTwins, [*SMALL, *extra], INFO)


def _formula(z1: torch.Tensor, z2: torch.Tensor, lambd: float, eps: float = 1e-5) -> tuple[list, float]:
    """C and the loss written out element by element (biased variance, as BatchNorm)."""
    n, d = z1.shape

    def standardise(z):
        m = [sum(z[b, i] for b in range(n)) / n for i in range(d)]
        v = [sum((z[b, i] - m[i]) ** 2 for b in range(n)) / n for i in range(d)]
        return [[(z[b, i] - m[i]) / (v[i] + eps) ** 0.5 for i in range(d)] for b in range(n)]

    a, b = standardise(z1), standardise(z2)
    c = [[sum(a[k][i] * b[k][j] for k in range(n)) / n for j in range(d)] for i in range(d)]
    loss = sum((1 - c[i][i]) ** 2 for i in range(d)) + lambd * sum(
        c[i][j] ** 2 for i in range(d) for j in range(d) if i != j)  # fmt: skip
    return c, float(loss)


def test_loss_equals_the_written_out_formula() -> None:
    g = torch.Generator().manual_seed(0)
    z1 = torch.randn(7, 4, generator=g, dtype=torch.float64)
    z2 = z1 + 0.5 * torch.randn(7, 4, generator=g, dtype=torch.float64)
    c = cross_correlation(z1, z2)
    want_c, want = _formula(z1, z2, 5e-3)
    torch.testing.assert_close(c, torch.tensor(want_c, dtype=torch.float64), rtol=1e-12, atol=1e-14)
    loss, on, off = barlow_twins_loss(c, 5e-3)
    assert loss.item() == pytest.approx(want, rel=1e-12) and on > 0 and off > 0
    # the reference code's standardisation: BatchNorm1d(D, affine=False) in training mode
    bn = nn.BatchNorm1d(4, affine=False).double()
    torch.testing.assert_close(c, bn(z1).T @ bn(z2) / 7, rtol=1e-12, atol=1e-14)


def test_closed_forms_on_orthogonal_columns() -> None:
    """+-1 orthogonal zero-mean columns: C = I / (1 + eps) for z2 = z1 (loss D (eps/(1+eps))^2),
    C = -I / (1 + eps) for z2 = -z1 (loss D (1 + 1/(1+eps))^2); any scale of z gives the same."""
    eps, d = 1e-5, 2
    z = 3.0 * torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]], dtype=torch.float64)
    want = torch.eye(2, dtype=torch.float64) * 9 / (9 + eps)  # variance 9
    torch.testing.assert_close(cross_correlation(z, z), want, rtol=1e-14, atol=1e-15)
    z = z / 3.0  # unit variance: the eps enters exactly as below
    assert barlow_twins_loss(cross_correlation(z, z), 5e-3)[0].item() == pytest.approx(d * (eps / (1 + eps)) ** 2, rel=1e-9)
    assert barlow_twins_loss(cross_correlation(z, -z), 5e-3)[0].item() == pytest.approx(d * (1 + 1 / (1 + eps)) ** 2, rel=1e-12)


def test_lambda_per_dim_and_scale() -> None:
    cfg = load_config(None, [*SMALL, "method.barlow_twins.lambd_per_dim=true"]).method.barlow_twins
    assert cfg.off_diagonal_weight() == 1 / 16
    assert BarlowTwinsConfig().off_diagonal_weight() == 5e-3
    model = _model("method.barlow_twins.scale_loss=0.1")
    images = torch.randint(0, 256, (6, 1, 12, 12), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(5)
    loss, logs = model(images)
    assert loss.item() == pytest.approx(0.1 * (logs["on_diag"] + 5e-3 * logs["off_diag"]).item(), rel=1e-6)


def test_projector_follows_the_reference_and_statistics_are_fp32_under_autocast() -> None:
    model = _model()
    assert [type(m) for m in model.projector] == [nn.Linear, AllReduceBatchNorm1d, nn.ReLU] * 2 + [nn.Linear]
    assert all(m.bias is None for m in model.projector if isinstance(m, nn.Linear))
    images = torch.randint(0, 256, (6, 1, 12, 12), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = model.projector(model.backbone(model.make_views(images)[0]))
        assert z.dtype == torch.bfloat16
        assert cross_correlation(z, z).dtype == torch.float32
        loss, logs = model(images)
    assert loss.dtype == torch.float32
    assert set(logs) == {"loss", "on_diag", "off_diag", "collapse_std"}
    assert all(v.dim() == 0 for v in logs.values()) and 0.2 < float(logs["collapse_std"]) < 1.5
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize(("overrides", "message"), [
    (["method.barlow_twins.proj_out=0"], "method.barlow_twins.proj_out must be >= 1"),
    (["method.barlow_twins.lambd=-0.1"], "method.barlow_twins.lambd must be >= 0"),
    (["method.barlow_twins.scale_loss=0"], "method.barlow_twins.scale_loss must be > 0"),
    (["method.barlow_twins.eps=0"], "method.barlow_twins.eps must be > 0"),
    (["method.barlow_twins.lambd_per_dim=true", "method.barlow_twins.lambd=0.01"], "leave method.barlow_twins.lambd unset"),
])  # fmt: skip
def test_bad_config_values_name_the_key(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, [*SMALL, *overrides])


@pytest.mark.slow  # three short CLI runs
def test_sigkill_then_resume_is_bitwise(tmp_path: Path, small_shards: str) -> None:
    from resume_check import kill_resume_is_bitwise

    rows = kill_resume_is_bitwise(tmp_path, small_shards, *SMALL)
    assert all({"on_diag", "off_diag", "collapse_std"} <= set(r) for r in rows)
