"""Orchestrate every protocol for a checkpoint and its two baselines, and write one report.

The three columns of the report are the same protocols on: the pretrained backbone, raw pixels
(normalised, flattened; area-downsampled to at most ``RAW_PIXEL_DIMS`` values), and the same
architecture at random initialisation (seeded). ``evaluate_features`` works on plain arrays, so
anything that yields features can be evaluated the same way.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from selfsup.augment.views import normalize
from selfsup.eval.anomaly import knn_anomaly_auroc, per_class_auroc, reconstruction_scores
from selfsup.eval.features import cached_features, extract_features, weights_hash
from selfsup.eval.finetune import FinetuneOptions
from selfsup.eval.inputs import (  # noqa: F401  (re-exported: eval.run is the entry point)
    EvalError,
    LabelledSet,
    check_compatible,
    load_labelled,
    load_method,
    load_model,
    model_config,
    random_init_like,
    resolve_checkpoint,
)
from selfsup.eval.knn import (
    INDEX_KINDS,
    approximate_recall,
    as_numpy,
    build_index,
    choose_index,
    knn_classify,
    recall_sample,
    retrieval_metrics,
    save_index,
)
from selfsup.eval.linear_probe import DEFAULT_WEIGHT_DECAYS, linear_probe
from selfsup.eval.lowshot import DEFAULT_FRACTIONS, DEFAULT_RUNS, lowshot
from selfsup.eval.novelty import DEFAULT_FPR, excluded_classes, novelty_report
from selfsup.eval.plots import plot_embeddings, project_2d, subsample
from selfsup.eval.report import write_report
from selfsup.eval.representation import REPRESENTATIONS, check_representation, describe
from selfsup.eval.wandb_log import log_to_training_run
from selfsup.pretrain.run import rundir

DEFAULT_PROTOCOLS = ("linear", "knn", "retrieval", "anomaly", "plot")
# not in the default set: properties needs shards with factors; lowshot and finetune cost more
PROTOCOLS = (*DEFAULT_PROTOCOLS, "properties", "lowshot", "finetune")
BASELINES = ("raw_pixels", "random_init")
# --index auto (the default): exact search below AUTO_THRESHOLD database items, IVF (these k-means
# settings, eval/knn.py build_index) from it on; measured in benchmarks/bench_costs.py --parts eval
AUTO_THRESHOLD = 250_000
AUTO_IVF = {"nprobe": 16, "niter": 10, "max_points_per_centroid": 64}
RAW_PIXEL_DIMS = 4096


@dataclass
class EvalOptions:
    protocols: Sequence[str] = DEFAULT_PROTOCOLS
    baselines: Sequence[str] = BASELINES
    knn_k: Sequence[int] = (20, 200)
    temperature: float = 0.07
    probe_weight_decays: Sequence[float] = DEFAULT_WEIGHT_DECAYS
    batch_size: int = 512
    index: str = "auto"  # auto | flat | ivf | hnsw (retrieval database index)
    approx_threshold: int = AUTO_THRESHOLD  # auto: ivf from this many database items on
    recall_queries: int = 2000  # an approximate index's recall check vs flat: at most this many
    anomaly_classes: list[int] | None = None  # None: every class in turn
    anomaly_k: int = 5
    held_out_classes: list[int] | None = None  # novelty detection; None: the pretraining set's exclusions
    novelty_fpr: float = DEFAULT_FPR  # target false-positive rate of its threshold
    plot: str = "pca"  # pca | tsne | umap
    plot_points: int = 2000
    device: str | None = None
    seed: int = 0
    cache: bool = True  # cache features under <out>/features keyed by weights + images hash
    resize: bool = False  # allow shard images whose size differs from the backbone's input size
    extra_notes: list[str] = field(default_factory=list)
    representation: str = "backbone"  # backbone | latent (the method's own code: Method.latent)
    lowshot_fractions: Sequence[float] = DEFAULT_FRACTIONS
    lowshot_runs: int = DEFAULT_RUNS
    finetune: FinetuneOptions = field(default_factory=FinetuneOptions)

    def check(self) -> None:
        bad = [p for p in self.protocols if p not in PROTOCOLS]
        if bad or not self.protocols:
            raise EvalError(f"unknown protocol(s) {bad or '(none)'}; choose from {', '.join(PROTOCOLS)}")
        bad = [b for b in self.baselines if b not in BASELINES]
        if bad:
            raise EvalError(f"unknown baseline(s) {bad}; choose from {', '.join(BASELINES)}")
        if not 0.0 < self.novelty_fpr < 1.0:
            raise EvalError(f"--fpr: a false-positive rate in (0, 1), got {self.novelty_fpr}")
        if self.index not in ("auto", *INDEX_KINDS):
            raise EvalError(f"--index: '{self.index}' is not one of auto, {', '.join(INDEX_KINDS)}")
        if self.approx_threshold < 1 or self.recall_queries < 1:
            raise EvalError(f"approx_threshold and recall_queries must be >= 1, got "
                            f"{self.approx_threshold} and {self.recall_queries}")
        if self.representation not in REPRESENTATIONS:
            raise EvalError(f"--representation: '{self.representation}' is not one of "
                            f"{', '.join(REPRESENTATIONS)}")
        if self.lowshot_runs < 1 or not all(0 < f <= 1 for f in self.lowshot_fractions):
            raise EvalError(f"--lowshot-fractions in (0, 1] and --lowshot-runs >= 1, got "
                            f"{list(self.lowshot_fractions)} and {self.lowshot_runs}")
        try:
            self.finetune.check()
        except ValueError as e:
            raise EvalError(str(e)) from e


def evaluate_features(
    train_feats: torch.Tensor | np.ndarray,
    train_labels: torch.Tensor | np.ndarray,
    test_feats: torch.Tensor | np.ndarray,
    test_labels: torch.Tensor | np.ndarray,
    opts: EvalOptions,
    num_classes: int,
) -> tuple[dict[str, float], dict[str, Any]]:
    """All feature-based protocols on one feature set: ``(metrics, extras)``.

    ``extras`` holds what is not a single number: the exact retrieval index (``index``) and the
    per-class anomaly AUROCs (``anomaly_knn``).
    """
    metrics: dict[str, float] = {"feature_dim": int(np.asarray(train_feats).shape[1])}
    extras: dict[str, Any] = {}
    need_index = {"knn", "retrieval"} & set(opts.protocols)
    exact = build_index(train_feats) if need_index else None
    kind, why = choose_index(opts.index, int(np.asarray(train_feats).shape[0]), opts.approx_threshold)
    approx = None
    if need_index and kind != "flat":  # its recall@10 vs flat on (a sample of) the test queries
        approx = build_index(train_feats, kind=kind, seed=opts.seed,
                             **(AUTO_IVF if opts.index == "auto" else {}))
        rows = recall_sample(len(test_feats), opts.recall_queries, opts.seed)
        metrics["approx_recall@10"] = approximate_recall(exact, approx, as_numpy(test_feats)[rows], 10)
        extras["index_info"] = {"kind": kind, "chosen": why, "database": len(train_feats),
                                "recall@10_vs_flat": metrics["approx_recall@10"],
                                "recall_queries": len(rows), "recall_seed": opts.seed}
    else:
        extras["index_info"] = {"kind": "flat", "chosen": why, "database": len(train_feats)}
    # auto above the threshold: kNN searches the approximate index too (exact search is what
    # stops paying); an explicit --index ivf|hnsw is for retrieval only, as it always was
    knn_index = approx if opts.index == "auto" and approx is not None else exact
    if "linear" in opts.protocols:
        metrics.update(linear_probe(train_feats, train_labels, test_feats, test_labels,
                                    opts.probe_weight_decays, seed=opts.seed,
                                    num_classes=num_classes, device=opts.device))
    if "knn" in opts.protocols:
        metrics.update(knn_classify(train_feats, train_labels, test_feats, test_labels,
                                    k=opts.knn_k, temperature=opts.temperature,
                                    num_classes=num_classes, index=knn_index))
    if "retrieval" in opts.protocols:
        index = approx if approx is not None else exact
        metrics.update(retrieval_metrics(train_feats, train_labels, test_feats, test_labels,
                                         index=index))
        extras["index"] = index
    if "anomaly" in opts.protocols:
        per = knn_anomaly_auroc(train_feats, train_labels, test_feats, test_labels,
                                opts.anomaly_classes, k=opts.anomaly_k)
        metrics["anomaly_knn_auroc"] = float(np.mean(list(per.values())))
        extras["anomaly_knn"] = per
    if "lowshot" in opts.protocols:
        summary, extras["lowshot"] = lowshot(
            train_feats, train_labels, test_feats, test_labels, opts.lowshot_fractions,
            opts.lowshot_runs, opts.seed, (min(opts.knn_k),), opts.temperature,
            opts.probe_weight_decays, num_classes, opts.device)
        metrics.update(summary)
    return metrics, extras


def raw_pixel_features(images_uint8: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Normalised pixels flattened to ``[N, C·s·s]``, area-downsampled so that C·s·s ≤ 4096."""
    c, h = images_uint8.shape[1], images_uint8.shape[2]
    side = h
    while c * side * side > RAW_PIXEL_DIMS:
        side -= 1
    chunks = []
    for i in range(0, images_uint8.shape[0], 4096):
        x = normalize(images_uint8[i : i + 4096], mean, std)
        if side != h:
            x = F.interpolate(x, size=(side, side), mode="area")
        chunks.append(x.flatten(1))
    return torch.cat(chunks)


