"""Anomaly detection by held-out class: AUROC of kNN-distance and reconstruction-error scores.

Protocol (course notes): one class is held out of the *reference* set and treated as the anomaly;
a test image's score should be higher for the held-out class than for the rest. kNN score:
``1 − mean cosine similarity`` to its k nearest normal training items (works for every method).
Reconstruction score: per-image error of an autoencoder's reconstruction, taken from the method's
``anomaly_score`` when it has one (MAE: squared error over the hidden patches in its training
target space, which with ``norm_pix_loss`` is the per-patch standardised pixels: de-normalising
the prediction with the true patch statistics would let the score read the answer), else the
mean squared error between ``reconstruct()``'s reconstruction and input (DAE). The
autoencoder was pretrained on all classes (retraining one per held-out class is out of budget), so
this measures how much worse an unusual class is reconstructed, stated as such in the report.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy.stats import rankdata
from torch import nn

from selfsup.eval.knn import _check_labels, as_numpy, build_index, l2_normalize, search


def auroc(scores: torch.Tensor | np.ndarray, is_anomaly: torch.Tensor | np.ndarray) -> float:
    """Area under the ROC curve = P(score of a random anomaly > score of a random normal), ties ½.

    Computed as the Mann-Whitney U statistic from mid-ranks, so ties are handled exactly.
    """
    s = as_numpy(scores).astype(np.float64).reshape(-1)
    y = as_numpy(is_anomaly).astype(bool).reshape(-1)
    if s.shape != y.shape:
        raise ValueError(f"{s.size} scores but {y.size} anomaly flags")
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(
            "AUROC needs both anomalies and normal samples in the test set "
            f"(got {n_pos} anomalies, {n_neg} normal)"
        )
    if not np.all(np.isfinite(s)):
        raise ValueError("anomaly scores contain NaN or infinity")
    ranks = rankdata(s)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def knn_scores(
    reference_feats: torch.Tensor | np.ndarray, query_feats: torch.Tensor | np.ndarray, k: int = 5
) -> np.ndarray:
    """``1 − mean cosine similarity`` of each query to its ``k`` nearest reference rows."""
    index = build_index(reference_feats)
    sims, _ = search(index, l2_normalize(query_feats), k)
    return 1.0 - sims.mean(axis=1)


def knn_anomaly_auroc(
    train_feats: torch.Tensor | np.ndarray,
    train_labels: torch.Tensor | np.ndarray,
    test_feats: torch.Tensor | np.ndarray,
    test_labels: torch.Tensor | np.ndarray,
    anomaly_classes: Sequence[int] | None = None,
    k: int = 5,
) -> dict[int, float]:
    """AUROC per held-out class: that class removed from the reference set, flagged in the test set."""
    tr = l2_normalize(train_feats)
    te = l2_normalize(test_feats)
    ytr = _check_labels(tr, train_labels, "train")
    yte = _check_labels(te, test_labels, "test")
    classes = sorted(set(np.unique(yte).tolist())) if anomaly_classes is None else anomaly_classes
    out: dict[int, float] = {}
    for c in classes:
        normal = ytr != c
        if not normal.any():
            raise ValueError(f"anomaly class {c}: no training items of any other class")
        out[int(c)] = auroc(knn_scores(tr[normal], te, k), yte == c)
    return out


def reconstruction_scores(
    method: nn.Module, images_uint8: torch.Tensor, batch_size: int = 256,
    device: torch.device | str | None = None, seed: int = 0,
) -> np.ndarray:
    """Per-image ``method.anomaly_score`` (the method contract's hook; by default the mean squared
    reconstruction error in [0, 1] pixel units).

    Seeded, because masked autoencoders pick a random mask per call; eval mode, flags restored.
    """
    if not getattr(method, "reconstructs", False):
        raise TypeError(f"{type(method).__name__} does not reconstruct: not an autoencoder method")
    p = next(method.parameters(), None)
    dev = torch.device(device) if device is not None else (p.device if p is not None else "cpu")
    modes = [(m, m.training) for m in method.modules()]
    method.eval()
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        chunks = []
        with torch.inference_mode():
            for i in range(0, images_uint8.shape[0], batch_size):
                scores = method.anomaly_score(images_uint8[i : i + batch_size].to(dev))
                chunks.append(scores.float().cpu())
    finally:
        torch.random.set_rng_state(gen_state)
        for m, mode in modes:
            m.training = mode
    return torch.cat(chunks).numpy()


def per_class_auroc(
    scores: np.ndarray, test_labels: torch.Tensor | np.ndarray,
    anomaly_classes: Sequence[int] | None = None,
) -> dict[int, float]:
    """AUROC of one fixed score (e.g. reconstruction error) with each class in turn as the anomaly."""
    y = as_numpy(test_labels).astype(np.int64).reshape(-1)
    classes = sorted(set(np.unique(y).tolist())) if anomaly_classes is None else anomaly_classes
    return {int(c): auroc(scores, y == c) for c in classes}
