"""``selfsup eval``: how good is a pretrained representation, next to raw pixels and random init."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EPILOG = """\
protocols (all on frozen features; the backbone is never trained here):
  linear     logistic regression on standardised features (L-BFGS); weight decay chosen on a
             validation split carved from the TRAIN set; top-1/top-5 on test
  knn        weighted kNN (FAISS, cosine, vote exp(sim/T), T=0.07), k=20 and 200
  retrieval  test images as queries against the train set: Recall@1/5/10 and mAP@R;
             the index is saved to <out>/index for --query
  anomaly    each class in turn held out of the reference set: AUROC of the kNN distance, and of
             the reconstruction error for autoencoder runs (MAE/DAE/AE/VAE run directories; a
             VAE scores by its negative ELBO). Novelty detection when the autoencoder was
             pretrained on normal classes only (shards written with --exclude-classes, or
             --held-out-classes): AUROC, and TPR/F1/accuracy at a threshold picked on a
             validation half of the test set for --fpr, measured on the other half
  plot       2-D embedding of the test features coloured by class (PCA; --plot tsne|umap)
  properties (not in the default set; needs shards with factors, e.g. selfsup shards --source
             shapes) disentanglement (DCI, MIG, latent correlation and total correlation),
             sufficiency (linear-probe lower bound on I(y;z) in nats per class and factor),
             invariance to crop/flip/jitter/grayscale/blur/noise/rotation/translation, and the
             InfoNCE bound from the run's metrics.jsonl; heat map properties_importance.png
  lowshot    (not default) linear probe and kNN on 1% and 10% of the train labels, 3 seeded
             stratified subsets each; mean ± sd (--lowshot-fractions, --lowshot-runs)
  finetune   (not default) backbone + linear head trained end to end with the run's view recipe,
             AdamW, layer-wise lr decay for ViTs, lr chosen on a validation split of TRAIN; test
             top-1/top-5, beside the random-init backbone fine-tuned the same way

--representation latent runs the feature protocols (and properties) on the method's own code
(Method.latent: AE bottleneck, VAE posterior mean) instead of the backbone's features.

every protocol also runs on raw pixels and on the same backbone at random initialisation, so the
report shows what pretraining bought. Output: <out>/report.md, report.json, embedding_*.png.

examples:
  selfsup eval --checkpoint runs/simclr --train-shards shards/train --test-shards shards/test
  selfsup eval --checkpoint runs/simclr/export --protocols knn,linear --no-baselines
  selfsup eval --checkpoint runs/ae --baselines random_init     (no raw-pixel column)
  selfsup eval --checkpoint runs/simclr --query shirt.png     (uses runs/simclr/eval/index)
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument("--checkpoint", required=True,
                        help="run directory (uses checkpoints/latest), one .pt in it, or an "
                        "export folder (backbone.safetensors + config.json)")
    parser.add_argument("--train-shards", default=None,
                        help="labelled shard set used as probe training set / kNN database "
                        "(default: data.train of the run's config)")
    parser.add_argument("--test-shards", default=None,
                        help="labelled shard set to score (default: data.test of the run's config)")
    parser.add_argument("--out", default=None,
                        help="report folder (default: <run dir>/eval, or <export>/eval)")
    parser.add_argument("--protocols", default="linear,knn,retrieval,anomaly,plot",
                        help="comma-separated subset of linear,knn,retrieval,anomaly,plot,"
                        "properties,lowshot,finetune (default: the first five)")
    base = parser.add_mutually_exclusive_group()
    base.add_argument("--no-baselines", action="store_true",
                      help="skip the raw-pixel and random-init columns (faster)")
    base.add_argument("--baselines", default="raw_pixels,random_init", metavar="LIST",
                      help="comma-separated baseline columns: raw_pixels, random_init "
                      "(default: both)")
    parser.add_argument("--k", type=int, nargs="+", default=[20, 200],
                        help="neighbour counts for the kNN classifier (default: 20 200)")
    parser.add_argument("--temperature", type=float, default=0.07,
                        help="kNN vote temperature T in exp(sim/T) (default: 0.07)")
    parser.add_argument("--index", choices=("auto", "flat", "ivf", "hnsw"), default="auto",
                        help="search index: 'auto' (default) is exact 'flat' below 250k train "
                        "items and IVF from there on (kNN and retrieval); ivf/hnsw force an "
                        "approximate retrieval index; the recall@10 of an approximate one against "
                        "exact search on <= 2000 test queries is reported (approx_recall@10, "
                        "report notes, index/index.json)")
    parser.add_argument("--anomaly-class", type=int, nargs="+", default=None,
                        help="class id(s) to hold out as anomaly (default: every class in turn)")
    parser.add_argument("--held-out-classes", type=int, nargs="+", default=None, metavar="ID",
                        help="novelty detection: the classes the autoencoder never saw (default: "
                        "those the run's pretraining shards were written without)")
    parser.add_argument("--fpr", type=float, default=0.05,
                        help="target false-positive rate of the novelty threshold (default: 0.05)")
    parser.add_argument("--plot", choices=("pca", "tsne", "umap"), default="pca",
                        help="2-D projection for the embedding plot (umap needs umap-learn)")
    parser.add_argument("--batch-size", type=int, default=512,
                        help="images per forward pass during feature extraction (default: 512)")
    parser.add_argument("--device", default=None,
                        help="torch device for feature extraction (default: cuda if available)")
    parser.add_argument("--resize", action="store_true",
                        help="allow shards whose image size differs from the backbone's input "
                        "(they are resized, bilinear); without it a mismatch is an error")
    parser.add_argument("--no-cache", action="store_true",
                        help="do not cache features under <out>/features")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed for the validation split, random init and plot subsample")
    parser.add_argument("--representation", choices=("backbone", "latent"), default="backbone",
                        help="features the probes see: the backbone's (default) or the method's "
                        "latent code (methods with a latent hook: ae, vae, ...)")
    parser.add_argument("--lowshot-fractions", type=float, nargs="+", default=[0.01, 0.1],
                        metavar="F", help="label fractions of the lowshot protocol")
    parser.add_argument("--lowshot-runs", type=int, default=3,
                        help="seeded subsets per low-shot fraction (default: 3)")
    parser.add_argument("--finetune-epochs", type=int, default=5,
                        help="epochs per fine-tuning run (default: 5)")
    parser.add_argument("--finetune-lrs", type=float, nargs="+", default=[3e-3, 1e-3, 3e-4],
                        metavar="LR", help="AdamW learning rates tried; chosen on val of train")
    parser.add_argument("--finetune-layer-decay", type=float, default=0.75,
                        help="layer-wise lr decay for ViTs (MAE: 0.65 ViT-B, 0.75 ViT-L)")
    parser.add_argument("--finetune-batch-size", type=int, default=256)
    parser.add_argument("--finetune-max-train", type=int, default=0, metavar="N",
                        help="fine-tune on a stratified subset of N train images (0: all)")
    parser.add_argument("--query", default=None, metavar="IMAGE",
                        help="instead of evaluating: print the nearest training items of IMAGE "
                        "from the saved index and write <out>/query-<name>.png")
    parser.add_argument("--topk", type=int, default=8, help="neighbours shown by --query")


