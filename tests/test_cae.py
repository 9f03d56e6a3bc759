"""Contractive autoencoder: the exact penalty and the random-projection estimator against
``torch.autograd.functional.jacobian`` (mean within a Monte-Carlo tolerance, variance as stated),
Rifai et al.'s closed form for a sigmoid layer, and a penalty that makes the encoder less
sensitive to input noise after a short optimisation."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from selfsup.config import load_config
from selfsup.data_info import DataInfo
from selfsup.pretrain.build import build_method
from selfsup.pretrain.methods.cae import jacobian_frobenius_estimate, jacobian_frobenius_exact

GRAY12 = DataInfo(channels=1, image_size=12, mean=(0.3,), std=(0.3,))


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3), nn.Sigmoid()).double()


def per_sample_jacobians(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``[B, k, d]``: the diagonal blocks of the batch map's Jacobian."""
    full = torch.autograd.functional.jacobian(net, x)  # [B, k, B, d]
    return torch.stack([full[b, :, b] for b in range(x.shape[0])])


def test_exact_penalty_equals_the_jacobians_frobenius_norm():
    net = small_net()
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    jac = per_sample_jacobians(net, x.detach())
    got = jacobian_frobenius_exact(net(x), x)
    torch.testing.assert_close(got, jac.square().sum((1, 2)).float(), rtol=1e-6, atol=0)
    got.sum().backward()  # kept in the graph: the penalty trains the encoder
    assert net[0].weight.grad is not None and net[0].weight.grad.abs().sum() > 0


def test_estimator_is_unbiased_with_the_stated_variance():
    net = small_net()
    x0 = torch.randn(3, 5, dtype=torch.float64)
    jac = per_sample_jacobians(net, x0)
    frob2 = jac.square().sum((1, 2))
    jtj = jac.transpose(1, 2) @ jac
    var = 2 * jtj.square().sum((1, 2))  # stated: Var = 2 ||J^T J||_F^2 per draw, Gaussian u
    draws = 40_000  # the images repeated: independent projections in one batched VJP
    x = x0.repeat(draws, 1).requires_grad_(True)
    est = jacobian_frobenius_estimate(net(x), x, generator=torch.Generator().manual_seed(0),
                                      create_graph=False).double().view(draws, 3)  # fmt: skip
    mean, sd = est.mean(0), est.std(0)
    assert torch.all((mean - frob2).abs() < 4 * var.sqrt() / math.sqrt(draws)), (mean, frob2)
    torch.testing.assert_close(sd.square(), var, rtol=0.05, atol=0)
    # several projections per call average: the variance falls by their number
    x4 = x0.repeat(draws // 4, 1).requires_grad_(True)
    est4 = jacobian_frobenius_estimate(net(x4), x4, projections=4, create_graph=False)
    torch.testing.assert_close(est4.double().view(-1, 3).var(0), var / 4, rtol=0.1, atol=0)


def cae(*overrides: str):
    cfg = load_config(None, ["method.name=cae", "model.backbone=resnet_small", "model.stem=cifar_s2",
                             "model.width=0.25", "augment.recipe=none", *overrides])  # fmt: skip
    return build_method(cfg, GRAY12)


def test_linear_sigmoid_cae_penalty_is_rifais_closed_form():
    """h = sigmoid(W x + b): ||J||_F^2 = sum_j (h_j (1 - h_j))^2 sum_i W_ji^2 (Rifai et al. 2011)."""
    method = cae("method.cae.linear=true", "method.cae.latent_dim=6", "method.cae.lam=1")
    x = torch.randint(0, 256, (5, 1, 12, 12), dtype=torch.uint8)
    _, logs = method(x)
    flat = method.views(x, n_views=1)[0].flatten(1)
    h = torch.sigmoid(method.head(flat))
    closed = ((h * (1 - h)) ** 2 * method.head.weight.square().sum(1)).sum(1).mean()
    torch.testing.assert_close(logs["jacobian_frob2"], closed.detach(), rtol=1e-5, atol=0)
    # the estimator agrees on average (same encoder, random projections)
    est = cae("method.cae.linear=true", "method.cae.latent_dim=6", "method.cae.jacobian=estimate",
              "method.cae.projections=2000")  # fmt: skip
    est.load_state_dict(method.state_dict())
    _, logs_est = est(x)
    torch.testing.assert_close(logs_est["jacobian_frob2"], closed.detach(), rtol=0.1, atol=0)


def sensitivity(method, x: torch.Tensor, noise: float = 0.05) -> float:
    """E ||f(x + d) - f(x)||^2 / E ||d||^2 over small Gaussian input noise d, in eval mode."""
    method.eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        clean = method.plain_views(x, n_views=1)[0]
        d = noise * torch.randn(clean.shape, generator=g)
        diff = method.mean_code(clean + d) - method.mean_code(clean)
    method.train()
    return (diff.square().sum() / d.square().sum()).item()


def test_penalty_lowers_the_encoders_sensitivity_to_input_noise():
    g = torch.Generator().manual_seed(0)
    low = torch.rand(16, 1, 4, 4, generator=g)
    x = (torch.nn.functional.interpolate(low, size=12, mode="bilinear") * 255).to(torch.uint8)
    result = {}
    for lam in (0.0, 10.0):
        torch.manual_seed(0)
        method = cae(f"method.cae.lam={lam}", "method.cae.latent_dim=8")
        opt = torch.optim.Adam(method.parameters(), lr=3e-3)
        for _ in range(20):
            loss, logs = method(x)
            opt.zero_grad()
            loss.backward()
            opt.step()
        result[lam] = (sensitivity(method, x), logs["jacobian_frob2"].item(), logs["recon"].item())
    (s0, j0, _), (s1, j1, _) = result[0.0], result[10.0]
    assert s1 < 0.5 * s0 and j1 < 0.5 * j0, result
