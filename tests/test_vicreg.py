"""VICReg: the loss against a written-out formula and a closed form, the expander's shape, the
logs, bad config values named, and (slow) a SIGKILLed run resumed bitwise. The 2-process checks
are in tests/test_vicreg_barlow_ddp.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from methodkit import gray, seeded_method
from torch import nn

from selfsup.config import ConfigError, load_config
from selfsup.pretrain.distributed import AllReduceBatchNorm1d
from selfsup.pretrain.methods.vicreg import (
    VICReg,
    VICRegConfig,
    off_diagonal,
    vicreg_loss,
    vicreg_terms,
)

INFO = gray(12)
SMALL = ["method.name=vicreg", "model.backbone=resnet_small", "model.stem=cifar_s2", "model.width=0.25",
         "method.vicreg.expander_hidden=32", "method.vicreg.expander_out=16"]  # fmt: skip


def _model(*extra: str) -> VICReg:
    return seeded_method(VICReg, [*SMALL, *extra], INFO)


def _formula(z1: torch.Tensor, z2: torch.Tensor, eps: float = 1e-4) -> tuple[float, float, float]:
    """The reference code's terms written out element by element."""
    n, d = z1.shape
    inv = sum((z1[i, j] - z2[i, j]) ** 2 for i in range(n) for j in range(d)) / (n * d)
    var = cov = 0.0
    for z in (z1, z2):
        m = [sum(z[i, j] for i in range(n)) / n for j in range(d)]
        c = [[sum((z[i, a] - m[a]) * (z[i, b] - m[b]) for i in range(n)) / (n - 1) for b in range(d)] for a in range(d)]
        var += sum(max(0.0, 1 - (c[j][j] + eps) ** 0.5) for j in range(d)) / d / 2
        cov += sum(c[a][b] ** 2 for a in range(d) for b in range(d) if a != b) / d
    return float(inv), float(var), float(cov)


def test_terms_equal_the_written_out_formula() -> None:
    g = torch.Generator().manual_seed(0)
    z1, z2 = (0.4 * torch.randn(6, 5, generator=g, dtype=torch.float64) for _ in range(2))
    t = vicreg_terms(z1, z2)
    inv, var, cov = _formula(z1, z2)
    assert t["invariance"].item() == pytest.approx(inv, rel=1e-12)
    assert t["variance"].item() == pytest.approx(var, rel=1e-12) and var > 0.1  # the hinge is active
    assert t["covariance"].item() == pytest.approx(cov, rel=1e-12) and cov > 0
    loss, _ = vicreg_loss(z1, z2, VICRegConfig())
    assert loss.item() == pytest.approx(25 * inv + 25 * var + cov, rel=1e-12)
    # torch's own unbiased covariance agrees with the off-diagonal term
    want = sum(off_diagonal(torch.cov(z.T)).pow(2).sum() / 5 for z in (z1, z2))
    torch.testing.assert_close(t["covariance"], want, rtol=1e-12, atol=0)


def test_closed_form_on_orthogonal_columns() -> None:
    """z1 = z2 = a * (+-1 columns, orthogonal, zero mean): invariance 0, covariance 0, and the
    variance term relu(1 - sqrt(4 a^2 / 3 + eps)) (unbiased variance of 4 rows of +-a)."""
    a = 0.5
    z = a * torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]], dtype=torch.float64)
    loss, t = vicreg_loss(z, z.clone(), VICRegConfig())
    assert t["invariance"].item() == 0 and t["covariance"].item() == 0
    assert loss.item() == pytest.approx(25 * (1 - (4 * a * a / 3 + 1e-4) ** 0.5), rel=1e-14)
    loss, t = vicreg_loss(2 * z, 2 * z, VICRegConfig())  # std above 1: no variance penalty
    assert loss.item() == 0


def test_off_diagonal_is_exactly_the_off_diagonal_entries() -> None:
    m = torch.arange(16.0).view(4, 4)
    assert torch.equal(off_diagonal(m), m[~torch.eye(4, dtype=torch.bool)])


def test_expander_follows_the_reference_and_the_loss_is_fp32_under_autocast() -> None:
    model = _model()
    assert [type(m) for m in model.expander] == [nn.Linear, AllReduceBatchNorm1d, nn.ReLU] * 2 + [nn.Linear]
    assert model.expander[-1].out_features == 16 and model.expander[-1].bias is None
    images = torch.randint(0, 256, (6, 1, 12, 12), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, logs = model(images)
    assert loss.dtype == torch.float32
    assert set(logs) == {"loss", "invariance", "variance", "covariance", "collapse_std"}
    assert all(v.dim() == 0 for v in logs.values()) and 0.2 < float(logs["collapse_std"]) < 1.5
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize(("override", "message"), [
    ("method.vicreg.expander_out=0", "method.vicreg.expander_out must be >= 1"),
    ("method.vicreg.expander_layers=0", "method.vicreg.expander_layers must be >= 1"),
    ("method.vicreg.std_coeff=-1", "method.vicreg.std_coeff must be >= 0"),
    ("method.vicreg.eps=0", "method.vicreg.eps must be > 0"),
])  # fmt: skip
def test_bad_config_values_name_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, [*SMALL, override])
    with pytest.raises(ConfigError, match="all 0"):
        load_config(None, [*SMALL, *(f"method.vicreg.{k}_coeff=0" for k in ("sim", "std", "cov"))])


@pytest.mark.slow  # three short CLI runs, two of them side by side
def test_sigkill_then_resume_is_bitwise(tmp_path: Path, small_shards: str) -> None:
    from resume_check import kill_resume_is_bitwise

    rows = kill_resume_is_bitwise(tmp_path, small_shards, *SMALL)
    assert all({"invariance", "variance", "covariance", "collapse_std"} <= set(r) for r in rows)
