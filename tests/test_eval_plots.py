"""2-D projections and figures: PCA equals sklearn-free SVD, t-SNE separates clusters, UMAP absent
is a clear error, PNGs are written."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from selfsup.eval.plots import plot_embeddings, plot_neighbours, project_2d, subsample


def _clusters(n=60, d=10, seed=0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    return rng.normal(size=(3, d))[y] * 5 + rng.normal(size=(n, d)), y


def test_pca_matches_svd_up_to_sign():
    x, _ = _clusters()
    xy = project_2d(x, "pca")
    xc = x - x.mean(0)
    _, _, vt = np.linalg.svd(xc, full_matrices=False)
    want = xc @ vt[:2].T
    for j in range(2):
        assert np.allclose(np.abs(xy[:, j]), np.abs(want[:, j]), atol=1e-3)


@pytest.mark.slow  # 20 s measured on the shared 2 cores
def test_tsne_keeps_clusters_apart():
    x, y = _clusters()
    xy = project_2d(x, "tsne")
    centers = np.stack([xy[y == c].mean(0) for c in range(3)])
    spread = max(np.linalg.norm(xy[y == c] - centers[c], axis=1).mean() for c in range(3))
    gaps = [np.linalg.norm(centers[a] - centers[b]) for a in range(3) for b in range(a + 1, 3)]
    assert min(gaps) > 2 * spread


@pytest.mark.skipif(importlib.util.find_spec("umap") is not None, reason="umap-learn installed")
def test_umap_without_package_says_how_to_install():
    with pytest.raises(ImportError, match="pip install umap-learn"):
        project_2d(_clusters()[0], "umap")


def test_bad_projection_and_figures(tmp_path):
    x, y = _clusters()
    with pytest.raises(ValueError, match="unknown projection 'svd'"):
        project_2d(x, "svd")
    png = plot_embeddings({"a": (project_2d(x), y), "b": (project_2d(-x), y)}, ["p", "q", "r"],
                          tmp_path / "e.png", "title")
    assert png.stat().st_size > 5000
    img = np.zeros((1, 8, 8), np.uint8)
    assert plot_neighbours(img, [img, img], ["x", "y"], tmp_path / "n.png").stat().st_size > 1000
    idx = subsample(100, 10, seed=1)
    assert len(idx) == 10 and np.all(np.diff(idx) > 0) and np.array_equal(subsample(5, 10), np.arange(5))