def run(args: argparse.Namespace) -> int:
    import torch

    from selfsup.api import shards_for
    from selfsup.eval.finetune import FinetuneOptions
    from selfsup.eval.query import query
    from selfsup.eval.run import EvalError, EvalOptions, resolve_checkpoint, run_eval
    from selfsup.pretrain.run.rundir import EVAL_DIR

    try:
        where = resolve_checkpoint(args.checkpoint)
        out = Path(args.out) if args.out else where.home / EVAL_DIR
        if args.query:
            png = out / f"query-{Path(args.query).stem}.png"
            rows = query(out / "index", args.query, args.topk, where.path, png)
            print(f"{'rank':>4}  {'similarity':>10}  {'class':<20} key")
            for r in rows:
                print(f"{r['rank']:>4}  {r['similarity']:>10.4f}  {r['class']:<20} {r['key']}")
            print(f"grid: {png}")
            return 0
        train, test = shards_for(where, args.train_shards, args.test_shards)
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        opts = EvalOptions(
            protocols=[p.strip() for p in args.protocols.split(",") if p.strip()],
            baselines=() if args.no_baselines else [b.strip() for b in args.baselines.split(",")
                                                    if b.strip()],
            knn_k=args.k, temperature=args.temperature, batch_size=args.batch_size,
            index=args.index, anomaly_classes=args.anomaly_class, plot=args.plot,
            held_out_classes=args.held_out_classes, novelty_fpr=args.fpr,
            device=device, seed=args.seed, cache=not args.no_cache, resize=args.resize,
            representation=args.representation, lowshot_fractions=args.lowshot_fractions,
            lowshot_runs=args.lowshot_runs, finetune=FinetuneOptions(
                epochs=args.finetune_epochs, lrs=args.finetune_lrs, seed=args.seed,
                layer_decay=args.finetune_layer_decay, batch_size=args.finetune_batch_size,
                max_train=args.finetune_max_train),
        )
        report = run_eval(where.path, train, test, out, opts)
    except (EvalError, FileNotFoundError, ValueError) as e:
        print(f"selfsup eval: error: {e}", file=sys.stderr)
        return 1
    print((out / "report.md").read_text())
    print(f"report: {out / 'report.md'}  ({report['meta']['timings_s']['total']:.1f} s)")
    return 0
