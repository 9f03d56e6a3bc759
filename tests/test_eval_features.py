"""Frozen feature extraction: BN buffers and train/eval flags untouched, equals a plain eval
forward, resize, cache keyed by weights, and 2-process extraction equals 1-process."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from selfsup.augment.views import normalize
from selfsup.config import ModelConfig
from selfsup.eval.features import (
    cached_features,
    extract_features,
    extract_features_from,
    weights_hash,
)
from selfsup.pretrain.models.backbones import build_backbone

MEAN, STD = (0.3,), (0.2,)


def _backbone(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_backbone(ModelConfig(backbone="resnet_small", stem="cifar_s2"), 1, 16)


def _images(n: int = 37, size: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 1, size, size), dtype=torch.uint8, generator=g)


def test_bn_buffers_and_modes_untouched_and_equal_to_eval_forward():
    net = _backbone()
    net.train()
    net.layer1.eval()  # a mixed state must come back exactly as it was
    before = {k: v.clone() for k, v in net.state_dict().items()}
    modes = {n: m.training for n, m in net.named_modules()}
    x = _images()
    feats = extract_features(net, x, MEAN, STD, batch_size=8)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed during extraction"
    assert {n: m.training for n, m in net.named_modules()} == modes
    net.eval()
    with torch.no_grad():
        want = net(normalize(x, MEAN, STD))
    assert feats.dtype == torch.float32 and feats.shape == (37, net.feature_dim)
    torch.testing.assert_close(feats, want, rtol=1e-5, atol=1e-5)
    # a train-mode forward WOULD have changed the running stats: the check above can fail
    net.train()
    net(normalize(x, MEAN, STD))
    assert not torch.equal(net.bn1.running_mean, before["bn1.running_mean"])


def test_iterable_variant_and_resize():
    net = _backbone()
    x = _images(20, size=24)
    whole = extract_features(net, x, MEAN, STD, batch_size=6, image_size=16)
    parts = extract_features_from(net, (x[i : i + 7] for i in range(0, 20, 7)), MEAN, STD,
                                  image_size=16)
    torch.testing.assert_close(whole, parts)
    small = torch.nn.functional.interpolate(normalize(x, MEAN, STD), size=(16, 16),
                                            mode="bilinear", antialias=True)
    with torch.no_grad():
        torch.testing.assert_close(whole, net.eval()(small), rtol=1e-5, atol=1e-5)


def test_bad_inputs():
    net = _backbone()
    with pytest.raises(ValueError, match="channel mismatch"):
        extract_features(net, torch.zeros(2, 3, 16, 16, dtype=torch.uint8), MEAN, STD)
    with pytest.raises(TypeError, match="uint8"):
        extract_features(net, torch.zeros(2, 1, 16, 16), MEAN, STD)
    with pytest.raises(ValueError, match="empty"):
        extract_features_from(net, [], MEAN, STD)


def test_cache_keyed_by_weights(tmp_path):
    net = _backbone(0)
    x = _images()
    a = cached_features(tmp_path, net, x, MEAN, STD)
    assert len(list(tmp_path.glob("features-*.npy"))) == 1
    torch.testing.assert_close(cached_features(tmp_path, net, x, MEAN, STD), a)
    assert len(list(tmp_path.glob("features-*.npy"))) == 1  # hit, nothing new written
    other = _backbone(1)
    assert weights_hash(other) != weights_hash(net)
    b = cached_features(tmp_path, other, x, MEAN, STD)
    assert len(list(tmp_path.glob("features-*.npy"))) == 2
    assert not torch.allclose(a, b)


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        torch.set_num_threads(1)
        feats = extract_features(_backbone(), _images(), MEAN, STD, batch_size=8,
                                 distributed=True)
        torch.save(feats, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_process_extraction_equals_single(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    want = extract_features(_backbone(), _images(), MEAN, STD, batch_size=8)
    for r in range(2):
        torch.testing.assert_close(torch.load(tmp_path / f"rank{r}.pt"), want,
                                   rtol=1e-5, atol=1e-5)
