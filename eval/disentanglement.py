"""Disentanglement of a representation against known generating factors: DCI, MIG, dependence.

* **DCI** (Eastwood & Williams 2018). One predictor per factor from the code ``z`` fitted on the
  train set: gradient-boosted trees (as in disentanglement_lib) — a classifier for a discrete
  factor; a regressor for a continuous one (a circular factor is regressed as the cos and sin of
  its angle, importances averaged); ``GBT_STAGES`` stages of depth-3 trees. ``R[i, j]`` = importance of code dim ``i`` for factor ``j``
  (each column sums to 1). Disentanglement = ``Σ_i ρ_i (1 − H_K(P_i·))`` with ``P_ij = R_ij / Σ_k
  R_ik``, ``ρ_i = Σ_j R_ij / Σ R`` and ``H_K`` the entropy in base K = number of factors;
  completeness = mean over factors of ``1 − H_D(R_·j)``, base D = code dims. Informativeness per
  factor on the TEST set, scaled so that 0 is chance and 1 is perfect: ``(acc − chance) /
  (1 − chance)`` for a discrete factor (chance = predicting the train set's majority value) and
  R² for a continuous one (chance = predicting the train mean); the summary is their mean.
* **MIG** (Chen et al. 2018): each code dim cut into 20 equal-width bins (``np.histogram``, as in
  disentanglement_lib); factors discretised (``discretize_factors``); MI in nats; per factor the
  gap between the two most informative dims divided by the factor's entropy, averaged.
* **Dependence** of the code dims (the course notes' ``z_i ⊥ z_j``): mean |Pearson correlation|
  over pairs of dims, and the total correlation of a Gaussian fit,
  ``½(Σ log Σ_ii − log det Σ) = −½ log det R`` (R the correlation matrix), in nats. Both are
  biased up by sampling: independent dims give mean |r| ≈ sqrt(2 / (π n)) (0.018 for n = 2000
  rows) and a total correlation of about d(d − 1) / (4n) nats (0.12 for d = 32, n = 2000).

Wide codes are first reduced: PCA to ``max_dims`` components of the standardised dims, fitted on
the train set (DCI and MIG need per-dimension scores; their values are then those of the PCA
axes, not of the network's own units). Dependence uses the original dims (constant ones dropped); the total correlation needs a
full-rank covariance, so above ``max_dims`` dims it is computed on a seeded random subset of
``max_dims`` of them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.stats import entropy as _entropy
from sklearn.decomposition import PCA
from sklearn.ensemble import GradientBoostingClassifier, GradientBoostingRegressor

from selfsup.pretrain.data.factors import FactorSpec

MIG_CODE_BINS = 20
FACTOR_BINS = 10
MAX_DIMS = 32
# Boosting stages and shrinkage of the DCI trees (disentanglement_lib: sklearn's 100 x 0.1). On PCA-32
# raw pixels of 3k/1k shapes, (D, C, I) were (0.31, 0.27, 0.44) for 100 x 0.1, (0.35, 0.30, 0.43)
# for 50 x 0.1, (0.34, 0.30, 0.42) for 30 x 0.2 at a third of the time of 100 stages (9.5 s vs 35 s
# on the loaded 2-core machine): DCI values depend on the predictor, so compare them at one setting.
GBT_STAGES = 30
GBT_LEARNING_RATE = 0.2


# --------------------------------------------------------------------------- discretisation
def discretize_factors(
    train: np.ndarray, test: np.ndarray, specs: Sequence[FactorSpec], bins: int = FACTOR_BINS
) -> tuple[np.ndarray, np.ndarray]:
    """Integer codes of every factor, ``([N_train, F], [N_test, F])``.

    A discrete factor's values are numbered in sorted order (over both splits); a continuous one
    is cut into ``bins`` equal-frequency bins at the TRAIN set's quantiles (so each train bin holds
    ~1/bins of the samples and the factor's entropy is ~log(bins) nats).
    """
    tr = np.empty(train.shape, dtype=np.int64)
    te = np.empty(test.shape, dtype=np.int64)
    for j, s in enumerate(specs):
        if s.discrete:
            values = np.unique(np.concatenate([train[:, j], test[:, j]]))
            tr[:, j], te[:, j] = np.searchsorted(values, train[:, j]), np.searchsorted(values, test[:, j])
        else:
            edges = np.unique(np.quantile(train[:, j], np.linspace(0, 1, bins + 1)[1:-1]))
            tr[:, j], te[:, j] = np.digitize(train[:, j], edges), np.digitize(test[:, j], edges)
    return tr, te


def histogram_discretize(z: np.ndarray, bins: int = MIG_CODE_BINS) -> np.ndarray:
    """Each column cut into ``bins`` equal-width bins over its own range (codes 0..bins-1)."""
    out = np.empty(z.shape, dtype=np.int64)
    for i in range(z.shape[1]):
        edges = np.histogram_bin_edges(z[:, i], bins)
        out[:, i] = np.clip(np.digitize(z[:, i], edges[1:-1]), 0, bins - 1)
    return out


# --------------------------------------------------------------------------- mutual information
def discrete_entropy(y: np.ndarray) -> float:
    """Plug-in entropy (nats) of integer codes."""
    counts = np.unique(np.asarray(y), return_counts=True)[1]
    return float(_entropy(counts))


def mutual_info_matrix(codes: np.ndarray, factors: np.ndarray) -> np.ndarray:
    """Plug-in mutual information (nats) ``[D, F]`` between integer code columns and integer
    factor columns, from their joint histogram (the same estimator as sklearn's
    ``mutual_info_score``, without a Python loop over samples)."""
    n = codes.shape[0]
    if factors.shape[0] != n:
        raise ValueError(f"codes have {n} rows, factors {factors.shape[0]}")
    out = np.zeros((codes.shape[1], factors.shape[1]))
    f_ids = [np.unique(factors[:, j], return_inverse=True)[1] for j in range(factors.shape[1])]
    for i in range(codes.shape[1]):
        a = np.unique(codes[:, i], return_inverse=True)[1]
        ka = a.max() + 1
        pa = np.bincount(a, minlength=ka) / n
        for j, b in enumerate(f_ids):
            kb = b.max() + 1
            joint = np.bincount(a * kb + b, minlength=ka * kb).reshape(ka, kb) / n
            pb = joint.sum(0)
            nz = joint > 0
            out[i, j] = float(np.sum(joint[nz] * np.log(joint[nz] / np.outer(pa, pb)[nz])))
    return np.maximum(out, 0.0)


def mig(z: np.ndarray, factor_codes: np.ndarray, bins: int = MIG_CODE_BINS) -> dict:
    """Mutual information gap: ``{"mig", "per_factor" [F], "mi" [D, F], "entropy" [F]}``."""
    mi = mutual_info_matrix(histogram_discretize(z, bins), factor_codes)
    h = np.array([discrete_entropy(factor_codes[:, j]) for j in range(factor_codes.shape[1])])
    top = np.sort(mi, axis=0)[::-1]
    second = top[1] if mi.shape[0] > 1 else np.zeros(mi.shape[1])
    gap = np.where(h > 0, (top[0] - second) / np.where(h > 0, h, 1.0), 0.0)
    return {"mig": float(gap.mean()), "per_factor": gap, "mi": mi, "entropy": h}


# --------------------------------------------------------------------------- DCI
def _importance_scores(r: np.ndarray) -> tuple[float, float]:
    """(disentanglement, completeness) of an importance matrix ``[D, F]`` (non-negative)."""
    d, k = r.shape
    total = r.sum()
    if total <= 0:
        return 0.0, 0.0  # no dim predicts anything: neither disentangled nor complete
    rows = r.sum(1)
    dis = 0.0
    if k > 1:
        for i in np.flatnonzero(rows > 0):
            dis += rows[i] / total * (1.0 - _entropy(r[i] / rows[i], base=k))
    else:
        dis = 1.0
    cols = r.sum(0)
    comp = [1.0 - _entropy(r[:, j] / cols[j], base=d) if d > 1 else 1.0 for j in np.flatnonzero(cols > 0)]
    # a factor no dim predicts has completeness 0
    return float(dis), float(np.sum(comp) / k)


def disentanglement_completeness(r: np.ndarray) -> tuple[float, float]:
    """DCI disentanglement and completeness of an importance matrix ``[D codes, F factors]``."""
    r = np.asarray(r, dtype=np.float64)
    if r.ndim != 2 or (r < 0).any():
        raise ValueError(f"importance matrix must be non-negative [D, F], got shape {r.shape}")
    return _importance_scores(r)


def _gbt(classify: bool, seed: int, n_estimators: int):
    cls = GradientBoostingClassifier if classify else GradientBoostingRegressor
    return cls(n_estimators=n_estimators, max_depth=3, learning_rate=GBT_LEARNING_RATE, random_state=seed)


def _fit_factor(z_train, f_train, z_test, f_test, s: FactorSpec, j: int, seed: int, n_estimators: int):
    """(importances [D], informativeness, raw score, chance) of factor ``j``."""
    d = z_train.shape[1]
    if s.discrete:
        y_tr, y_te = f_train[:, j].astype(np.int64), f_test[:, j].astype(np.int64)
        values, counts = np.unique(y_tr, return_counts=True)
        chance = float(np.mean(y_te == values[counts.argmax()]))
        if len(values) < 2:
            return np.zeros(d), 0.0, chance, chance
        model = _gbt(True, seed, n_estimators).fit(z_train, y_tr)
        raw = float(np.mean(model.predict(z_test) == y_te))
        info = (raw - chance) / (1 - chance) if chance < 1 else 0.0
        return np.maximum(model.feature_importances_, 0.0), info, raw, chance
    if s.period:
        ang_tr, ang_te = 2 * np.pi * f_train[:, j] / s.period, 2 * np.pi * f_test[:, j] / s.period
        targets = [(np.cos(ang_tr), np.cos(ang_te)), (np.sin(ang_tr), np.sin(ang_te))]
    else:
        targets = [(f_train[:, j], f_test[:, j])]
    imp, r2s = np.zeros(d), []
    for t_tr, t_te in targets:
        model = _gbt(False, seed, n_estimators).fit(z_train, t_tr)
        imp += np.maximum(model.feature_importances_, 0.0) / len(targets)  # sklearn: ~-1e-17
        resid = np.sum((t_te - model.predict(z_test)) ** 2)
        r2s.append(1.0 - resid / max(np.sum((t_te - t_tr.mean()) ** 2), 1e-300))
    return imp, float(np.mean(r2s)), float(np.mean(r2s)), 0.0


def dci(
    z_train: np.ndarray, f_train: np.ndarray, z_test: np.ndarray, f_test: np.ndarray,
    specs: Sequence[FactorSpec], seed: int = 0, n_estimators: int = GBT_STAGES, n_jobs: int = 2,
) -> dict:
    """DCI of code ``z`` for ``specs`` factors: ``{"disentanglement", "completeness",
    "informativeness", "importance" [D, F], "informativeness_per_factor" [F], "raw_score" [F],
    "chance" [F]}`` (raw_score: test accuracy or R²; chance: the score of the constant guess).
    The per-factor fits run in ``n_jobs`` threads (scikit-learn's tree builder releases the GIL)."""
    from joblib import Parallel, delayed

    fits = Parallel(n_jobs=n_jobs, prefer="threads")(
        delayed(_fit_factor)(z_train, f_train, z_test, f_test, s, j, seed, n_estimators)
        for j, s in enumerate(specs)
    )
    imp = np.stack([f[0] for f in fits], axis=1)
    info, raw, chance = (np.array([f[i] for f in fits]) for i in (1, 2, 3))
    dis, comp = disentanglement_completeness(imp)
    return {
        "disentanglement": dis, "completeness": comp, "informativeness": float(info.mean()),
        "importance": imp, "informativeness_per_factor": info, "raw_score": raw, "chance": chance,
    }


# --------------------------------------------------------------------------- reduction, dependence
def reduce_dims(
    train: np.ndarray, test: np.ndarray, max_dims: int = MAX_DIMS, seed: int = 0,
    fit_rows: int = 1000,
) -> tuple[np.ndarray, np.ndarray, bool]:
    """PCA to ``max_dims`` when wider, fitted on (at most ``fit_rows`` seeded rows of) ``train``
    after standardising each dim with train statistics; returns ``(train, test, reduced)``.
    Components come in order of explained variance, so the first k of them are the PCA to k."""
    if train.shape[1] <= max_dims:
        return train, test, False
    mu, sd = train.mean(0), train.std(0) + 1e-8
    rows = np.arange(len(train))
    if len(train) > fit_rows:
        rows = np.sort(np.random.default_rng(seed).choice(len(train), fit_rows, replace=False))
    # 4 power iterations instead of sklearn's 7 for many components: half the cost (the basis
    # only has to be a good reduction, not exact singular vectors)
    pca = PCA(n_components=max_dims, svd_solver="randomized", iterated_power=4, random_state=seed)
    pca.fit((train[rows] - mu) / sd)
    return pca.transform((train - mu) / sd), pca.transform((test - mu) / sd), True


def dependence(z: np.ndarray, max_dims: int = MAX_DIMS, seed: int = 0) -> dict:
    """Mean |correlation| over pairs of non-constant dims, and the Gaussian total correlation
    (nats) of all of them, or of a seeded random ``max_dims`` of them when there are more."""
    z = np.asarray(z, dtype=np.float64)
    sd = z.std(0)
    keep = np.flatnonzero(sd > 1e-8 * max(float(sd.max(initial=0.0)), 1e-300))
    if keep.size < 2:
        return {"mean_abs_corr": 0.0, "total_correlation": 0.0, "dims": int(keep.size)}
    r = np.corrcoef(z[:, keep], rowvar=False)
    iu = np.triu_indices(keep.size, 1)
    mac = float(np.abs(r[iu]).mean())
    sub = keep
    if keep.size > max_dims:
        sub = np.sort(np.random.default_rng(seed).choice(keep, max_dims, replace=False))
    rs = np.corrcoef(z[:, sub], rowvar=False)
    sign, logdet = np.linalg.slogdet(rs)
    tc = float(-0.5 * logdet) if sign > 0 else float("inf")
    return {"mean_abs_corr": mac, "total_correlation": tc, "dims": int(sub.size)}
