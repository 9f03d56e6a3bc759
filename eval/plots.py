"""Figures a person reads at a glance: 2-D embeddings coloured by class, and retrieval grids.

PCA is the default projection (deterministic, seconds); t-SNE (sklearn) or UMAP (``umap-learn``,
optional) when asked, on a seeded subsample because both scale badly with N.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from sklearn.decomposition import PCA  # noqa: E402
from sklearn.manifold import TSNE  # noqa: E402

from selfsup.eval.knn import as_numpy  # noqa: E402

PROJECTIONS = ("pca", "tsne", "umap")


def project_2d(
    feats: torch.Tensor | np.ndarray, method: str = "pca", seed: int = 0
) -> np.ndarray:
    """``[N, 2]`` projection of ``[N, D]`` features by PCA, t-SNE or UMAP."""
    x = as_numpy(feats).astype(np.float32)
    if x.ndim != 2 or x.shape[0] < 3:
        raise ValueError(f"need [N >= 3, D] features to project, got shape {x.shape}")
    if method == "pca":
        return PCA(n_components=2, random_state=seed).fit_transform(x)
    if method == "tsne":
        x50 = PCA(n_components=min(50, *x.shape), random_state=seed).fit_transform(x)
        perplexity = float(min(30, (x.shape[0] - 1) / 3))
        return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed)\
            .fit_transform(x50)
    if method == "umap":
        try:
            import umap
        except ImportError as e:
            raise ImportError("--plot umap needs the optional package: pip install umap-learn") from e
        return umap.UMAP(n_components=2, random_state=seed).fit_transform(x)
    raise ValueError(f"unknown projection '{method}' (choose from {', '.join(PROJECTIONS)})")


def subsample(n: int, max_points: int, seed: int = 0) -> np.ndarray:
    """Sorted seeded subset of ``range(n)`` with at most ``max_points`` indices."""
    if n <= max_points:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, max_points, replace=False))


def plot_embeddings(
    panels: dict[str, tuple[np.ndarray, np.ndarray]],
    classes: Sequence[str],
    path: str | Path,
    title: str = "",
) -> Path:
    """One scatter panel per model (``name -> (xy [N,2], labels [N])``), shared legend, PNG."""
    if not panels:
        raise ValueError("no embeddings to plot")
    n = len(panels)
    fig, axes = plt.subplots(1, n, figsize=(4.5 * n, 4.5), squeeze=False)
    cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
    for ax, (name, (xy, labels)) in zip(axes[0], panels.items(), strict=True):
        lab = as_numpy(labels).astype(np.int64)
        for c in np.unique(lab):
            m = lab == c
            ax.scatter(xy[m, 0], xy[m, 1], s=3, alpha=0.6, color=cmap(int(c) % cmap.N),
                       label=classes[c] if c < len(classes) else str(c))
        ax.set_title(name)
        ax.set_xticks([])
        ax.set_yticks([])
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, loc="center right", markerscale=4, fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 0.88, 1))
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _to_hwc(img: torch.Tensor | np.ndarray) -> np.ndarray:
    a = as_numpy(img)
    if a.ndim == 3 and a.shape[0] in (1, 3):
        a = np.transpose(a, (1, 2, 0))
    return a[..., 0] if a.ndim == 3 and a.shape[-1] == 1 else a


def plot_neighbours(
    query: torch.Tensor | np.ndarray,
    neighbours: Sequence[torch.Tensor | np.ndarray],
    captions: Sequence[str],
    path: str | Path,
) -> Path:
    """Query image then its nearest items left to right, each captioned (uint8 [C,H,W] or HWC)."""
    n = len(neighbours) + 1
    fig, axes = plt.subplots(1, n, figsize=(1.6 * n, 2.0), squeeze=False)
    for ax, img, cap in zip(axes[0], [query, *neighbours], ["query", *captions], strict=True):
        a = _to_hwc(img)
        ax.imshow(a, cmap="gray" if a.ndim == 2 else None, vmin=0, vmax=255)
        ax.set_title(cap, fontsize=7)
        ax.axis("off")
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
