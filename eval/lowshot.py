"""Low-shot protocol: the linear probe and the kNN classifier with 1% and 10% of the train labels.

SimCLR (Chen et al. 2020, §6 and table 7) and BYOL (Grill et al. 2020, table 2) report results with
1% and 10% of the ImageNet labels; their subsets are fixed class-balanced files. Here each fraction
gets ``runs`` subsets drawn by scikit-learn's stratified splitting (``train_test_split`` with
``stratify``, i.e. ``StratifiedShuffleSplit``), seeds ``seed, seed+1, ...``: each class keeps its
share of the train set (to within one image) and every class is present, or it is an error. The
subsets are index sets into the TRAIN rows only, so no test image can be in one by construction.

Per subset: the linear probe trains on the subset alone (its weight decay chosen on a stratified
validation carve of the subset, ``eval.linear_probe``), the subset is the kNN database, and the
whole test set is scored. The report gives the mean and the sample standard deviation
(``ddof=1``) over exactly ``runs`` values per metric, and keeps the per-run values.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.model_selection import train_test_split

from selfsup.eval.knn import as_numpy, knn_classify
from selfsup.eval.linear_probe import DEFAULT_WEIGHT_DECAYS, linear_probe

DEFAULT_FRACTIONS = (0.01, 0.1)
DEFAULT_RUNS = 3
PREFIX = "lowshot_"


def fraction_tag(fraction: float) -> str:
    """``0.01 -> '1pct'``, ``0.1 -> '10pct'``, ``0.005 -> '0.5pct'`` (used in metric keys)."""
    return f"{100 * fraction:g}pct"


def subset_size(n: int, fraction: float) -> int:
    return max(1, int(round(fraction * n)))


def lowshot_subset(labels: np.ndarray | Sequence[int], fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of a stratified ``fraction`` of the rows of ``labels``, drawn with ``seed``.

    Raises ValueError when the fraction is out of (0, 1], when it gives fewer images than there are
    classes, or when a class ends up absent (a class rarer than the fraction allows).
    """
    y = as_numpy(labels).astype(np.int64).reshape(-1)
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"low-shot fraction must be in (0, 1], got {fraction}")
    classes = np.unique(y)
    n = subset_size(len(y), fraction)
    if n < len(classes):
        raise ValueError(
            f"low-shot fraction {fraction:g} of {len(y)} train images is {n} image(s), fewer than "
            f"the {len(classes)} classes: every class needs at least one labelled image")
    if n == len(y):
        return np.arange(len(y))
    idx, _ = train_test_split(np.arange(len(y)), train_size=n, stratify=y, random_state=seed)
    idx = np.sort(idx)
    missing = sorted(set(classes.tolist()) - set(np.unique(y[idx]).tolist()))
    if missing:
        raise ValueError(f"low-shot fraction {fraction:g}: class(es) {missing} have no image in the "
                         f"subset drawn with seed {seed} (too rare for this fraction)")
    return idx


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; nan for a single value)."""
    v = np.asarray(values, dtype=np.float64)
    return float(v.mean()), (float(v.std(ddof=1)) if len(v) > 1 else float("nan"))


def lowshot(
    train_feats, train_labels, test_feats, test_labels,
    fractions: Sequence[float] = DEFAULT_FRACTIONS, runs: int = DEFAULT_RUNS, seed: int = 0,
    k: Sequence[int] = (20,), temperature: float = 0.07,
    weight_decays: Sequence[float] = DEFAULT_WEIGHT_DECAYS, num_classes: int | None = None,
    device: str | None = None,
) -> tuple[dict[str, float], dict[str, Any]]:
    """``(summary, details)`` of the low-shot protocol on one feature set.

    ``summary``: ``lowshot_<tag>_<metric>`` (mean) and ``..._sd`` for ``linear_top1``,
    ``linear_top5`` (> 5 classes) and ``knn_top1_k<k>`` for every ``k`` no larger than the subset.
    ``details``: per fraction the seeds, subset sizes, class counts and every run's values.
    """
    if runs < 1:
        raise ValueError(f"low-shot runs must be >= 1, got {runs}")
    xtr, xte = as_numpy(train_feats), as_numpy(test_feats)
    ytr = as_numpy(train_labels).astype(np.int64).reshape(-1)
    yte = as_numpy(test_labels).astype(np.int64).reshape(-1)
    c = num_classes or int(max(ytr.max(), yte.max())) + 1
    summary: dict[str, float] = {}
    details: dict[str, Any] = {}
    for fraction in fractions:
        tag = fraction_tag(fraction)
        seeds = [seed + i for i in range(runs)]
        per_run: dict[str, list[float]] = {}
        sizes, counts = [], []
        for s in seeds:
            idx = lowshot_subset(ytr, fraction, s)
            sizes.append(len(idx))
            counts.append(np.bincount(ytr[idx], minlength=c).tolist())
            lin = linear_probe(xtr[idx], ytr[idx], xte, yte, weight_decays, seed=s,
                               num_classes=c, device=device)
            ks = [kk for kk in k if kk <= len(idx)] or [len(idx)]
            knn = knn_classify(xtr[idx], ytr[idx], xte, yte, k=ks, temperature=temperature,
                               num_classes=c)
            row = {m: lin[m] for m in ("linear_top1", "linear_top5") if m in lin}
            row.update({m: v for m, v in knn.items() if m.startswith("knn_top1")})
            for m, v in row.items():
                per_run.setdefault(m, []).append(v)
        for m, values in per_run.items():
            mean, sd = mean_sd(values)
            summary[f"{PREFIX}{tag}_{m}"] = mean
            summary[f"{PREFIX}{tag}_{m}_sd"] = sd
        details[tag] = {"fraction": fraction, "seeds": seeds, "sizes": sizes,
                        "class_counts": counts, "runs": per_run}
    return summary, details


def display_name(key: str, name_of) -> str | None:
    """Readable name of a low-shot key (``name_of``: the name of the plain metric), else None."""
    if not key.startswith(PREFIX) or "pct_" not in key:
        return None
    tag, metric = key[len(PREFIX):].split("pct_", 1)
    return f"{tag}% labels: {name_of(metric)}, mean ± sd"


def note(fractions: Sequence[float], runs: int) -> str:
    pcts = " and ".join(f"{100 * f:g}%" for f in fractions)
    return (f"Low-shot: {pcts} of the train labels, {runs} stratified subsets each (scikit-learn, "
            "seeds seed, seed+1, ...; every class present; train rows only), a linear probe "
            "(weight decay chosen on a validation carve of the subset) and the kNN vote with the "
            "subset as database; the full test set scores each run. Cells: mean ± sample sd "
            "(ddof=1) over the runs; per-run values in report.json under 'lowshot'. kNN keeps "
            "only the k no larger than the subset.")