# ---------------------------------------------------------------- inputs: checkpoint and shards
# ---------------------------------------------------------------- the whole evaluation


def run_eval(
    checkpoint: str | Path, train_shards: str | Path, test_shards: str | Path,
    out_dir: str | Path, opts: EvalOptions | None = None,
) -> dict[str, Any]:
    """Every requested protocol on pretrained / raw pixels / random init; writes the report."""
    opts = opts or EvalOptions()
    opts.check()
    out = Path(out_dir)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    where = resolve_checkpoint(checkpoint)
    latent_of = check_representation(where, opts.representation)  # before any work
    ckpt = where.checkpoint or where.path
    backbone = load_model(where)
    if opts.device:
        backbone.to(opts.device)
    info = backbone.data_info
    train = load_labelled(train_shards, "train")
    test = load_labelled(test_shards, "test")
    for data, what in ((train, "train"), (test, "test")):
        check_compatible(data, info, what, opts.resize)
    if "properties" in opts.protocols:  # before any feature is extracted: no factors, no run
        from selfsup.eval.properties import load_factor_data
        from selfsup.pretrain.data.factors import FactorError

        try:
            factor_data = load_factor_data(train.path, train.keys, train.labels, test.path,
                                           test.keys, test.labels)
        except FactorError as e:
            raise EvalError(f"properties protocol: {e}") from e
    if test.labels.unique().numel() < 2:
        raise EvalError(
            f"single-class test set: {test.path} holds only class "
            f"{test.classes[int(test.labels[0])]!r}; accuracy and AUROC need at least two classes"
        )
    num_classes = max(len(train.classes), len(test.classes))
    timings["load"] = time.perf_counter() - t0

    cache = out / "features" if opts.cache else None
    kw = {"mean": info.mean, "std": info.std, "batch_size": opts.batch_size,
          "device": opts.device, "image_size": info.image_size}
    feats: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    feature_fns: dict = {}
    t = time.perf_counter()
    rand = (random_init_like(where, info, opts.seed).to(opts.device or "cpu")
            if "random_init" in opts.baselines else None)
    if latent_of is not None:
        from selfsup.eval.representation import latent_columns

        coded, feature_fns = latent_columns(where, train.images, test.images, rand is not None,
                                            opts.seed, opts.batch_size, opts.device, info.mean,
                                            info.std)
        feats["pretrained"] = coded["pretrained"]
    else:
        feats["pretrained"] = (cached_features(cache, backbone, train.images, **kw),
                               cached_features(cache, backbone, test.images, **kw))
    if "raw_pixels" in opts.baselines:
        feats["raw_pixels"] = (raw_pixel_features(train.images, info.mean, info.std),
                               raw_pixel_features(test.images, info.mean, info.std))
    if rand is not None:
        feats["random_init"] = (coded["random_init"] if latent_of is not None else
                                (extract_features(rand, train.images, **kw),
                                 extract_features(rand, test.images, **kw)))
    timings["features"] = time.perf_counter() - t

    models: dict[str, dict[str, float]] = {}
    anomaly_per_class: dict[str, dict[str, dict[int, float]]] = {}
    notes = list(opts.extra_notes)
    extra_tables: dict[str, dict[str, Any]] = {}
    index_choice: dict[str, Any] = {}
    for name, (ftr, fte) in feats.items():
        t = time.perf_counter()
        metrics, extras = evaluate_features(ftr, train.labels, fte, test.labels, opts, num_classes)
        models[name] = metrics
        if "anomaly_knn" in extras:
            anomaly_per_class.setdefault(name, {})["knn"] = extras["anomaly_knn"]
        for key in ("lowshot",):
            if key in extras:
                extra_tables.setdefault(key, {})[name] = extras[key]
        info_ix = extras.get("index_info", {})
        if name == "pretrained":
            index_choice = info_ix
        if name == "pretrained" and info_ix.get("kind", "flat") != "flat":
            notes.append(f"Search index: {info_ix['kind']} ({info_ix['chosen']}); its recall@10 "
                         f"against exact search: {info_ix['recall@10_vs_flat']:.1f}% on "
                         f"{info_ix['recall_queries']} test queries (approx_recall@10).")
        if name == "pretrained" and "index" in extras and latent_of is None:
            save_index(out / "index", extras["index"], train.labels, train.keys, {
                "checkpoint": str(ckpt.resolve()), "weights_hash": weights_hash(backbone),
                "train_shards": str(Path(train.path).resolve()), "classes": train.classes,
                "index": extras["index_info"]["kind"], "index_choice": extras["index_info"],
            })
        timings[f"protocols_{name}"] = time.perf_counter() - t

    if "anomaly" in opts.protocols:
        t = time.perf_counter()
        method = load_method(where)
        if method is not None:
            method.to(opts.device or "cpu")
            scores = reconstruction_scores(method, test.images, opts.batch_size, opts.device,
                                           opts.seed)
            per = per_class_auroc(scores, test.labels, opts.anomaly_classes)
            anomaly_per_class.setdefault("pretrained", {})["reconstruction"] = per
            models["pretrained"]["recon_score_mean"] = float(scores.mean())
            notes.append(f"recon_score_mean: mean anomaly score of the test images "
                         f"({method.anomaly_score_unit}).")
            held_out = opts.held_out_classes or excluded_classes(
                rundir.read_config(where.run_dir).data.train)
            if held_out:
                metrics, note = novelty_report(scores, test.labels.numpy(), test.classes, held_out,
                                               opts.novelty_fpr, opts.seed)
                models["pretrained"].update(metrics)
                notes.append(note)
            notes.append(
                "Reconstruction AUROC (per-class table): one fixed score is ranked with each class "
                "in turn as the anomaly. "
                + ("" if held_out else "The autoencoder was pretrained on all classes, so its mean "
                   "over balanced classes is 0.5 by construction, hence no summary row; ")
                + "a class far from 0.5 is one the autoencoder reconstructs unusually well or badly. "
                "MAE scores the hidden patches in its training target space (standardised per "
                "patch with norm_pix_loss), so no score reads the statistics of what it scores.")
        timings["reconstruction"] = time.perf_counter() - t
        notes.append("kNN anomaly AUROC: the held-out class is removed from the reference "
                     "(train) features; the backbone's unlabelled pretraining data included it.")

    figures: list[str] = []
    if "plot" in opts.protocols:
        t = time.perf_counter()
        idx = subsample(test.images.shape[0], opts.plot_points, opts.seed)
        panels = {n: (project_2d(fte[idx], opts.plot, opts.seed), test.labels[idx].numpy())
                  for n, (_, fte) in feats.items()}
        png = plot_embeddings(panels, test.classes, out / f"embedding_{opts.plot}.png",
                              f"test set, {opts.plot.upper()} of frozen features")
        figures.append(png.name)
        timings["plot"] = time.perf_counter() - t
    properties = None
    if "properties" in opts.protocols:
        t, cpu = time.perf_counter(), time.process_time()
        from selfsup.eval.properties import run_properties

        nets = {"pretrained": backbone, "random_init": rand if "random_init" in feats else None}
        properties = run_properties(feats, factor_data, nets, test.images, info, out, opts.seed,
                                    opts.device, where.run_dir, RAW_PIXEL_DIMS, feature_fns)
        for name, summary in properties["summary"].items():
            models[name].update(summary)
        figures.append(properties["figure"])
        notes += properties["notes"]
        timings["properties"] = time.perf_counter() - t
        timings["properties_cpu"] = time.process_time() - cpu  # all threads: load-independent-ish
    if "lowshot" in opts.protocols:
        from selfsup.eval.lowshot import note as lowshot_note

        notes.append(lowshot_note(opts.lowshot_fractions, opts.lowshot_runs))
    if "finetune" in opts.protocols:
        t = time.perf_counter()
        from selfsup.eval.finetune import run_finetune

        ft = run_finetune(where, info, {"pretrained": backbone, "random_init": rand}, train, test,
                          num_classes, replace(opts.finetune, seed=opts.seed), opts.device)
        for name, m in ft["metrics"].items():
            models[name].update(m)
        extra_tables["finetune"] = ft["details"]
        notes.append(ft["note"])
        timings["finetune"] = time.perf_counter() - t
    if latent_of is not None:
        notes.append(f"Representation: the code of {latent_of}'s latent hook for the pretrained "
                     "and random_init columns (the method built with the seed); raw pixels as "
                     "ever; finetune (if run) trains the backbone; no retrieval index is saved.")
    timings["total"] = time.perf_counter() - t0

    report = {
        "meta": {
            "checkpoint": str(ckpt), "train_shards": str(train_shards),
            "test_shards": str(test_shards),
            "sizes": f"{train.images.shape[0]} / {test.images.shape[0]}",
            "classes": test.classes, "protocols": list(opts.protocols),
            "representation": describe(opts.representation, latent_of,
                                       models["pretrained"]["feature_dim"]),
            "weights_hash": weights_hash(backbone), "figures": figures, "notes": notes,
            "timings_s": timings, "index": index_choice,
            "units": "accuracy, recall and mAP in %; AUROC in [0, 1]",
        },
        "models": models,
        "anomaly_per_class": {m: {s: {str(c): v for c, v in d.items()} for s, d in per.items()}
                              for m, per in anomaly_per_class.items()},
    }
    if properties is not None:
        report["properties"] = {"models": properties["models"]}
    report.update(extra_tables)
    write_report(report, out)
    report["meta"]["wandb_run"] = log_to_training_run(report, where, out)
    return report
