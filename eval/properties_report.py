"""How the properties protocol reads in ``report.md``: metric names, its section, its heat map.

Kept apart from the computation (``eval.properties``) so that rendering a report imports neither
scikit-learn nor torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from selfsup.tables import PROPERTY_NAMES, property_name  # noqa: F401  (re-exported)


def _f(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return "–" if v != v else f"{v:.3f}"
    return str(v)


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    out += ["| " + " | ".join(_f(c) if i else str(c) for i, c in enumerate(r)) + " |" for r in rows]
    return out + [""]


def render_properties(props: dict[str, Any]) -> list[str]:
    """Markdown lines of the properties section (per-target, per-factor, per-transform tables)."""
    models = props.get("models", {})
    if not models:
        return []
    names = list(models)
    first = models[names[0]]
    lines = ["## Properties of the representation", ""]
    suff = first.get("sufficiency", {})
    if suff:
        lines += ["### Sufficiency: lower bound on I(y; z) = H(y) − CE of a linear probe (nats)", ""]
        rows = [[t, suff[t]["entropy"], *[models[m]["sufficiency"][t]["bound"] for m in names]]
                for t in suff]
        lines += _table(["Target", "H(y)", *names], rows)
    factors = first.get("factors", [])
    if factors:
        lines += ["### Disentanglement per factor", "",
                  "Informativeness: 0 = chance, 1 = perfect (discrete: (acc − chance)/(1 − chance); "
                  "continuous: R²). MIG gap normalised by the factor's entropy.", ""]
        header = ["Factor", *[f"{m} inform." for m in names], *[f"{m} MIG" for m in names]]
        rows = [[f, *[models[m]["informativeness"][f] for m in names],
                 *[models[m]["mig_per_factor"][f] for m in names]] for f in factors]
        lines += _table(header, rows)
    inv = first.get("invariance", {})
    if inv:
        lines += ["### Invariance: E‖f(g·x) − f(x)‖² / E‖f(x) − f(x′)‖² on L2-normalised features", ""]
        rows = [[g, *[models[m].get("invariance", {}).get(g, {}).get("ratio") for m in names]] for g in inv]
        lines += _table(["Transform g", *names], rows)
    return lines


def plot_importance(models: dict[str, dict[str, Any]], path: str | Path) -> Path:
    """Heat maps of the DCI importance matrices (factors x code dims), one panel per model, on one
    colour scale (each factor's row sums to 1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = [m for m in models if models[m].get("importance")]
    vmax = max(max(float(np.max(models[m]["importance"])) for m in names), 1e-9)  # one scale
    fig, axes = plt.subplots(len(names), 1, figsize=(10, 1.2 + 0.45 * len(models[names[0]]["factors"]) * len(names)),
                             squeeze=False)
    for ax, name in zip(axes[:, 0], names, strict=True):
        r = np.asarray(models[name]["importance"]).T  # [F, D]
        im = ax.imshow(r, aspect="auto", cmap="viridis", vmin=0, vmax=vmax)
        ax.set_yticks(range(r.shape[0]), models[name]["factors"])
        dims = "PCA components" if models[name].get("pca") else "code dims"
        ax.set_xlabel(f"{dims} ({r.shape[1]})")
        ax.set_title(f"{name}: DCI importance (gradient-boosted trees)", fontsize=10)
        fig.colorbar(im, ax=ax, fraction=0.03)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
