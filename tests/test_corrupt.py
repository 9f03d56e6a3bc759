"""Denoising corruptions: exact fractions, noise statistics, clean input untouched, clear errors."""

from __future__ import annotations

import pytest
import torch

from selfsup.augment.corrupt import CorruptConfig, corrupt


def images(batch: int = 64, channels: int = 3, side: int = 28) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.rand(batch, channels, side, side, generator=g) * 2 - 1


def test_gaussian_noise_has_the_configured_sigma_and_keeps_the_input():
    x = images()
    before = x.clone()
    y = corrupt(x, CorruptConfig(kind="gaussian", sigma=0.3), torch.Generator().manual_seed(1))
    assert torch.equal(x, before)  # the clean image stays available as the target
    noise = y - x
    assert abs(noise.std().item() - 0.3) < 0.005 and abs(noise.mean().item()) < 0.005
    # independent per element: neighbouring pixels are uncorrelated
    corr = torch.corrcoef(torch.stack([noise[..., :-1].flatten(), noise[..., 1:].flatten()]))
    assert abs(corr[0, 1].item()) < 0.02


@pytest.mark.parametrize("patch", [1, 4, 5])
def test_mask_zeroes_an_exact_fraction_of_pixels_or_patches(patch):
    x = images(side=20) + 5  # no pixel is 0 before masking
    y = corrupt(x, CorruptConfig(kind="mask", fraction=0.3, patch=patch), torch.Generator().manual_seed(3))
    hit = y == 0
    # the same pixels in every channel
    assert torch.equal(hit, hit[:, :1].expand_as(hit))
    hit = hit[:, 0]
    cells = (20 // patch) ** 2
    expected = round(0.3 * cells) / cells
    torch.testing.assert_close(hit.float().mean(dim=(1, 2)), torch.full((64,), expected))
    # whole patch x patch squares on the patch grid
    blocks = hit.view(64, 20 // patch, patch, 20 // patch, patch).float().mean(dim=(2, 4))
    assert set(blocks.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(y[~(y == 0)], x[~(y == 0)])
    # different images get different masks. With patch 5 there are only C(16, 5) = 4368 masks, so
    # two of 64 images share one with probability ~0.37: allow a few repeats, but
    # not one mask for the whole batch.
    assert len({tuple(h.flatten().tolist()) for h in hit}) >= 60


def test_mask_patch_not_dividing_the_image():
    x = images(side=10) + 5
    y = corrupt(x, CorruptConfig(kind="mask", fraction=0.5, patch=4))  # 3x3 grid, cropped to 10
    assert y.shape == x.shape and (y == 0).any()


def test_salt_and_pepper_uses_the_value_range():
    x = images(channels=1) * 0.5  # values in [-0.5, 0.5]
    cfg = CorruptConfig(kind="saltpepper", fraction=0.2)
    y = corrupt(x, cfg, torch.Generator().manual_seed(2), value_range=(-2.0, 3.0))
    salt, pepper = y == 3.0, y == -2.0
    assert torch.equal(y[~(salt | pepper)], x[~(salt | pepper)])
    per_image = (salt | pepper).float().mean(dim=(1, 2, 3))
    torch.testing.assert_close(per_image, torch.full((64,), round(0.2 * 784) / 784))
    assert abs(salt.float().sum() / (salt | pepper).float().sum() - 0.5) < 0.03


def test_salt_and_pepper_default_range_is_the_batch_extremes_per_channel():
    x = images(channels=3)
    x[:, 1] *= 0.1
    y = corrupt(x, CorruptConfig(kind="saltpepper", fraction=0.5))
    for c in range(3):
        lo, hi = x[:, c].min(), x[:, c].max()
        changed = y[:, c] != x[:, c]
        assert ((y[:, c][changed] == lo) | (y[:, c][changed] == hi)).all()


def test_none_is_identity_and_seed_reproduces():
    x = images()
    assert corrupt(x, CorruptConfig(kind="none")) is x
    cfg = CorruptConfig(kind="mask", fraction=0.4)
    a = corrupt(x, cfg, torch.Generator().manual_seed(3))
    b = corrupt(x, cfg, torch.Generator().manual_seed(3))
    c = corrupt(x, cfg, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize(
    ("cfg", "key"),
    [
        (CorruptConfig(kind="blur"), "corrupt.kind"),
        (CorruptConfig(sigma=-0.1), "corrupt.sigma"),
        (CorruptConfig(kind="mask", fraction=1.5), "corrupt.fraction"),
        (CorruptConfig(kind="mask", patch=0), "corrupt.patch"),
    ],
)
def test_bad_config_names_the_key(cfg, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        corrupt(images(), cfg)


def test_bad_input_is_named():
    with pytest.raises(TypeError, match="float"):
        corrupt(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), CorruptConfig())
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        corrupt(torch.zeros(1, 4, 4), CorruptConfig())
