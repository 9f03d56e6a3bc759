"""Denoising autoencoder: decoder sizing, losses, corruption wiring, plain AE, reconstruction grid."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from selfsup.config import load_config
from selfsup.data_info import DataInfo
from selfsup.pretrain.build import build_method
from selfsup.pretrain.hooks.recon import GAP_PX, save_reconstruction_grid
from selfsup.pretrain.methods.dae import reconstruction_loss, upsampling_plan

GRAY28 = DataInfo(channels=1, image_size=28, mean=(0.29,), std=(0.35,))
RGB32 = DataInfo(channels=3, image_size=32, mean=(0.5, 0.4, 0.3), std=(0.25, 0.2, 0.3))


def dae_cfg(*overrides: str):
    base = ["method.name=dae", "model.backbone=resnet_small", "model.stem=cifar_s2"]
    return load_config(None, [*base, "augment.recipe=none", *overrides])


def images(info: DataInfo, n: int = 4, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = (n, info.channels, info.image_size, info.image_size)
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)


def halvings(size: int, feature: int) -> int:
    n = 0
    while size != feature:
        size, n = math.ceil(size / 2), n + 1
    return n


@pytest.mark.parametrize("image", [7, 8, 28, 31, 32, 64, 96, 224])
def test_upsampling_plan_inverts_ceil_halving(image):
    feature = image
    while True:
        plan = upsampling_plan(feature, image)
        assert len(plan) == halvings(image, feature)
        size = feature
        for pad in plan:  # PyTorch docs: (H - 1) * stride - 2 * padding + kernel + output_padding
            assert pad in (0, 1)
            size = (size - 1) * 2 - 2 * 1 + 3 + pad
        assert size == image
        if feature == 1:
            break
        feature = math.ceil(feature / 2)


def test_unreachable_decoder_is_a_clear_error():
    with pytest.raises(ValueError, match="cannot reach 28 px from a 3 px"):
        upsampling_plan(3, 28)
    with pytest.raises(ValueError, match="cannot reach 28 px from a 30 px"):
        upsampling_plan(30, 28)


@pytest.mark.parametrize(
    ("stem", "info"), [("cifar_s2", GRAY28), ("cifar", RGB32), ("imagenet", GRAY28)]
)
def test_dae_reconstructs_at_input_size(stem, info):
    dae = build_method(dae_cfg(f"model.stem={stem}"), info)
    x = images(info)
    loss, logs = dae(x)
    assert logs == {} and loss.ndim == 0
    loss.backward()
    missing = [n for n, p in dae.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []  # DDP without find_unused_parameters needs every parameter used
    out = dae.reconstruct(x)
    for key in ("input", "corrupted", "reconstruction"):
        assert out[key].shape == x.shape
        assert out[key].min() >= 0 and out[key].max() <= 1
    torch.testing.assert_close(out["input"], x.float() / 255, atol=1e-6, rtol=0)


def test_losses_match_their_formulas():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 1, 5, 5, generator=g) * 2, torch.randn(2, 1, 5, 5, generator=g)
    r = (a - b).abs()
    torch.testing.assert_close(reconstruction_loss(a, b, "mse"), (r**2).mean())
    torch.testing.assert_close(reconstruction_loss(a, b, "l1"), r.mean())
    d = 0.7
    huber = torch.where(r <= d, 0.5 * r**2, d * (r - 0.5 * d)).mean()
    torch.testing.assert_close(reconstruction_loss(a, b, "huber", d), huber)
    with pytest.raises(ValueError, match="method.dae.loss: 'l3'"):
        reconstruction_loss(a, b, "l3")
    with pytest.raises(ValueError, match="huber_delta"):
        reconstruction_loss(a, b, "huber", 0.0)


def test_plain_autoencoder_when_noise_is_none():
    dae = build_method(dae_cfg("method.dae.corrupt.kind=none"), GRAY28)
    x = images(GRAY28)
    out = dae.reconstruct(x)
    assert torch.equal(out["corrupted"], out["input"])
    # undercomplete: 32 code channels x 2x2 = 128 values < 784 pixels
    with pytest.raises(ValueError, match="undercomplete"):
        build_method(dae_cfg("method.dae.corrupt.kind=none", "method.dae.code_channels=256"), GRAY28)
    # an overcomplete code is allowed when noise prevents learning the identity
    build_method(dae_cfg("method.dae.corrupt.kind=gaussian", "method.dae.code_channels=256"), GRAY28)


def test_corruptions_are_applied_to_the_normalised_input():
    g = torch.Generator().manual_seed(0)
    dae = build_method(dae_cfg("method.dae.corrupt.kind=gaussian", "method.dae.corrupt.sigma=0.5"), GRAY28)
    clean = torch.zeros(8, 1, 28, 28)
    noise = dae.corrupt(clean, g) - clean
    assert abs(noise.std().item() - 0.5) < 0.02
    sp = build_method(
        dae_cfg("method.dae.corrupt.kind=saltpepper", "method.dae.corrupt.fraction=0.25"), GRAY28
    )
    out = sp.reconstruct(torch.full((2, 1, 28, 28), 128, dtype=torch.uint8), generator=g)
    hit = out["corrupted"] != out["input"]
    # salt and pepper are pure white / black pixels, exactly a quarter of each image
    assert set(out["corrupted"][hit].unique().tolist()) == {0.0, 1.0}
    assert hit.flatten(1).sum(1).tolist() == [196, 196]


def test_bad_dae_config_fails_before_training():
    with pytest.raises(ValueError, match="code_channels"):
        build_method(dae_cfg("method.dae.code_channels=0"), GRAY28)
    with pytest.raises(ValueError, match="corrupt.sigma"):
        build_method(dae_cfg("method.dae.corrupt.sigma=-1.0"), GRAY28)
    vit = load_config(None, ["model.backbone=vit_micro", "model.patch_size=7"])
    vit.method.name = "dae"  # past load_config's check: the constructor still refuses it
    with pytest.raises(ValueError, match="convolutional"):
        build_method(vit, GRAY28)


@pytest.mark.parametrize("kind", ["none", "gaussian"])
def test_short_optimisation_lowers_reconstruction_loss(kind, one_thread):
    torch.manual_seed(0)
    dae = build_method(dae_cfg(f"method.dae.corrupt.kind={kind}"), GRAY28)
    yy, xx = torch.meshgrid(torch.arange(28), torch.arange(28), indexing="ij")
    phase = torch.arange(4).view(-1, 1, 1)
    x = (127.5 + 127 * torch.sin((xx + 2 * yy + phase) / 3.0)).to(torch.uint8).unsqueeze(1)
    opt = torch.optim.AdamW(dae.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        loss, _ = dae(x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-3:]) < 0.25 * losses[0]


def test_reconstruction_grid_png(tmp_path):
    dae = build_method(dae_cfg("method.dae.corrupt.kind=mask", "method.dae.corrupt.fraction=0.5"), GRAY28)
    x = images(GRAY28, n=5)
    dae.train()
    path = save_reconstruction_grid(dae, x, tmp_path / "sub" / "recon.png", n=3)
    assert dae.training  # mode restored
    png = np.asarray(Image.open(path).convert("RGB"))
    scale = 4  # 28 px enlarged to at least 96 px
    cell = 28 * scale + GAP_PX
    assert png.shape == (3 * cell - GAP_PX, 3 * cell - GAP_PX, 3)
    # top-left cell is the first input image, enlarged by pixel repetition
    top_left = png[: 28 * scale : scale, : 28 * scale : scale, 0]
    np.testing.assert_array_equal(top_left, x[0, 0].numpy())
    # second row: the masked input. Masking writes 0 in normalised units, i.e. the mean grey
    # (0.29 * 255 = 74), over exactly half the pixels; the rest is the input unchanged.
    masked = png[cell : cell + 28 * scale : scale, : 28 * scale : scale, 0].astype(int)
    changed = masked != x[0, 0].numpy()
    assert changed.mean() > 0.45
    assert set(np.unique(masked[changed]).tolist()) <= {73, 74, 75}
    with pytest.raises(ValueError, match="uint8"):
        save_reconstruction_grid(dae, x.float(), tmp_path / "bad.png")
