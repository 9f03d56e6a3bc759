"""SimCLR + reconstruction (``simclr_ae``): the loss is InfoNCE plus the weighted MSE of an
independent computation, ``recon_weight=0`` is SimCLR itself, bad settings name their key."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from methodkit import gray, gray_images

from selfsup.augment.views import normalize
from selfsup.config import ConfigError, load_config
from selfsup.pretrain.build import build_method
from selfsup.pretrain.methods.simclr import info_nce

SIDE = 16
INFO = gray(SIDE)
BASE = ["model.backbone=resnet_small", "model.width=0.25", "model.stem=cifar_s2"]


def _model(method: str, *extra: str):
    head = [f"method.{method}.proj_hidden=16", f"method.{method}.proj_out=8"]
    torch.manual_seed(0)
    return build_method(load_config(None, [*BASE, f"method.name={method}", *head, *extra]), INFO).train()


def _images(n: int = 6) -> torch.Tensor:
    return gray_images(n, SIDE)


@pytest.mark.parametrize("target", ["view", "image"])
def test_loss_is_infonce_plus_weighted_mse_of_an_independent_computation(target: str) -> None:
    model = _model("simclr_ae", "method.simclr_ae.recon_weight=0.7", f"method.simclr_ae.recon_target={target}",
                   "method.simclr_ae.recon_size=8")  # fmt: skip
    images = _images()
    torch.manual_seed(5)
    loss, logs = model(images)
    # the same views again (same seed), then every term by hand
    torch.manual_seed(5)
    v1, v2 = model.views(images, n_views=2)
    fmap = model.backbone.forward_features(torch.cat([v1, v2]))
    z1, z2 = model.head(fmap.mean((2, 3))).chunk(2)
    nce = info_nce(z1, z2, model.cfg.temperature).loss
    clean = normalize(images, INFO.mean, INFO.std)
    full = torch.cat([clean, clean]) if target == "image" else torch.cat([v1, v2])
    mse = F.mse_loss(model.decoder(fmap), F.avg_pool2d(full, 2))  # 16 px -> 8 px by 2x2 means
    torch.testing.assert_close(loss, nce + 0.7 * mse, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(logs["recon_mse"], mse.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(logs["infonce"], nce.detach(), rtol=1e-5, atol=1e-7)
    loss.backward()
    assert model.decoder.head.weight.grad.abs().sum() > 0 and model.backbone.conv1.weight.grad.abs().sum() > 0


def test_zero_weight_is_simclr() -> None:
    ours, simclr = _model("simclr_ae", "method.simclr_ae.recon_weight=0"), _model("simclr")
    images = _images()
    torch.manual_seed(7)
    a, _ = ours(images)
    torch.manual_seed(7)
    b, _ = simclr(images)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=0)
    a.backward(), b.backward()
    for name, p in simclr.named_parameters():
        torch.testing.assert_close(dict(ours.named_parameters())[name].grad, p.grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize(("override", "message"), [
    ("method.simclr_ae.recon_weight=-1", "method.simclr_ae.recon_weight must be >= 0"),
    ("method.simclr_ae.temperature=0", "method.simclr_ae.temperature must be > 0"),
    ("method.simclr_ae.recon_target=pixels", "method.simclr_ae.recon_target: 'pixels' is not one of view, image"),
    ("method.simclr_ae.code_channels=0", "method.simclr_ae.code_channels must be >= 1"),
])  # fmt: skip
def test_bad_settings_name_their_key_before_any_data(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["method.name=simclr_ae", override])


def test_impossible_combinations_are_named() -> None:
    with pytest.raises(ValueError, match="recon_size=32 is larger than the views"):
        _model("simclr_ae", "method.simclr_ae.recon_size=32")
    with pytest.raises(ValueError, match="simclr_ae"):
        build_method(load_config(None, ["method.name=simclr_ae", "model.backbone=vit_micro"]), INFO)
    with pytest.raises(ValueError, match="method.simclr_ae.small_crops is not supported"):
        _model("simclr_ae", "method.simclr_ae.small_crops=2")
