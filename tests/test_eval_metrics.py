"""eval/ metrics against independent computations: brute-force NumPy kNN and retrieval, sklearn
AUROC and a hand-computed one, linear probe on separable and on shuffled data."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from selfsup.eval.anomaly import auroc, knn_anomaly_auroc, per_class_auroc
from selfsup.eval.knn import (
    approximate_recall,
    build_index,
    knn_classify,
    load_index,
    retrieval_metrics,
    save_index,
    search,
)
from selfsup.eval.linear_probe import linear_probe


def _data(seed=0, n_train=300, n_test=80, d=16, c=7):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(c, d))
    ytr = rng.integers(0, c, n_train)
    yte = rng.integers(0, c, n_test)
    xtr = centers[ytr] + 1.5 * rng.normal(size=(n_train, d))
    xte = centers[yte] + 1.5 * rng.normal(size=(n_test, d))
    return xtr.astype(np.float32), ytr, xte.astype(np.float32), yte, c


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def brute_knn(xtr, ytr, xte, yte, k, t, c):
    sims = _unit(xte) @ _unit(xtr).T
    top1 = top5 = 0
    for i in range(len(xte)):
        nn_ids = np.argsort(-sims[i])[:k]
        votes = np.zeros(c)
        for j in nn_ids:
            votes[ytr[j]] += np.exp(sims[i, j] / t)
        order = np.argsort(-votes, kind="stable")
        top1 += order[0] == yte[i]
        top5 += yte[i] in order[:5]
    return 100 * top1 / len(xte), 100 * top5 / len(xte)


def test_knn_matches_brute_force():
    xtr, ytr, xte, yte, c = _data()
    got = knn_classify(torch.from_numpy(xtr), torch.from_numpy(ytr), xte, yte, k=(5, 20),
                       temperature=0.07, num_classes=c)
    for k in (5, 20):
        t1, t5 = brute_knn(xtr, ytr, xte, yte, k, 0.07, c)
        assert got[f"knn_top1_k{k}"] == pytest.approx(t1)
        assert got[f"knn_top5_k{k}"] == pytest.approx(t5)
    assert 100 / c + 10 < got["knn_top1_k20"] < 100  # informative, not trivial


def test_knn_k_larger_than_database_uses_all_items():
    xtr, ytr, xte, yte, c = _data(n_train=30)
    got = knn_classify(xtr, ytr, xte, yte, k=200, num_classes=c)
    assert got["knn_top1_k200"] == pytest.approx(brute_knn(xtr, ytr, xte, yte, 30, 0.07, c)[0])


def brute_retrieval(xtr, ytr, xte, yte):
    sims = _unit(xte) @ _unit(xtr).T
    rec = {1: 0, 5: 0, 10: 0}
    ap = 0.0
    for i in range(len(xte)):
        order = np.argsort(-sims[i])
        rel = ytr[order] == yte[i]
        for r in rec:
            rec[r] += rel[:r].any()
        big_r = int((ytr == yte[i]).sum())
        ap += sum(rel[:j + 1].sum() / (j + 1) for j in range(big_r) if rel[j]) / big_r
    n = len(xte)
    return {**{f"recall@{r}": 100 * v / n for r, v in rec.items()}, "map@r": 100 * ap / n}


@pytest.mark.parametrize("chunk", [1024, 7])
def test_retrieval_matches_brute_force(chunk):
    xtr, ytr, xte, yte, _ = _data(seed=1)
    got = retrieval_metrics(xtr, ytr, xte, yte, chunk=chunk)
    want = brute_retrieval(xtr, ytr, xte, yte)
    assert got.keys() == want.keys()
    for key, v in want.items():
        assert got[key] == pytest.approx(v, abs=1e-9), key


def test_retrieval_rejects_query_class_missing_from_database():
    xtr, ytr, xte, yte, _ = _data()
    keep = ytr != 3
    with pytest.raises(ValueError, match=r"test classes \[3\]"):
        retrieval_metrics(xtr[keep], ytr[keep], xte, yte)


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_index_recall_and_save_load(tmp_path, kind):
    rng = np.random.default_rng(0)
    db = rng.normal(size=(2000, 32)).astype(np.float32)
    q = rng.normal(size=(50, 32)).astype(np.float32)
    exact = build_index(db)
    approx = build_index(db, kind=kind)
    r = approximate_recall(exact, approx, q, 10)
    assert 30.0 < r <= 100.0
    assert approximate_recall(exact, exact, q, 10) == 100.0
    save_index(tmp_path / "idx", approx, np.arange(2000) % 5, [f"k{i}" for i in range(2000)],
               {"index": kind})
    index, labels, keys, meta = load_index(tmp_path / "idx")
    assert meta == {"index": kind} and keys[7] == "k7" and labels[7] == 2
    np.testing.assert_array_equal(search(index, q, 10)[1], search(approx, q, 10)[1])
    (tmp_path / "idx" / "items.npz").unlink()
    with pytest.raises(FileNotFoundError, match="items.npz"):
        load_index(tmp_path / "idx")


def test_auroc_hand_computed_and_sklearn():
    # anomalies score 0.9, 0.4, 0.7; normals 0.1, 0.4, 0.8, 0.3.  Pairs (anomaly > normal, ties ½):
    # 0.9 beats all 4; 0.4 beats 0.1, 0.3, ties 0.4 -> 2.5; 0.7 beats 0.1, 0.4, 0.3 -> 3. Sum 9.5/12
    scores = np.array([0.9, 0.4, 0.7, 0.1, 0.4, 0.8, 0.3])
    flags = np.array([1, 1, 1, 0, 0, 0, 0])
    assert auroc(scores, flags) == pytest.approx(9.5 / 12)
    rng = np.random.default_rng(0)
    s = rng.normal(size=500).round(1)  # rounding makes ties
    y = rng.random(500) < 0.3
    assert auroc(s, y) == pytest.approx(roc_auc_score(y, s))
    with pytest.raises(ValueError, match="both anomalies and normal"):
        auroc(s, np.zeros(500))


def test_knn_anomaly_auroc_matches_brute_force():
    xtr, ytr, xte, yte, _ = _data(seed=2)
    got = knn_anomaly_auroc(xtr, ytr, xte, yte, anomaly_classes=[0, 4], k=3)
    for c in (0, 4):
        ref = _unit(xtr[ytr != c])
        sims = np.sort(_unit(xte) @ ref.T, axis=1)[:, ::-1][:, :3]
        assert got[c] == pytest.approx(roc_auc_score(yte == c, 1 - sims.mean(1)), abs=1e-6)
    assert per_class_auroc(-np.arange(len(yte)), yte, [1]) == {
        1: pytest.approx(roc_auc_score(yte == 1, -np.arange(len(yte))))}


def test_fixed_score_mean_auroc_over_balanced_classes_is_one_half():
    # why the report shows reconstruction AUROC per class only: its class mean carries no signal
    rng = np.random.default_rng(3)
    y = np.repeat(np.arange(5), 40)
    per = per_class_auroc(rng.normal(size=200) + y * 0.3, y)
    assert np.mean(list(per.values())) == pytest.approx(0.5)
    assert max(per.values()) > 0.7


def test_linear_probe_separable_and_shuffled():
    rng = np.random.default_rng(0)
    c, d = 10, 32
    w = rng.normal(size=(d, c))
    x = rng.normal(size=(6000, d)).astype(np.float32)
    s = np.sort(x @ w, axis=1)
    keep = s[:, -1] - s[:, -2] > 1.0  # linearly separable with a margin, by construction
    x, y = x[keep][:3000], (x @ w)[keep][:3000].argmax(1)
    res = linear_probe(x[:2000], y[:2000], x[2000:], y[2000:], seed=0)
    assert res["linear_top1"] > 98.0
    assert res["linear_top5"] == pytest.approx(100.0)
    assert res["linear_weight_decay"] in (1e-1, 1e-2, 1e-3, 1e-4, 1e-5)
    y_shuf = rng.permutation(y)
    res = linear_probe(x[:2000], y_shuf[:2000], x[2000:], y_shuf[2000:], seed=0)
    assert abs(res["linear_top1"] - 100 / c) < 6.0  # chance, ± ~3.5 standard errors


def test_linear_probe_never_reads_test_labels_for_selection():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(600, 8)).astype(np.float32)
    y = (x[:, 0] > 0).astype(int)
    a = linear_probe(x[:400], y[:400], x[400:], y[400:])
    b = linear_probe(x[:400], y[:400], x[400:], 1 - y[400:])  # flipped test labels
    assert a["linear_weight_decay"] == b["linear_weight_decay"]
    assert a["linear_val_top1"] == b["linear_val_top1"]
    assert a["linear_top1"] + b["linear_top1"] == pytest.approx(100.0)


def test_linear_probe_bad_input():
    x = np.zeros((10, 3), np.float32)
    with pytest.raises(ValueError, match="single class"):
        linear_probe(x, np.zeros(10, int), x, np.arange(10) % 2)
    with pytest.raises(ValueError, match="unlabelled"):
        linear_probe(x, np.arange(10) % 2, x, -np.ones(10, int))
