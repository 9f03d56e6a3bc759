"""The ``properties`` protocol: disentanglement, sufficiency and invariance of frozen features.

The three properties of a representation ``z = f(x)`` from the course notes, each measured against
the generating factors the shard set carries (``selfsup.pretrain.data.factors``):

* **disentanglement**: DCI, MIG and the dependence of the code dims (``eval.disentanglement``);
* **sufficiency** ``I(y; z) = I(y; x)``: a lower bound on ``I(y; z)`` in nats, ``H(y) − CE`` of
  linear probes (``eval.mi_probe``: weight decay chosen by cross-entropy on a validation split of
  the train rows, fits run to convergence, test set used once). Targets: the class, and every
  factor (discrete as is; continuous cut into 10 equal-frequency bins at the train quantiles; a
  factor equal to the class is not repeated). Features wider than ``suff_max_dims`` are reduced by
  PCA fitted on train first, which can only lower the bound (a function of z carries no more
  information than z); at most ``suff_max_rows`` train rows are used.
* **invariance** to each nuisance transform (``eval.invariance``), on ``invariance_images`` test
  images.

Subsampling (seeded; stated in the report): DCI fits its trees on at most ``dci_train_rows`` train
rows and scores ``dci_test_rows`` test rows; MIG and the dependence use at most ``mig_rows`` test
rows.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from selfsup.eval.disentanglement import (
    FACTOR_BINS,
    GBT_STAGES,
    MAX_DIMS,
    dci,
    dependence,
    discretize_factors,
    mig,
    reduce_dims,
)
from selfsup.eval.invariance import TRANSFORMS, FeatureFn, invariance
from selfsup.eval.linear_probe import DEFAULT_WEIGHT_DECAYS
from selfsup.eval.mi_probe import mi_lower_bounds
from selfsup.pretrain.data.factors import FactorSpec


@dataclass
class PropertyOptions:
    factor_bins: int = FACTOR_BINS
    max_dims: int = MAX_DIMS  # DCI / MIG / total correlation work on at most this many dims
    dci_train_rows: int = 1000
    dci_test_rows: int = 2000
    dci_estimators: int = GBT_STAGES
    mig_rows: int = 5000
    suff_max_rows: int = 5000
    suff_max_dims: int = 256
    suff_val_fraction: float = 0.2
    # the linear probe's grid plus two strong values, so that a code with nothing usable can fall
    # back to (nearly) the prior, bound ~0, instead of an overfitted probe's negative bound
    weight_decays: Sequence[float] = (10.0, 1.0, *DEFAULT_WEIGHT_DECAYS)
    invariance_images: int = 256
    transforms: Sequence[str] = TRANSFORMS
    seed: int = 0


@dataclass
class FactorData:
    """Factors of the train and test sets, aligned with their images and labels."""

    specs: list[FactorSpec]
    train: np.ndarray  # float64 [N_train, F]
    test: np.ndarray
    train_labels: np.ndarray
    test_labels: np.ndarray


def load_factor_data(train_path: str, train_keys: list[str], train_labels, test_path: str,
                     test_keys: list[str], test_labels) -> FactorData:
    """Read both sets' factors; the sets must declare the same factors (names and kinds)."""
    from selfsup.pretrain.data.factors import FactorError, factor_specs, load_factors
    from selfsup.pretrain.data.stream import ShardSet

    loaded = []
    for path, keys, what in ((train_path, train_keys, "train"), (test_path, test_keys, "test")):
        ss = ShardSet.open(path)
        specs = factor_specs(ss.manifest, f"{what} shards at {path}")
        values, fkeys = load_factors(ss)
        if fkeys != list(keys):
            raise FactorError(f"{what} shards at {path}: factor rows are not in the images' order")
        loaded.append((specs, values))
    (s_tr, f_tr), (s_te, f_te) = loaded
    if [(s.name, s.kind) for s in s_tr] != [(s.name, s.kind) for s in s_te]:
        raise FactorError(f"train and test shards declare different factors: "
                          f"{[s.name for s in s_tr]} vs {[s.name for s in s_te]}")
    return FactorData(s_tr, f_tr, f_te, np.asarray(train_labels), np.asarray(test_labels))


def _rows(n: int, limit: int, seed: int) -> np.ndarray:
    if n <= limit:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, limit, replace=False))


