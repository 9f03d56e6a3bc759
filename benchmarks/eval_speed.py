"""Wall time of the evaluation protocols on ImageNet-probe-like sizes (default 60k x 512, 10k test).

Features are Gaussian class clusters whose separation sets how hard the probe is (``--spread``):
a large spread gives the well-separated case, a small one the slowly-converging weakly regularised
case. Run: ``python benchmarks/eval_speed.py [--n 60000 --d 512 --classes 10 --spread 0.15]``.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from selfsup.eval.knn import knn_classify, retrieval_metrics
from selfsup.eval.linear_probe import linear_probe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=60000)
    ap.add_argument("--test", type=int, default=10000)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--spread", type=float, nargs="+", default=[0.15, 0.05])
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    for spread in args.spread:
        centers = torch.randn(args.classes, args.d, generator=g) * spread
        ytr = torch.randint(0, args.classes, (args.n,), generator=g)
        yte = torch.randint(0, args.classes, (args.test,), generator=g)
        xtr = centers[ytr] + torch.randn(args.n, args.d, generator=g)
        xte = centers[yte] + torch.randn(args.test, args.d, generator=g)
        row = {"n": args.n, "d": args.d, "spread": spread, "threads": torch.get_num_threads()}
        for name, fn in (
            ("linear_probe", linear_probe),
            ("knn", knn_classify),
            ("retrieval", retrieval_metrics),
        ):
            t = time.perf_counter()
            res = fn(xtr, ytr, xte, yte)
            row[f"{name}_s"] = round(time.perf_counter() - t, 2)
            row.update({k: round(v, 4) for k, v in res.items()})
        print(json.dumps(row))


if __name__ == "__main__":
    main()
