"""The linear autoencoder spans the top-p principal subspace (Baldi & Hornik 1989; the lecture's SVD
result: W' = U_{:,1:p} Σ_{1:p}), as a property of the ``ae`` method with ``method.ae.linear=true``:

- fitted to convergence in-process (L-BFGS, fp64) on the method's own encoder, decoder and
  per-image loss, its reconstruction error is exactly what the best rank-p approximation leaves
  (Eckart-Young), and its decoder's columns span the top-p right singular vectors;
- trained by the real loop through ``selfsup pretrain`` (AdamW, a few hundred steps) on a shard set
  of low-rank 8x8 images, its decoder spans the top-p principal subspace of the normalised
  training images to within a few milliradians.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.linalg import subspace_angles

from selfsup.config import load_config
from selfsup.data_info import DataInfo
from selfsup.pretrain.build import build_method
from selfsup.pretrain.data.datasets import ArraySource
from selfsup.pretrain.data.shards import ShardOptions, write_shards
from selfsup.pretrain.run.rundir import (
    latest_checkpoint,
    load_checkpoint,
    read_config,
    read_data_info,
)

SIDE = 4  # in-process: images of 1 x 4 x 4 = 16 values
INFO = DataInfo(channels=1, image_size=SIDE, mean=(0.0,), std=(1.0,))


def data_matrix(n: int = 300, d: int = SIDE * SIDE, seed: int = 0) -> np.ndarray:
    """Centred data with well-separated variances along a random orthonormal basis."""
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.normal(size=(d, d)))
    scales = np.geomspace(5.0, 0.1, d)
    x = rng.normal(size=(n, d)) * scales @ basis.T
    return x - x.mean(axis=0)


def linear_ae(p: int):
    cfg = load_config(None, ["method.name=ae", "method.ae.linear=true", f"method.ae.latent_dim={p}",
                             "model.backbone=resnet_small", "model.width=0.25", "augment.recipe=none"])  # fmt: skip
    torch.manual_seed(0)
    return build_method(cfg, INFO).double()


@cache
def fitted(p: int = 3) -> tuple[np.ndarray, float]:
    """Decoder matrix [d, p] and final per-image loss of the method's linear AE fitted to the data."""
    x = torch.from_numpy(data_matrix()).view(-1, 1, SIDE, SIDE)
    method = linear_ae(p)
    params = [method.head.weight, method.head.bias, *method.decoder.parameters()]
    opt = torch.optim.LBFGS(params, lr=1.0, max_iter=500, tolerance_grad=1e-12,
                            tolerance_change=1e-15, history_size=50, line_search_fn="strong_wolfe")  # fmt: skip

    def loss() -> torch.Tensor:  # the method's own code, decoder and per-image loss (sum of squares)
        return method.recon_per_image(method.decoder(method.mean_code(x)), method.target(x)).mean()

    def closure() -> torch.Tensor:
        opt.zero_grad()
        value = loss()
        value.backward()
        return value

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 300 x 16 matrices: thread hand-offs would cost more than the maths
    try:
        opt.step(closure)
    finally:
        torch.set_num_threads(threads)
    with torch.no_grad():
        return method.decoder.linear.weight.detach().numpy(), loss().item()


def test_linear_autoencoder_spans_top_principal_components():
    x = data_matrix()
    p = 3
    _, s, vt = np.linalg.svd(x, full_matrices=False)
    decoder, loss = fitted(p)
    angles = subspace_angles(decoder, vt[:p].T)
    assert np.max(angles) < 1e-4, angles
    # and the error per image is exactly what the best rank-p approximation leaves (Eckart-Young)
    np.testing.assert_allclose(loss, (s[p:] ** 2).sum() / x.shape[0], rtol=1e-6)


def test_wrong_subspace_is_detected():
    """The angle check can fail: the next-p components are at right angles to the top-p ones."""
    x = data_matrix()
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    decoder, _ = fitted(3)
    assert np.min(subspace_angles(decoder, vt[3:6].T)) > 1.5


def low_rank_images(n: int = 2048, side: int = 8, k: int = 3, seed: int = 0) -> np.ndarray:
    """uint8 [n, side, side, 1]: grey 128 + k components of std 24/16/10 levels per pixel + noise."""
    rng = np.random.default_rng(seed)
    d = side * side
    basis, _ = np.linalg.qr(rng.normal(size=(d, d)))
    coeffs = rng.normal(size=(n, k)) * np.array([24.0, 16.0, 10.0])[:k]
    x = 128 + coeffs @ basis[:, :k].T * side + rng.normal(size=(n, d)) * 1.5
    return np.clip(np.round(x), 0, 255).astype(np.uint8).reshape(n, side, side, 1)


@pytest.mark.slow
def test_linear_ae_trained_by_the_cli_spans_the_principal_subspace(tmp_path: Path):
    images = low_rank_images()
    n, p = images.shape[0], 3
    shards, run = tmp_path / "shards", tmp_path / "run"
    src = ArraySource("pca", images, np.zeros(n, dtype=int), ["image"])
    write_shards(iter(src), shards, src.classes, ShardOptions(samples_per_shard=512, progress=False))
    cmd = [sys.executable, "-m", "selfsup.launch.cli", "pretrain", f"data.train={shards}",
           f"run_dir={run}", "method.name=ae", "method.ae.linear=true", f"method.ae.latent_dim={p}",
           "model.backbone=resnet_small", "model.width=0.25", "augment.recipe=none",
           "optim.name=adamw", "optim.base_lr=4e-2", "optim.weight_decay=0", "data.batch_size=128",
           "data.workers=0", "train.precision=fp32", "train.max_steps=200", "train.log_every=50",
           "train.checkpoint_every=0", "log.wandb=off", "log.progress=false"]  # fmt: skip
    r = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                       text=True, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    info = json.loads((run / "data_info.json").read_text())
    x = (images.reshape(n, -1) / 255.0 - info["mean"][0]) / info["std"][0]  # what the AE saw
    _, s, vt = np.linalg.svd(x - x.mean(0), full_matrices=False)
    model = load_checkpoint(latest_checkpoint(run / "checkpoints"))["model"]
    decoder = model["decoder.linear.weight"].double().numpy()  # [d, p]
    angles = subspace_angles(decoder, vt[:p].T)
    assert np.max(angles) < 0.02, (angles, s[: p + 2])
    assert np.min(subspace_angles(decoder, vt[p : 2 * p].T)) > 1.5  # not just any subspace
    # the backbone was bypassed: frozen at its initialisation (the loop seeds it with train.seed)
    torch.manual_seed(0)
    fresh = build_method(read_config(run), read_data_info(run)).state_dict()
    assert all(torch.equal(fresh[k], v) for k, v in model.items() if k.startswith("backbone."))
    assert (run / "latent_scatter.png").is_file()  # a 3-dim code is drawn (one class here)