# --------------------------------------------------------------------------- sufficiency
def probe_targets(data: FactorData, bins: int = FACTOR_BINS) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{name: (y_train, y_test)}``: the class, then every factor not equal to the class."""
    tr, te = discretize_factors(data.train, data.test, data.specs, bins)
    out = {"class": (data.train_labels.astype(np.int64), data.test_labels.astype(np.int64))}
    for j, s in enumerate(data.specs):
        same = np.array_equal(data.train[:, j], data.train_labels) and np.array_equal(data.test[:, j], data.test_labels)
        if not same:
            out[s.name] = (tr[:, j], te[:, j])
    return out


def sufficiency(ztr: np.ndarray, zte: np.ndarray, targets: dict, opts: PropertyOptions,
                rows: np.ndarray | None = None) -> dict:
    """``{target: {"bound", "entropy", "cross_entropy", "weight_decay"}}`` on train ``rows``."""
    rows = np.arange(len(ztr)) if rows is None else rows
    return mi_lower_bounds(ztr[rows], {k: v[0][rows] for k, v in targets.items()}, zte,
                           {k: v[1] for k, v in targets.items()}, opts.weight_decays,
                           opts.suff_val_fraction, opts.seed)


# --------------------------------------------------------------------------- one feature set
def evaluate_properties(
    train_feats, test_feats, data: FactorData, opts: PropertyOptions | None = None,
    feature_fn: FeatureFn | None = None, test_images: torch.Tensor | None = None,
    mean: Sequence[float] = (), std: Sequence[float] = (),
) -> tuple[dict[str, float], dict[str, Any]]:
    """All three properties of one feature set: ``(summary metrics, details)``.

    Invariance needs ``feature_fn`` (normalised images -> features) and the uint8 ``test_images``;
    without them it is skipped.
    """
    opts = opts or PropertyOptions()
    ztr = np.asarray(train_feats, dtype=np.float64)
    zte = np.asarray(test_feats, dtype=np.float64)
    if len(ztr) != len(data.train) or len(zte) != len(data.test):
        raise ValueError(f"features ({len(ztr)}, {len(zte)}) and factors ({len(data.train)}, "
                         f"{len(data.test)}) differ in rows")
    specs = data.specs
    # one PCA serves both: its first max_dims components for DCI/MIG, all for the probes
    wide = ztr.shape[1] > opts.suff_max_dims
    ptr, pte, reduced = reduce_dims(ztr, zte, opts.suff_max_dims if wide else opts.max_dims, opts.seed)
    rtr, rte = ptr[:, : opts.max_dims], pte[:, : opts.max_dims]
    reduced = reduced or wide
    a = _rows(len(rtr), opts.dci_train_rows, opts.seed)
    b = _rows(len(rte), opts.dci_test_rows, opts.seed + 1)
    d = dci(rtr[a], data.train[a], rte[b], data.test[b], specs, opts.seed, opts.dci_estimators)
    _, codes_te = discretize_factors(data.train, data.test, specs, opts.factor_bins)
    m_rows = _rows(len(rte), opts.mig_rows, opts.seed + 2)
    m = mig(rte[m_rows], codes_te[m_rows])
    dep = dependence(zte[m_rows], opts.max_dims, opts.seed)
    targets = probe_targets(data, opts.factor_bins)
    s_rows = _rows(len(ztr), opts.suff_max_rows, opts.seed)
    suff = sufficiency(ptr if wide else ztr, pte if wide else zte, targets, opts, s_rows)
    summary = {
        "dci_disentanglement": d["disentanglement"], "dci_completeness": d["completeness"],
        "dci_informativeness": d["informativeness"], "mig": m["mig"],
        "latent_mean_abs_corr": dep["mean_abs_corr"], "latent_total_correlation": dep["total_correlation"],
        "suff_class": suff["class"]["bound"],
    }
    factor_bounds = [v["bound"] for k, v in suff.items() if k != "class"]
    if factor_bounds:
        summary["suff_factors_mean"] = float(np.mean(factor_bounds))
    names = [s.name for s in specs]
    details: dict[str, Any] = {
        "code_dims": int(rtr.shape[1]), "pca": reduced,
        "importance": d["importance"].tolist(),
        "factors": names,
        "informativeness": dict(zip(names, d["informativeness_per_factor"].tolist(), strict=True)),
        "informativeness_raw": dict(zip(names, d["raw_score"].tolist(), strict=True)),
        "chance": dict(zip(names, d["chance"].tolist(), strict=True)),
        "mig_per_factor": dict(zip(names, m["per_factor"].tolist(), strict=True)),
        "factor_entropy": dict(zip(names, m["entropy"].tolist(), strict=True)),
        "sufficiency": suff, "tc_dims": dep["dims"],
    }
    if feature_fn is not None and test_images is not None:
        rows = torch.as_tensor(_rows(len(test_images), opts.invariance_images, opts.seed + 3))
        inv = invariance(feature_fn, test_images[rows], mean, std, opts.transforms, seed=opts.seed)
        details["invariance"] = inv
        for name, v in inv.items():
            summary[f"inv_{name}"] = v["ratio"]
        finite = [v["ratio"] for v in inv.values() if np.isfinite(v["ratio"])]
        summary["inv_mean"] = float(np.mean(finite)) if finite else float("nan")
    return summary, details


# --------------------------------------------------------------------------- InfoNCE from the run
def infonce_from_run(run_dir: Path | None, last: int = 5) -> dict[str, float] | None:
    """Mean ``infonce_mi_bound`` over the last ``last`` logged rows of ``metrics.jsonl`` and its
    ceiling log(2N − 1) (N = images per InfoNCE loss: the global batch over accumulation steps),
    or None when the run logged none (not a contrastive run)."""
    if run_dir is None or not (run_dir / "metrics.jsonl").is_file():
        return None
    rows = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            if isinstance(row.get("infonce_mi_bound"), (int, float)):
                rows.append(row)
    if not rows:
        return None
    out = {"infonce_mi_bound": float(np.mean([r["infonce_mi_bound"] for r in rows[-last:]])),
           "step": rows[-1]["step"]}
    try:
        from selfsup.config import load_config

        cfg = load_config(run_dir / "config.yaml")
        n = cfg.data.batch_size // (1 if cfg.method.simclr.grad_cache_chunk > 0 else cfg.train.accumulate)
        out["infonce_ceiling"] = float(np.log(2 * n - 1))
    except Exception:  # noqa: BLE001 - the bound is still reported; only its ceiling is missing
        pass
    return out


def run_properties(feats: dict, factor_data: FactorData, backbones: dict, test_images: torch.Tensor,
                   info: Any, out: Path, seed: int, device: str | None, run_dir: Path | None,
                   raw_pixel_dims: int, feature_fns: dict | None = None) -> dict:
    """The protocol for ``eval.run``: every feature set ``{name: (train, test)}`` (``raw_pixels``
    and backbones by name; ``feature_fns`` replace a backbone's for invariance, e.g. a latent
    code), the InfoNCE bound of ``run_dir``, the heat map and the notes.
    Returns ``{"summary": {name: metrics}, "models": {name: details}, "figure", "notes"}``."""
    from selfsup.eval.disentanglement import GBT_LEARNING_RATE
    from selfsup.eval.invariance import backbone_fn, raw_pixel_fn
    from selfsup.eval.properties_report import plot_importance

    popts = PropertyOptions(seed=seed)
    details, summaries = {}, {}
    for name, (ftr, fte) in feats.items():
        net = backbones.get(name)
        fn = raw_pixel_fn(raw_pixel_dims) if name == "raw_pixels" else (
            (feature_fns or {}).get(name)
            or (backbone_fn(net, info.image_size, device) if net is not None else None))
        summaries[name], details[name] = evaluate_properties(
            ftr, fte, factor_data, popts, fn, test_images, info.mean, info.std)
    nce = infonce_from_run(run_dir)
    if nce is not None and "pretrained" in summaries:
        summaries["pretrained"].update({k: v for k, v in nce.items() if k != "step"})
    png = plot_importance(details, out / "properties_importance.png")
    wide = [n for n, d in details.items() if d["pca"]]
    notes = [
        f"Properties: DCI and MIG need per-dimension scores, so features wider than "
        f"{popts.max_dims} dims ({', '.join(wide) or 'none here'}) are reduced to their first "
        f"{popts.max_dims} PCA components (standardised dims, PCA fitted on train): their DCI/MIG "
        "are those of the PCA axes, not of the network's own units. DCI trees "
        f"({popts.dci_estimators} boosting stages, depth 3, learning rate {GBT_LEARNING_RATE}) fit "
        f"on <= {popts.dci_train_rows} train rows, informativeness on <= {popts.dci_test_rows} "
        f"test rows; MIG and latent dependence on <= {popts.mig_rows} test rows; continuous "
        f"factors cut into {popts.factor_bins} equal-frequency bins (train quantiles) for MIG and "
        f"sufficiency; total correlation on a seeded random subset of {popts.max_dims} original "
        "dims when wider (PCA components would be decorrelated by construction).",
        f"Sufficiency: linear-probe bound H(y) − CE on test, probe on <= {popts.suff_max_rows} "
        f"train rows (PCA to {popts.suff_max_dims} when wider), weight decay chosen by "
        "cross-entropy on a 20% validation split of those train rows.",
        f"Invariance: {popts.invariance_images} test images, one random draw of each transform per "
        "image; a collapsed (constant) representation scores 0 here, read it with sufficiency.",
    ]
    if nce is not None:
        notes.append(f"InfoNCE bound: mean of the last 5 logged training steps (to step {nce['step']}).")
    return {"summary": summaries, "models": details, "figure": png.name, "notes": notes}
