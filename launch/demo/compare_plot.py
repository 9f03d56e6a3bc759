"""The bar chart of ``selfsup demo --compare``: one group of bars per metric, one colour per method,
random init as hatched grey bars, raw pixels as a dashed line across each group, so a bar that
reaches over the dashed line is a method that beats raw pixels on that metric."""

from __future__ import annotations

import math
from pathlib import Path

SHORT = {"linear_top1": "linear top-1", "knn_top1_k20": "kNN top-1\nk=20",
         "knn_top1_k200": "kNN top-1\nk=200", "recall@1": "Recall@1", "map@r": "mAP@R",
         "anomaly_knn_auroc": "anomaly AUROC\n(kNN) ×100"}  # fmt: skip
RAW = "raw pixels"


def plot_comparison(result: dict, path: Path) -> Path:
    """Write the chart of ``compare.json``'s dict to ``path`` (PNG, matplotlib's Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models, methods = result["models"], result["methods"]
    metrics = [k for k in SHORT if any(m.get(k) is not None for m in models.values())]
    bars = [c for c in result["columns"] if c != RAW]
    scale = {k: 100.0 if k.endswith("auroc") else 1.0 for k in metrics}
    width = 0.84 / max(len(bars), 1)
    fig, ax = plt.subplots(figsize=(max(8.0, 1.5 + len(metrics) * (0.3 * len(bars) + 0.5)), 5.5))
    cmap = plt.get_cmap("tab10" if len(methods) <= 10 else "tab20")
    hatches = ["//", "\\\\", "xx", ".."]
    for i, col in enumerate(bars):
        xs = [m + (i - (len(bars) - 1) / 2) * width for m in range(len(metrics))]
        vals = [math.nan if models[col].get(k) is None else models[col][k] * scale[k]
                for k in metrics]  # fmt: skip
        if col in methods:
            ax.bar(xs, vals, width, color=cmap(methods.index(col) % cmap.N), label=col, zorder=2)
        else:
            j = i - len(methods)
            ax.bar(xs, vals, width, color="0.9", edgecolor="0.45", hatch=hatches[j % len(hatches)],
                   label=col, zorder=2)  # fmt: skip
    raw = models.get(RAW, {})
    for m, k in enumerate(metrics):
        if raw.get(k) is not None:
            ax.hlines(raw[k] * scale[k], m - 0.46, m + 0.46, colors="black", linestyles="--",
                      linewidth=1.6, zorder=3, label=RAW if m == 0 else None)  # fmt: skip
    ax.set_xticks(range(len(metrics)), [SHORT[k] for k in metrics])
    ax.set_ylabel("% (AUROC × 100)")
    ax.set_ylim(0, 100)
    ax.grid(axis="y", alpha=0.3, zorder=0)
    meta = result.get("meta", {})
    budget = (f"{meta['minutes']:g} min of pretraining each" if meta.get("sized_by_minutes")
              else "each recipe's own length")  # fmt: skip
    ax.set_title(f"selfsup demo --compare ({budget}); dashed: raw pixels")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=min(len(bars) + 1, 6),
              fontsize=8, frameon=False)  # fmt: skip
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
