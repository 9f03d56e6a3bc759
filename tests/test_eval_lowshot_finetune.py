"""Low-shot subsets, the fine-tune protocol and --representation latent, each against an
independent computation (numpy, the closed form of the layer-wise decay, bitwise weights)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from selfsup.eval.finetune import Classifier, FinetuneOptions, finetune, lr_scales, param_groups
from selfsup.eval.lowshot import lowshot, lowshot_subset, mean_sd


def _labels(seed=0):
    counts = [100, 120, 140, 160, 180, 200, 220, 240, 300, 340]  # unbalanced on purpose, 2000
    return np.random.default_rng(seed).permutation(np.repeat(np.arange(10), counts))


@pytest.mark.parametrize("fraction", [0.01, 0.1])
def test_subsets_stratified_seeded_train_only(fraction: float) -> None:
    y = _labels()
    a, b, c = (lowshot_subset(y, fraction, s) for s in (0, 0, 1))
    assert np.array_equal(a, b) and not np.array_equal(a, c)  # seeded; seeds differ
    assert len(a) == round(fraction * len(y)) and len(np.unique(a)) == len(a)
    assert set(np.unique(y[a])) == set(np.unique(y))  # every class present
    want = np.bincount(y, minlength=10) * len(a) / len(y)
    assert np.all(np.abs(np.bincount(y[a], minlength=10) - want) <= 1.0)  # proportions
    assert a.min() >= 0 and a.max() < len(y)  # indices into train rows only


def test_subsets_disjoint_from_test_and_mean_sd_over_n_runs() -> None:
    rng = np.random.default_rng(1)
    y = np.repeat(np.arange(4), 100)
    x = rng.normal(size=(400, 8)) + y[:, None]
    xte, yte = x[:100] + 100.0, y[:100]  # the "test" rows: far away, no train row equals one
    summary, details = lowshot(x, y, xte - 100.0, yte, fractions=(0.1,), runs=3, seed=5, k=(5,))
    d = details["10pct"]
    assert d["seeds"] == [5, 6, 7] and len(d["runs"]["linear_top1"]) == 3
    for m, values in d["runs"].items():
        assert summary[f"lowshot_10pct_{m}"] == pytest.approx(np.mean(values))
        assert summary[f"lowshot_10pct_{m}_sd"] == pytest.approx(np.std(values, ddof=1))
    for s in d["seeds"]:
        rows = x[lowshot_subset(y, 0.1, s)]
        assert not (rows[:, None, :] == xte[None, :, :]).all(-1).any()
    assert mean_sd([1.0, 2.0, 4.0]) == pytest.approx((7 / 3, np.std([1, 2, 4], ddof=1)))
    with pytest.raises(ValueError, match="fewer than"):
        lowshot_subset(y, 0.005, 0)


def test_layer_decay_closed_form_vit() -> None:
    from selfsup.pretrain.models.vit import VisionTransformer

    depth, d = 4, 0.7
    model = Classifier(VisionTransformer(16, 4, 1, 32, depth, 2), 10)
    scales = lr_scales(model, d)
    L = depth + 1
    for name, s in scales.items():
        if name.startswith(("backbone.patch_embed", "backbone.cls_token")):
            want = d ** L
        elif name.startswith("backbone.blocks."):
            want = d ** (L - 1 - int(name.split(".")[2]))
        else:  # final norm, head
            want = 1.0
        assert s == pytest.approx(want, rel=1e-12), name
    assert "backbone.pos_embed" not in scales  # frozen sin-cos table
    groups = param_groups(model, 1e-3, 0.05, d)
    for g in groups:
        assert g["lr"] == pytest.approx(1e-3 * g["lr_scale"])
        for n, p in zip(g["names"], g["params"], strict=True):
            assert (g["weight_decay"] == 0.0) == (p.ndim <= 1 or n.endswith("cls_token")), n


def _tiny_resnet():
    from selfsup.config import ModelConfig
    from selfsup.pretrain.models.backbones import build_backbone

    return build_backbone(ModelConfig(backbone="resnet_small", stem="cifar_s2", width=0.25), 1, 28)


def test_finetune_moves_a_copy_and_linear_leaves_weights_untouched(embedded_shards) -> None:
    from selfsup.augment.views import AugmentConfig, build_views
    from selfsup.data_info import DataInfo
    from selfsup.eval.features import extract_features, weights_hash
    from selfsup.eval.linear_probe import linear_probe
    from selfsup.pretrain.data.datasets import embedded

    src, te = embedded("train"), embedded("test")
    x = torch.from_numpy(src.images[:600]).permute(0, 3, 1, 2).contiguous()
    y = torch.from_numpy(src.labels[:600])
    xt = torch.from_numpy(te.images[:200]).permute(0, 3, 1, 2).contiguous()
    yt = torch.from_numpy(te.labels[:200])
    net = _tiny_resnet().train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    h0 = weights_hash(net)
    # linear protocol: frozen features then a probe -> bitwise untouched (BN running stats too)
    f, ft = extract_features(net, x, (0.5,), (0.5,)), extract_features(net, xt, (0.5,), (0.5,))
    linear_probe(f, y, ft, yt)
    assert weights_hash(net) == h0 and net.training
    views = build_views(AugmentConfig(recipe="mae"), DataInfo(1, 28, (0.5,), (0.5,)))
    opts = FinetuneOptions(epochs=1, lrs=(1e-3,), batch_size=64)
    _, details = finetune(net, views, x, y, xt, yt, 10, opts)
    assert weights_hash(net) == h0  # the passed-in backbone is copied, never modified
    tuned = details["model"].backbone.state_dict()
    moved = [k for k, v in before.items() if v.is_floating_point() and not torch.equal(v, tuned[k])]
    params = [k for k, _ in net.named_parameters()]
    assert set(params) <= set(moved)  # every trainable weight moved
    # negative control: a head-only "fine-tune" (backbone frozen) fails the same check
    frozen = _tiny_resnet()
    for p in frozen.parameters():
        p.requires_grad_(False)
    ref = {k: v.clone() for k, v in frozen.state_dict().items()}
    _, d2 = finetune(frozen, views, x, y, xt, yt, 10, opts)
    tuned2 = d2["model"].backbone.state_dict()
    assert not any(not torch.equal(v, tuned2[k]) for k, v in ref.items() if k in params)


def _run(tmp_path, shards: str, method: str) -> str:
    from accelerate.state import AcceleratorState, GradientState

    from selfsup.api import pretrain

    # an in-process run builds its own Accelerator: clear what an earlier test left (as
    # accelerate's AccelerateTestCase does), or a different precision is refused
    AcceleratorState._reset_state(True)
    GradientState._reset_state()

    ov = [f"data.train={shards}", f"run_dir={tmp_path / method}", "model.backbone=resnet_small",
          "model.stem=cifar_s2", "model.width=0.25", "data.batch_size=64", "data.workers=1",
          "train.max_steps=3", "log.progress=false", "log.wandb=off", f"method.name={method}"]
    if method == "vae":
        ov += ["augment.recipe=none", "method.vae.latent_dim=6"]
    return str(pretrain(overrides=ov))


def test_latent_representation_vae_and_error_without_hook(tmp_path, small_shards,
                                                          embedded_shards) -> None:
    from selfsup.eval.representation import methods_with_latent
    from selfsup.eval.run import EvalError, EvalOptions, run_eval

    assert {"ae", "vae", "beta_vae"} <= set(methods_with_latent())
    assert "simclr" not in methods_with_latent()
    vae = _run(tmp_path, small_shards, "vae")
    kw = {"protocols": ("linear", "knn"), "knn_k": (20,), "baselines": ("random_init",)}
    lat = run_eval(vae, small_shards, embedded_shards["test"], tmp_path / "lat",
                   EvalOptions(representation="latent", **kw))
    back = run_eval(vae, small_shards, embedded_shards["test"], tmp_path / "back",
                    EvalOptions(**kw))
    assert lat["models"]["pretrained"]["feature_dim"] == 6  # the code, not the backbone
    assert lat["models"]["random_init"]["feature_dim"] == 6
    assert back["models"]["pretrained"]["feature_dim"] > 6
    assert lat["meta"]["representation"].startswith("latent: vae")
    assert back["meta"]["representation"].startswith("backbone")
    assert "Representation:** latent" in (tmp_path / "lat" / "report.md").read_text()
    simclr = _run(tmp_path, small_shards, "simclr")
    # before any work: the shard paths do not exist, yet the error is the representation's
    with pytest.raises(EvalError, match="method 'simclr' has no latent hook"):
        run_eval(simclr, tmp_path / "nope", tmp_path / "nope", tmp_path / "out",
                 EvalOptions(representation="latent"))


def test_finetune_learns_and_lr_is_chosen_on_validation() -> None:
    """The weaker property (see the report): a briefly pretrained backbone did NOT reliably beat
    random init in a CPU-sized fine-tune, so this checks that fine-tuning learns far above chance
    and that the lr kept is the validation argmax (test never consulted)."""
    from selfsup.augment.views import AugmentConfig, build_views
    from selfsup.data_info import DataInfo
    from selfsup.pretrain.data.datasets import embedded

    src, te = embedded("train"), embedded("test")
    x = torch.from_numpy(src.images[:1000]).permute(0, 3, 1, 2).contiguous()
    y = torch.from_numpy(src.labels[:1000])
    xt = torch.from_numpy(te.images[:300]).permute(0, 3, 1, 2).contiguous()
    yt = torch.from_numpy(te.labels[:300])
    views = build_views(AugmentConfig(recipe="mae", scale=(0.6, 1.0)), DataInfo(1, 28, (0.3,), (0.35,)))
    opts = FinetuneOptions(epochs=3, lrs=(1e-7, 3e-3), batch_size=64, label_smoothing=0.0)
    m, d = finetune(_tiny_resnet(), views, x, y, xt, yt, 10, opts)
    per = {float(k): v for k, v in d["val_top1_per_lr"].items()}
    assert m["finetune_lr"] == max(per, key=per.get) == 3e-3
    assert m["finetune_val_top1"] == per[3e-3]
    assert m["finetune_top1"] > 30.0 and per[1e-7] < per[3e-3] - 10, per  # chance: 10%
