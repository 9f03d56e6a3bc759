"""FAISS nearest neighbours on L2-normalised features: kNN classifier and retrieval metrics.

Cosine similarity is the inner product of L2-normalised vectors, so every index here is an
inner-product index over normalised rows. The kNN classifier is the InstDisc/DINO weighted vote:
each of the k neighbours votes for its label with weight ``exp(sim/τ)``. Retrieval uses the test set
as queries against the train set as the database and reports Recall@k (a same-class item among the
first k) and mAP@R (Musgrave et al., 2020: average precision over the first R results, R = number of
same-class items in the database). Exact search by default; IVF and HNSW trade recall for speed on
large sets and ``approximate_recall`` measures how much they lose against exact search.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import faiss
import numpy as np
import torch

INDEX_KINDS = ("flat", "ivf", "hnsw")


def as_numpy(x: torch.Tensor | np.ndarray) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def l2_normalize(x: torch.Tensor | np.ndarray) -> np.ndarray:
    """Rows scaled to unit length as contiguous float32 (what FAISS wants); zero rows stay zero."""
    a = np.ascontiguousarray(as_numpy(x), dtype=np.float32)
    if a.ndim != 2:
        raise ValueError(f"features must be [N, D], got shape {a.shape}")
    norms = np.linalg.norm(a, axis=1, keepdims=True)
    return np.ascontiguousarray(a / np.maximum(norms, 1e-12), dtype=np.float32)


def build_index(
    feats: torch.Tensor | np.ndarray, kind: str = "flat", nlist: int = 0, nprobe: int = 8,
    hnsw_m: int = 32, seed: int = 0, niter: int = 25, max_points_per_centroid: int = 256,
) -> faiss.Index:
    """Inner-product index over L2-normalised ``feats``.

    ``ivf``: ``nlist`` cells (default ≈ 4·√N), ``nprobe`` visited per query; its k-means runs
    ``niter`` iterations on at most ``max_points_per_centroid`` × cells rows (FAISS's defaults,
    25 and 256; eval's automatic choice uses fewer, ``eval.run.AUTO_IVF``). ``hnsw``: graph with
    ``hnsw_m`` links per node. Both are approximate; report their recall with ``approximate_recall``.
    """
    x = l2_normalize(feats)
    n, d = x.shape
    if n == 0:
        raise ValueError("cannot build an index over zero database items")
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif kind == "ivf":
        cells = nlist or max(1, min(int(4 * np.sqrt(n)), n // 39 or 1))
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quantizer, d, cells, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = seed
        index.cp.niter = niter
        index.cp.max_points_per_centroid = max_points_per_centroid
        index.train(x)
        index.nprobe = min(nprobe, cells)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = max(64, 2 * hnsw_m)
    else:
        raise ValueError(f"unknown index kind '{kind}' (choose from {', '.join(INDEX_KINDS)})")
    index.add(x)
    return index


def search(
    index: faiss.Index, queries: torch.Tensor | np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` (similarities, ids) per L2-normalised query, best first; ids -1 mean 'no result'."""
    q = l2_normalize(queries)
    if q.shape[1] != index.d:
        raise ValueError(f"query dimension {q.shape[1]} != index dimension {index.d}")
    k = min(k, index.ntotal)
    if isinstance(index, faiss.IndexHNSW):
        index.hnsw.efSearch = max(index.hnsw.efSearch, k)
    return index.search(q, k)


def _check_labels(feats: np.ndarray, labels: np.ndarray, what: str) -> np.ndarray:
    lab = as_numpy(labels).astype(np.int64).reshape(-1)
    if lab.shape[0] != feats.shape[0]:
        raise ValueError(f"{what}: {feats.shape[0]} feature rows but {lab.shape[0]} labels")
    if lab.size and lab.min() < 0:
        raise ValueError(f"{what}: labels must be >= 0 (unlabelled samples cannot be scored)")
    return lab


def weighted_vote(
    sims: np.ndarray, ids: np.ndarray, train_labels: np.ndarray, num_classes: int,
    temperature: float,
) -> np.ndarray:
    """Class scores ``[Q, C]``: Σ over neighbours of ``exp(sim/τ)`` into the neighbour's class."""
    valid = ids >= 0
    w = np.where(valid, np.exp(sims.astype(np.float64) / temperature), 0.0)
    lab = train_labels[np.where(valid, ids, 0)]
    flat = (np.arange(ids.shape[0])[:, None] * num_classes + lab).ravel()
    scores = np.bincount(flat, weights=w.ravel(), minlength=ids.shape[0] * num_classes)
    return scores.reshape(ids.shape[0], num_classes)


def knn_classify(
    train_feats: torch.Tensor | np.ndarray,
    train_labels: torch.Tensor | np.ndarray,
    test_feats: torch.Tensor | np.ndarray,
    test_labels: torch.Tensor | np.ndarray,
    k: Sequence[int] | int = (20, 200),
    temperature: float = 0.07,
    num_classes: int | None = None,
    index: faiss.Index | None = None,
) -> dict[str, float]:
    """Weighted kNN accuracy (%), InstDisc/DINO protocol, one search for the largest k.

    Returns ``{"knn_top1_k20": ..., "knn_top5_k20": ..., "knn_top1_k200": ...}`` (top-5 only when
    there are more than five classes). ``index`` may be a prebuilt index over ``train_feats``.
    """
    ks = [k] if isinstance(k, int) else list(k)
    if not ks or min(ks) <= 0:
        raise ValueError(f"k must be positive integers, got {k}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    tr = l2_normalize(train_feats)
    te = l2_normalize(test_feats)
    ytr = _check_labels(tr, train_labels, "train")
    yte = _check_labels(te, test_labels, "test")
    if te.shape[0] == 0:
        raise ValueError("test set is empty")
    c = num_classes or int(max(ytr.max(), yte.max())) + 1
    idx = index if index is not None else build_index(tr)
    sims, ids = search(idx, te, max(ks))
    out: dict[str, float] = {}
    for kk in sorted(ks):
        kk_eff = min(kk, ids.shape[1])
        scores = weighted_vote(sims[:, :kk_eff], ids[:, :kk_eff], ytr, c, temperature)
        order = np.argsort(-scores, axis=1, kind="stable")
        out[f"knn_top1_k{kk}"] = 100.0 * float(np.mean(order[:, 0] == yte))
        if c > 5:
            out[f"knn_top5_k{kk}"] = 100.0 * float(np.mean((order[:, :5] == yte[:, None]).any(1)))
    return out


def retrieval_metrics(
    train_feats: torch.Tensor | np.ndarray,
    train_labels: torch.Tensor | np.ndarray,
    test_feats: torch.Tensor | np.ndarray,
    test_labels: torch.Tensor | np.ndarray,
    recall_at: Sequence[int] = (1, 5, 10),
    index: faiss.Index | None = None,
    chunk: int = 1024,
) -> dict[str, float]:
    """Recall@k (%) and mAP@R (%) with the test set as queries and the train set as database.

    Queries are searched in chunks so that mAP@R's long result lists (R can be thousands) stay in
    bounded memory. A query whose class has no database item is an error: it has no answer.
    """
    tr = l2_normalize(train_feats)
    te = l2_normalize(test_feats)
    ytr = _check_labels(tr, train_labels, "train")
    yte = _check_labels(te, test_labels, "test")
    counts = np.bincount(ytr, minlength=int(max(ytr.max(), yte.max())) + 1)
    missing = sorted(set(np.unique(yte).tolist()) - set(np.flatnonzero(counts).tolist()))
    if missing:
        raise ValueError(f"retrieval: test classes {missing} have no item in the train database")
    idx = index if index is not None else build_index(tr)
    hits = {r: 0 for r in recall_at}
    ap_sum = 0.0
    for s in range(0, te.shape[0], chunk):
        q, yq = te[s : s + chunk], yte[s : s + chunk]
        rq = counts[yq]
        depth = int(max(max(recall_at), rq.max()))
        _, ids = search(idx, q, depth)
        rel = (ids >= 0) & (ytr[np.where(ids >= 0, ids, 0)] == yq[:, None])
        for r in recall_at:
            hits[r] += int(rel[:, :r].any(1).sum())
        ranks = np.arange(1, rel.shape[1] + 1)
        within_r = ranks[None, :] <= rq[:, None]
        prec = np.cumsum(rel, axis=1) / ranks[None, :]
        ap_sum += float(((prec * rel * within_r).sum(1) / rq).sum())
    n = te.shape[0]
    out = {f"recall@{r}": 100.0 * hits[r] / n for r in recall_at}
    out["map@r"] = 100.0 * ap_sum / n
    return out


def approximate_recall(
    exact: faiss.Index, approx: faiss.Index, queries: torch.Tensor | np.ndarray, k: int = 10
) -> float:
    """Fraction (%) of the exact top-k neighbours that the approximate index also returns."""
    _, e = search(exact, queries, k)
    _, a = search(approx, queries, k)
    found = sum(len(set(er.tolist()) & set(ar.tolist()) - {-1}) for er, ar in zip(e, a, strict=True))
    return 100.0 * found / e.size


def save_index(
    directory: str | Path, index: faiss.Index, labels: torch.Tensor | np.ndarray,
    keys: Sequence[str], meta: dict,
) -> Path:
    """Write ``index.faiss`` + ``items.npz`` (labels, keys) + ``index.json`` (meta) into a folder."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    faiss.write_index(index, str(d / "index.faiss"))
    np.savez(d / "items.npz", labels=as_numpy(labels).astype(np.int64), keys=np.asarray(keys))
    (d / "index.json").write_text(json.dumps(meta, indent=2))
    return d


def load_index(directory: str | Path) -> tuple[faiss.Index, np.ndarray, list[str], dict]:
    """Read what ``save_index`` wrote; a missing piece is an error naming the file."""
    d = Path(directory)
    for name in ("index.faiss", "items.npz", "index.json"):
        if not (d / name).is_file():
            raise FileNotFoundError(
                f"retrieval index incomplete: {d / name} not found "
                "(run 'selfsup eval' with the retrieval protocol first to build it)"
            )
    index = faiss.read_index(str(d / "index.faiss"))
    items = np.load(d / "items.npz")
    meta = json.loads((d / "index.json").read_text())
    return index, items["labels"], [str(k) for k in items["keys"]], meta


def choose_index(requested: str, n: int, threshold: int) -> tuple[str, str]:
    """(kind, why): ``auto`` is exact ``flat`` below ``threshold`` database items and ``ivf`` from
    it on (the size where exact search stops paying: ``benchmarks/bench_costs.py --parts eval``);
    any other kind is taken as asked."""
    if requested != "auto":
        return requested, "--index"
    if n >= threshold:
        return "ivf", f"auto: {n} database items >= threshold {threshold}"
    return "flat", f"auto: {n} database items < threshold {threshold}"


def recall_sample(n_queries: int, size: int, seed: int) -> np.ndarray:
    """Row numbers of the queries a recall check uses: all of them when there are at most
    ``size``, else ``size`` drawn without replacement (seeded), in increasing order."""
    if n_queries <= size:
        return np.arange(n_queries)
    return np.sort(np.random.default_rng(seed).choice(n_queries, size, replace=False))
