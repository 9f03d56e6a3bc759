"""Anomaly detection as the course notes describe it: an autoencoder trained on "normal" classes only
flags images whose reconstruction error (a VAE: negative ELBO) exceeds a threshold τ.

Protocol (``selfsup eval`` runs it when the run's pretraining shards left classes out, i.e. were
written with ``selfsup shards --exclude-classes``, or when ``--held-out-classes`` names them):

1. The test set is split, stratified by class and seeded, into a validation half and an
   evaluation half. Labels only say normal (a class the autoencoder was trained on) or anomaly
   (a held-out class).
2. The threshold τ is picked on the validation half only: the smallest of its normal images'
   scores that at most a fraction ``fpr`` of them exceed (an empirical ``1 − fpr`` quantile).
3. On the evaluation half, never seen by the threshold: AUROC (threshold-free), and at τ the
   true-positive rate (recall of anomalies), the realised false-positive rate, precision, F1 and
   accuracy (rates in %). A realised FPR close to the target says the threshold transfers.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from selfsup.eval.anomaly import auroc

DEFAULT_FPR = 0.05


def excluded_classes(train_shards: str | Path) -> list[int]:
    """Class ids a shard set was written without (``manifest["exclude_classes"]``); [] if none
    or the set cannot be opened any more."""
    from selfsup.pretrain.data.stream import ShardError, ShardSet

    if not str(train_shards):
        return []
    try:
        return [int(c) for c in ShardSet.open(train_shards).manifest.get("exclude_classes", [])]
    except (ShardError, OSError):
        return []


def validation_split(labels: np.ndarray, fraction: float = 0.5, seed: int = 0) -> np.ndarray:
    """Boolean mask of the validation part: ``fraction`` of every class, seeded."""
    rng = np.random.default_rng(seed)
    val = np.zeros(labels.shape[0], dtype=bool)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        val[rng.permutation(idx)[: int(round(fraction * idx.size))]] = True
    return val


def threshold_at_fpr(normal_scores: np.ndarray, fpr: float) -> float:
    """Smallest τ such that at most ``fpr`` of ``normal_scores`` are > τ."""
    if normal_scores.size == 0:
        raise ValueError("no normal images in the validation split to pick a threshold on")
    ordered = np.sort(np.asarray(normal_scores, dtype=np.float64))
    allowed = int(np.floor(fpr * ordered.size + 1e-9))  # normal images allowed above τ
    return float(ordered[ordered.size - allowed - 1])


def novelty_metrics(
    scores: np.ndarray, labels: np.ndarray, held_out: Sequence[int], fpr: float = DEFAULT_FPR,
    seed: int = 0,
) -> dict[str, float]:
    """The protocol of the module docstring on per-image ``scores`` (higher = more anomalous)."""
    if not 0.0 < fpr < 1.0:
        raise ValueError(f"target false-positive rate must be in (0, 1), got {fpr}")
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels)
    anomaly = np.isin(labels, list(held_out))
    if anomaly.all() or not anomaly.any():
        raise ValueError(f"the test set needs normal images and images of the held-out classes "
                         f"{list(held_out)} (got {int(anomaly.sum())} of {anomaly.size} held out)")  # fmt: skip
    val = validation_split(labels, 0.5, seed)
    tau = threshold_at_fpr(scores[val & ~anomaly], fpr)
    s, y = scores[~val], anomaly[~val]
    flagged = s > tau
    tp, fp = int((flagged & y).sum()), int((flagged & ~y).sum())
    fn, tn = int((~flagged & y).sum()), int((~flagged & ~y).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "novelty_auroc": auroc(s, y),
        "novelty_target_fpr": 100.0 * fpr,
        "novelty_fpr": 100.0 * fp / (fp + tn),
        "novelty_tpr": 100.0 * recall,
        "novelty_precision": 100.0 * precision,
        "novelty_f1": 100.0 * f1,
        "novelty_accuracy": 100.0 * (tp + tn) / y.size,
        "novelty_threshold": tau,
        "novelty_eval_images": int(y.size),
    }


def novelty_report(
    scores: np.ndarray, labels: np.ndarray, classes: Sequence[str], held_out: Sequence[int],
    fpr: float = DEFAULT_FPR, seed: int = 0,
) -> tuple[dict[str, float], str]:
    """``novelty_metrics`` and the report's note saying what they are."""
    metrics = novelty_metrics(scores, labels, held_out, fpr, seed)
    names = ", ".join(classes[c] if 0 <= c < len(classes) else str(c) for c in held_out)
    note = (
        f"Novelty detection (novelty_* rows): the autoencoder was pretrained on normal classes "
        f"only; held-out classes ({names}) are the anomalies, scored by the method's anomaly score. "
        f"The test set is split in half per class (seed {seed}); the threshold is the "
        f"empirical {100 * (1 - fpr):g}th percentile of the validation half's normal scores (FPR "
        f"{100 * fpr:g}%), and every novelty_* number is measured on the other half."
    )
    return metrics, note
