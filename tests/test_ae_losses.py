"""The autoencoder family's formulas against their definitions: robust losses (correntropy in Liu et
al.'s Gaussian-kernel form, Cauchy), BCE, multiplicative noise, the VAE's closed-form KL (against a
Monte-Carlo estimate and torch.distributions), the likelihoods, and the reparameterised gradients."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Bernoulli, Normal, kl_divergence

from selfsup.augment.corrupt import CorruptConfig, check_corrupt_config, corrupt
from selfsup.pretrain.methods.ae_losses import (
    bernoulli_log_likelihood,
    bits_per_dim,
    gaussian_kl,
    gaussian_log_likelihood,
    pixel_loss,
    reparameterize,
)
from selfsup.pretrain.methods.dae import reconstruction_loss


def pair(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, 1, 6, 6, generator=g) * 2, torch.randn(3, 1, 6, 6, generator=g)


def test_correntropy_is_one_minus_the_normalised_gaussian_kernel():
    a, b = pair()
    sigma = 0.7
    r = a - b
    # Liu, Pokharel & Principe 2007: kappa_sigma(e) = exp(-e^2 / (2 sigma^2)) / (sqrt(2 pi) sigma)
    kappa = torch.exp(-(r**2) / (2 * sigma**2)) / (math.sqrt(2 * math.pi) * sigma)
    kappa0 = 1 / (math.sqrt(2 * math.pi) * sigma)
    got = pixel_loss(a, b, "correntropy", correntropy_sigma=sigma)
    torch.testing.assert_close(got, 1 - kappa / kappa0)
    # the notes' exp(-r^2 / s) is the same kernel with s = 2 sigma^2
    torch.testing.assert_close(got, 1 - torch.exp(-(r**2) / (2 * sigma**2)))
    # bounded: an outlier residual costs at most 1, and its gradient vanishes
    big = torch.tensor([50.0], requires_grad=True)
    pixel_loss(big, torch.zeros(1), "correntropy", correntropy_sigma=sigma).sum().backward()
    assert big.grad.abs().item() < 1e-12
    assert pixel_loss(b, b, "correntropy").abs().max() == 0


def test_cauchy_and_bce_match_their_formulas():
    a, b = pair(1)
    c = 0.8
    torch.testing.assert_close(pixel_loss(a, b, "cauchy", cauchy_c=c), torch.log(1 + ((a - b) / c) ** 2))
    t = torch.rand(3, 1, 6, 6)
    p = torch.sigmoid(a)
    torch.testing.assert_close(pixel_loss(a, t, "bce"), -(t * p.log() + (1 - t) * (1 - p).log()))


def test_dae_accepts_the_robust_losses_and_names_bad_keys():
    a, b = pair(2)
    torch.testing.assert_close(reconstruction_loss(a, b, "cauchy", cauchy_c=2.0),
                               torch.log1p(((a - b) / 2) ** 2).mean())  # fmt: skip
    with pytest.raises(ValueError, match="method.dae.loss: 'bce'"):
        reconstruction_loss(a, b, "bce")  # the DAE's targets are normalised images
    with pytest.raises(ValueError, match="method.dae.correntropy_sigma"):
        reconstruction_loss(a, b, "correntropy", correntropy_sigma=0.0)


def test_multiplicative_noise_scales_intensities_about_black():
    g = torch.Generator().manual_seed(0)
    cfg = CorruptConfig(kind="multiplicative", sigma=0.2)
    check_corrupt_config(cfg)
    x = torch.full((64, 1, 16, 16), 3.0)
    eps = corrupt(x, cfg, g) / x  # about 0: x * eps
    assert abs(eps.mean().item() - 1.0) < 0.01 and abs(eps.std().item() - 0.2) < 0.01
    low = -1.0  # black in these units
    black = torch.full((2, 1, 4, 4), low)
    torch.testing.assert_close(corrupt(black, cfg, g, value_range=(low, 2.0)), black)
    x = torch.rand(8, 1, 5, 5) * 3 - 1
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    got = corrupt(x, cfg, g1, value_range=(low, 2.0))
    eps = 1 + 0.2 * torch.randn(x.shape, generator=g2)
    torch.testing.assert_close(got, low + (x - low) * eps)


def test_closed_form_kl_matches_monte_carlo_and_torch():
    g = torch.Generator().manual_seed(0)
    mu, logvar = torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randn(4, 3, generator=g, dtype=torch.float64)
    kl = gaussian_kl(mu, logvar)
    q, p = Normal(mu, (0.5 * logvar).exp()), Normal(torch.zeros_like(mu), torch.ones_like(mu))
    torch.testing.assert_close(kl, kl_divergence(q, p).sum(1))
    z = reparameterize(mu.expand(200_000, 4, 3), logvar.expand(200_000, 4, 3),
                       torch.Generator().manual_seed(1))  # fmt: skip
    mc_terms = (q.log_prob(z) - p.log_prob(z)).sum(2)  # [draws, 4]
    mc, se = mc_terms.mean(0), mc_terms.std(0) / math.sqrt(z.shape[0])
    assert torch.all((mc - kl).abs() < 4 * se + 1e-3), (mc, kl, se)


def test_kl_of_the_prior_is_zero():
    zeros = torch.zeros(5, 7)
    assert torch.equal(gaussian_kl(zeros, zeros), torch.zeros(5))
    assert torch.all(gaussian_kl(torch.full((5, 7), 0.1), zeros) > 0)


def test_reparameterised_gradients_match_the_analytic_ones():
    """E[z] = mu, E[z^2] = mu^2 + sigma^2: d/dmu = 1 and 2 mu; d/dlogvar = 0 and sigma^2."""
    n = 400_000
    mu = torch.tensor([0.7, -1.2], dtype=torch.float64, requires_grad=True)
    logvar = torch.tensor([-0.5, 0.8], dtype=torch.float64, requires_grad=True)
    z = reparameterize(mu.expand(n, 2), logvar.expand(n, 2), torch.Generator().manual_seed(3))
    g_mu1, g_lv1 = torch.autograd.grad(z.mean(0).sum(), (mu, logvar), retain_graph=True)
    g_mu2, g_lv2 = torch.autograd.grad(z.square().mean(0).sum(), (mu, logvar))
    sigma2 = logvar.detach().exp()
    torch.testing.assert_close(g_mu1, torch.ones(2, dtype=torch.float64))
    assert g_lv1.abs().max() < 5 / math.sqrt(n)  # 0.5 * sigma * mean(eps): zero in expectation
    torch.testing.assert_close(g_mu2, 2 * mu.detach(), atol=6 * (sigma2.sqrt() * 2 / math.sqrt(n)).max().item(), rtol=0)
    torch.testing.assert_close(g_lv2, sigma2, atol=0, rtol=0.02)


def test_likelihoods_match_torch_distributions_and_bits_per_dim():
    g = torch.Generator().manual_seed(0)
    mean, target = torch.randn(2, 1, 3, 3, generator=g), torch.randn(2, 1, 3, 3, generator=g)
    log_sigma = torch.tensor(-0.3)
    want = Normal(mean, log_sigma.exp()).log_prob(target).flatten(1).sum(1)
    torch.testing.assert_close(gaussian_log_likelihood(mean, target, log_sigma), want)
    logits, t = torch.randn(2, 1, 3, 3, generator=g), torch.randint(0, 2, (2, 1, 3, 3), generator=g).float()
    want = Bernoulli(logits=logits).log_prob(t).flatten(1).sum(1)
    torch.testing.assert_close(bernoulli_log_likelihood(logits, t), want)
    # 784 dims at log 2 nats each = 1 bit per dim
    assert bits_per_dim(torch.tensor(784 * math.log(2)), 784).item() == pytest.approx(1.0)
