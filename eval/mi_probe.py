"""Lower bounds on I(y; z) for several targets at once, from linear probes (cross-entropy).

For any predictor q, ``E[−log q(y|z)] ≥ H(y|z)``, so ``H(y) − CE_test(q)`` is a lower bound on
``I(y; z)`` in expectation (the linear "usable information" of Xu et al. 2020). Here q is a
multinomial logistic regression per target on standardised features, and ``H(y)`` is the plug-in
entropy of the test targets. Two things decide how tight the bound is, so both are handled with
care: regularisation (the weight decay of each target is the one with the lowest cross-entropy on
a validation split of the TRAIN rows) and convergence (a cross-entropy bound is far more sensitive
to an unconverged probe than accuracy is: on a 120-d code, 40 L-BFGS iterations gave 1.87 nats
where 300 gave 2.13, so the fits here run to ``max_iter`` = 300 with warm starts).

The targets of a group are fitted jointly: their weight blocks share one ``[N, D] x [D, ΣK]`` product per
iteration, and as the objective is a sum of independent per-target terms (each with its own weight
decay), its minimiser is every target's own minimiser.

Noise: the weight decay is picked on the validation rows, and a near-tie there can pick the
neighbouring value of the grid: with 200 validation rows a relabelling of the code's dims moved one
target's bound from 1.98 to 2.05 nats that way. Compare bounds that differ by more than that.

Speed: each fit runs on one torch thread with denormal floats flushed to zero (``small_fits``);
targets are split into two fixed groups fitted in two Python threads. Near
convergence many probabilities underflow into denormals, which are slow on x86; and these
matrices (at most 5000 x 256 x ~80) are too small for a second thread to pay. Measured on the
shared 2-core machine (load ~4-5), one probe set of 4 targets on 2000 x 120 features: 16.2 s with
denormals, 5.5 s flushed, 53 s flushed with two threads.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np
import torch
from sklearn.model_selection import train_test_split

from selfsup.eval.linear_probe import DEFAULT_WEIGHT_DECAYS


@contextmanager
def small_fits() -> Iterator[None]:
    """One torch thread and denormals flushed, restored on exit (see the module docstring)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    flushed = torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        if flushed:
            torch.set_flush_denormal(False)


def _entropy(y: np.ndarray) -> float:
    p = np.unique(y, return_counts=True)[1] / len(y)
    return float(-(p * np.log(p)).sum())


class _Blocks:
    """Column blocks of the joint weight matrix, one per target."""

    def __init__(self, sizes: Sequence[int]):
        self.sizes = list(sizes)
        self.starts = np.cumsum([0, *self.sizes])

    def split(self, t: torch.Tensor) -> list[torch.Tensor]:
        return list(torch.split(t, self.sizes, dim=-1))


