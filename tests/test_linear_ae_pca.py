"""A linear autoencoder trained to convergence spans the top-p principal subspace (Baldi & Hornik
1989; the lecture's SVD result). The encoder/decoder are plain matrices, but the loss and the
corruption step are the DAE's own, with ``corrupt.kind: none`` (the plain undercomplete AE)."""

from __future__ import annotations

from functools import cache

import numpy as np
import torch
from scipy.linalg import subspace_angles

from selfsup.augment.corrupt import CorruptConfig, corrupt
from selfsup.pretrain.methods.dae import reconstruction_loss


def data_matrix(n: int = 300, d: int = 10, seed: int = 0) -> np.ndarray:
    """Centred data with well-separated variances along a random orthonormal basis."""
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.normal(size=(d, d)))
    scales = np.array([5.0, 4.0, 3.0, 1.0, 0.8, 0.6, 0.5, 0.4, 0.3, 0.2])[:d]
    x = rng.normal(size=(n, d)) * scales @ basis.T
    return x - x.mean(axis=0)


@cache
def trained_decoder(p: int = 3, seed: int = 0) -> tuple[np.ndarray, float]:
    """Decoder matrix [d, p] and final loss of a linear AE fitted to ``data_matrix()``."""
    x = data_matrix()
    torch.manual_seed(seed)
    data = torch.from_numpy(x).view(x.shape[0], 1, 1, x.shape[1])  # images of 1 x 1 x d pixels
    d = x.shape[1]
    enc = torch.nn.Parameter(torch.randn(p, d, dtype=torch.float64) * 0.1)
    dec = torch.nn.Parameter(torch.randn(d, p, dtype=torch.float64) * 0.1)
    opt = torch.optim.LBFGS(
        [enc, dec],
        lr=1.0,
        max_iter=500,
        tolerance_grad=1e-12,
        tolerance_change=1e-15,
        history_size=50,
        line_search_fn="strong_wolfe",
    )
    noise_free = CorruptConfig(kind="none")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        recon = corrupt(data, noise_free) @ enc.T @ dec.T
        loss = reconstruction_loss(recon, data, "mse")
        loss.backward()
        return loss

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 300 x 10 matrices: thread hand-offs would cost more than the maths
    try:
        opt.step(closure)
    finally:
        torch.set_num_threads(threads)
    with torch.no_grad():
        final = reconstruction_loss(data @ enc.T @ dec.T, data, "mse").item()
    return dec.detach().numpy(), final


def test_linear_autoencoder_spans_top_principal_components():
    x = data_matrix()
    p = 3
    _, s, vt = np.linalg.svd(x, full_matrices=False)
    decoder, loss = trained_decoder(p)
    angles = subspace_angles(decoder, vt[:p].T)
    assert np.max(angles) < 1e-4, angles
    # and the error is exactly what the best rank-p approximation leaves (Eckart-Young)
    np.testing.assert_allclose(loss, (s[p:] ** 2).sum() / x.size, rtol=1e-6)


def test_wrong_subspace_is_detected():
    """The angle check can fail: the next-p components are at right angles to the top-p ones."""
    x = data_matrix()
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    decoder, _ = trained_decoder(3)
    assert np.min(subspace_angles(decoder, vt[3:6].T)) > 1.5
