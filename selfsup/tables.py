"""Markdown tables of evaluation metrics (rows) by model (columns), shared by eval reports and
export model cards, with readable metric names."""

from __future__ import annotations

import math
from typing import Any

METRIC_NAMES = {
    "linear_top1": "Linear probe top-1 (%)",
    "linear_top5": "Linear probe top-5 (%)",
    "linear_weight_decay": "Linear probe weight decay (chosen on val)",
    "linear_val_top1": "Linear probe val top-1 (%)",
    "recall@1": "Retrieval Recall@1 (%)",
    "recall@5": "Retrieval Recall@5 (%)",
    "recall@10": "Retrieval Recall@10 (%)",
    "map@r": "Retrieval mAP@R (%)",
    "approx_recall@10": "Approximate index recall@10 vs exact (%)",
    "anomaly_knn_auroc": "Anomaly AUROC, kNN distance (mean over held-out classes)",
    "feature_dim": "Feature dimension",
    "recon_score_mean": "Mean anomaly score on test (reconstruction error; VAE: -ELBO, nats)",
    "novelty_auroc": "Novelty AUROC, held-out classes vs normal (reconstruction score)",
    "novelty_target_fpr": "Novelty threshold: target FPR on validation (%)",
    "novelty_fpr": "Novelty FPR at the threshold (%)",
    "novelty_tpr": "Novelty TPR (recall of anomalies) at the threshold (%)",
    "novelty_precision": "Novelty precision at the threshold (%)",
    "novelty_f1": "Novelty F1 at the threshold (%)",
    "novelty_accuracy": "Novelty accuracy at the threshold (%)",
    "novelty_threshold": "Novelty threshold (score units, picked on validation)",
    "novelty_eval_images": "Novelty: evaluation images (the half not used for the threshold)",
    "finetune_top1": "Fine-tune top-1 (%)",
    "finetune_top5": "Fine-tune top-5 (%)",
    "finetune_lr": "Fine-tune learning rate (chosen on val)",
    "finetune_val_top1": "Fine-tune val top-1 (%)",
}


PROPERTY_NAMES = {
    "dci_disentanglement": "DCI disentanglement [0, 1]",
    "dci_completeness": "DCI completeness [0, 1]",
    "dci_informativeness": "DCI informativeness (0 = chance, 1 = perfect)",
    "mig": "MIG (mutual information gap / H(factor))",
    "latent_mean_abs_corr": "Latent dims: mean absolute correlation",
    "latent_total_correlation": "Latent dims: Gaussian total correlation (nats)",
    "suff_class": "Sufficiency: I(class; z) lower bound (nats)",
    "suff_factors_mean": "Sufficiency: I(factor; z) lower bound, mean over factors (nats)",
    "inv_mean": "Invariance: normalised change, mean over transforms (0 = invariant)",
    "infonce_mi_bound": "InfoNCE bound log(2N−1) − L at the end of training (nats)",
    "infonce_ceiling": "InfoNCE ceiling log(2N−1) (nats)",
}


def property_name(key: str) -> str | None:
    if key in PROPERTY_NAMES:
        return PROPERTY_NAMES[key]
    if key.startswith("inv_"):
        return f"Invariance to {key[4:]}: normalised change"
    return None


def metric_name(key: str) -> str:
    """Readable name of a metric key (kNN keys are parametrised by k)."""
    if key in METRIC_NAMES:
        return METRIC_NAMES[key]
    if property_name(key):
        return property_name(key)
    if key.startswith("knn_top"):
        top, k = key[len("knn_top"):].split("_k")
        return f"kNN top-{top}, k={k} (%)"
    return key


def fmt_value(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, float):
        if v != 0 and (abs(v) < 1e-2 or abs(v) >= 1e5):
            return f"{v:.0e}"
        return f"{v:.3f}" if abs(v) <= 1 else f"{v:.2f}"
    return str(v)


def markdown_table(models: dict[str, dict[str, float]]) -> str:
    """Rows = metrics (in first-seen order), columns = models; a missing value shows as '–'."""
    keys: list[str] = []
    for metrics in models.values():
        keys += [k for k in metrics if k not in keys]
    names = list(models)
    lines = [
        "| Metric | " + " | ".join(names) + " |",
        "|---|" + "---:|" * len(names),
    ]
    for k in keys:
        cells = [fmt_value(models[n].get(k)) for n in names]
        lines.append(f"| {metric_name(k)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