def fit_joint_logistic(
    x: torch.Tensor, ys: torch.Tensor, blocks: _Blocks, weight_decay: torch.Tensor,
    max_iter: int, init: tuple[torch.Tensor, torch.Tensor] | None = None,
    xt: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimise ``Σ_t [mean CE_t(x W_t + b_t, y_t) + wd_t/2 ‖W_t‖²]`` with L-BFGS.

    ``ys``: ``[N, T]`` class ids, ``weight_decay``: ``[T]``. Returns ``(W [D, ΣK], b [ΣK])``.
    """
    n, d = x.shape
    cols = blocks.starts[-1]
    w = torch.zeros(d, cols) if init is None else init[0].clone()
    b = torch.zeros(cols) if init is None else init[1].clone()
    wd_cols = torch.repeat_interleave(weight_decay.float(), torch.tensor(blocks.sizes))
    xt = x.t().contiguous() if xt is None else xt
    rows = torch.arange(n)
    offsets = torch.as_tensor(blocks.starts[:-1])
    flat_targets = ys + offsets  # column of each target's true class in the joint matrix
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20,
                            line_search_fn="strong_wolfe", tolerance_grad=1e-6, tolerance_change=1e-10)

    def closure() -> torch.Tensor:
        logits = torch.addmm(b, x, w)
        logp = torch.cat([torch.log_softmax(blk, 1) for blk in blocks.split(logits)], 1)
        picked = logp.gather(1, flat_targets)
        loss = -picked.sum(0).div(n).sum() + 0.5 * (wd_cols * (w * w).sum(0)).sum()
        g = logp.exp_()
        g[rows[:, None], flat_targets] -= 1.0
        g /= n
        w.grad = xt @ g + wd_cols * w
        b.grad = g.sum(0)
        return loss

    with torch.no_grad():
        opt.step(closure)
    return w, b


def _per_target_ce(x, ys, blocks: _Blocks, w, b) -> np.ndarray:
    logits = torch.addmm(b, x, w)
    out = []
    for t, blk in enumerate(blocks.split(logits)):
        logp = torch.log_softmax(blk, 1)
        out.append(float(-logp.gather(1, ys[:, t : t + 1]).mean()))
    return np.array(out)


def _standardise(train: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    mu, sd = train.mean(0, keepdim=True), train.std(0, keepdim=True).clamp_min(1e-6)
    return [(t - mu) / sd for t in (train, *others)]


def mi_lower_bounds(
    z_train, y_train: dict[str, np.ndarray], z_test, y_test: dict[str, np.ndarray],
    weight_decays: Sequence[float] = DEFAULT_WEIGHT_DECAYS, val_fraction: float = 0.2,
    seed: int = 0, sweep_iter: int = 60, max_iter: int = 300, sweep_rows: int | None = None,
    workers: int = 2,
) -> dict[str, dict[str, float]]:
    """``{target: {"bound", "entropy", "cross_entropy", "weight_decay"}}`` in nats.

    The sweep splits the train rows (or a seeded ``sweep_rows`` of them) into fit and validation
    (``val_fraction``) and goes from strong to weak weight decay, each fit warm-started from the
    last for ``sweep_iter`` iterations; per target it keeps the weight decay and weights with the
    lowest validation cross-entropy, and it stops once a weight decay is worse than the best so far
    for every target (validation curves are U-shaped in the weight decay; the weak end, where fits
    run longest, is then skipped). The final fit on all train rows starts from the kept weights.
    The test set is touched once. Sweeping on fewer rows than the final fit picks too strong a
    weight decay for it: on 10k shapes, a sweep on 2000 of 5000 rows lowered the raw-pixel class
    bound from 0.11 to 0.05 nats, hence the default of all rows. The targets are fitted in
    ``workers`` fixed groups, each in its own thread (one torch thread each): two cores in use,
    and the same numbers whatever the machine's load.
    """
    groups = _groups({k: int(max(np.max(y_train[k]), np.max(y_test[k]))) + 1 for k in y_train}, workers)

    def job(names: list[str]) -> dict:
        torch.set_flush_denormal(True)  # a per-thread CPU flag: set it in every worker
        return _bounds(z_train, {k: y_train[k] for k in names}, z_test, {k: y_test[k] for k in names},
                       weight_decays, val_fraction, seed, sweep_iter, max_iter, sweep_rows)

    with small_fits():
        if len(groups) == 1:
            parts = [job(groups[0])]
        else:
            with ThreadPoolExecutor(len(groups)) as pool:
                parts = list(pool.map(job, groups))
    merged = {k: v for part in parts for k, v in part.items()}
    return {k: merged[k] for k in y_train}


def _groups(classes: dict[str, int], workers: int) -> list[list[str]]:
    """Targets split into at most ``workers`` groups of about equal class counts (fixed, so the
    result does not depend on timing): the largest target first into the lightest group."""
    groups: list[list[str]] = [[] for _ in range(max(1, min(workers, len(classes))))]
    load = [0] * len(groups)
    for name in sorted(classes, key=lambda k: (-classes[k], list(classes).index(k))):
        i = load.index(min(load))
        groups[i].append(name)
        load[i] += classes[name]
    return [g for g in groups if g]


def _bounds(z_train, y_train, z_test, y_test, weight_decays, val_fraction, seed, sweep_iter,
            max_iter, sweep_rows):
    names = list(y_train)
    xtr = torch.as_tensor(np.asarray(z_train), dtype=torch.float32)
    xte = torch.as_tensor(np.asarray(z_test), dtype=torch.float32)
    ytr = torch.as_tensor(np.stack([np.asarray(y_train[k]) for k in names], 1), dtype=torch.int64)
    yte = torch.as_tensor(np.stack([np.asarray(y_test[k]) for k in names], 1), dtype=torch.int64)
    if ytr.min() < 0 or yte.min() < 0:
        raise ValueError("targets must be class ids >= 0")
    blocks = _Blocks([int(max(ytr[:, t].max(), yte[:, t].max())) + 1 for t in range(len(names))])
    pool = np.arange(len(xtr))
    if sweep_rows is not None and len(pool) > sweep_rows:
        pool = np.sort(np.random.default_rng(seed).choice(len(pool), sweep_rows, replace=False))
    a, v = (torch.as_tensor(i) for i in train_test_split(pool, test_size=val_fraction, random_state=seed))
    xa, xv = _standardise(xtr[a], xtr[v])
    xat = xa.t().contiguous()
    best_ce = np.full(len(names), np.inf)
    best_wd = np.zeros(len(names))
    w0 = torch.zeros(xtr.shape[1], blocks.starts[-1])
    b0 = torch.zeros(blocks.starts[-1])
    init = None
    for wd in sorted(weight_decays, reverse=True):
        init = fit_joint_logistic(xa, ytr[a], blocks, torch.full((len(names),), wd), sweep_iter, init, xat)
        ce = _per_target_ce(xv, ytr[v], blocks, *init)
        if np.all(ce > best_ce):
            break
        for t in np.flatnonzero(ce < best_ce):
            lo, hi = blocks.starts[t], blocks.starts[t + 1]
            w0[:, lo:hi], b0[lo:hi] = init[0][:, lo:hi], init[1][lo:hi]
            best_ce[t], best_wd[t] = ce[t], wd
    xfull, xtest = _standardise(xtr, xte)
    w, b = fit_joint_logistic(xfull, ytr, blocks, torch.as_tensor(best_wd), max_iter, (w0, b0))
    ce = _per_target_ce(xtest, yte, blocks, w, b)
    out = {}
    for t, name in enumerate(names):
        h = _entropy(yte[:, t].numpy())
        out[name] = {"bound": h - float(ce[t]), "entropy": h, "cross_entropy": float(ce[t]),
                     "weight_decay": float(best_wd[t])}
    return out
