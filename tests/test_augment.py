"""On-device views: statistics over large batches, checked from the OUTPUT pixels, not only from
the sampled parameters, plus exact checks of the colour maths against an independent float64 reference."""

from __future__ import annotations

import colorsys
import math

import kornia
import numpy as np
import pytest
import torch

from selfsup.augment.ops import shift_hue
from selfsup.augment.views import AugmentConfig, Views, build_views, normalize
from selfsup.data_info import DataInfo

# mean 0 / std 1: outputs are the [0, 1] pixels, so tests can read them directly.
IDENTITY = {"mean": [0.0], "std": [1.0]}


def ramp_images(batch: int, side: int = 64) -> torch.Tensor:
    """Channel 0 = 4 * x, channel 1 = 4 * y: bilinear sampling of a linear ramp is exact, so every
    output pixel tells where in the source it was sampled."""
    coords = torch.arange(side, dtype=torch.uint8) * 4
    img = torch.zeros(3, side, side, dtype=torch.uint8)
    img[0] = coords.view(1, -1)
    img[1] = coords.view(-1, 1)
    img[2] = 128
    return img.expand(batch, -1, -1, -1).contiguous()


def make(cfg: AugmentConfig, channels: int = 3, image_size: int = 32) -> Views:
    info = DataInfo(channels, image_size, (0.5,) * channels, (0.25,) * channels)
    return build_views(cfg, info)


def read_boxes(out: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x positions of first/last column centres, flipped) recovered from ramp views in [0, 1]."""
    xs = out[:, 0] * 255 / 4  # source x coordinate sampled by each output pixel
    ys = out[:, 1] * 255 / 4
    left, right = xs[:, size // 2, 0], xs[:, size // 2, -1]
    top, bottom = ys[:, 0, size // 2], ys[:, -1, size // 2]
    spacing_x = (right - left).abs() / (size - 1)  # source pixels per output pixel = w / size
    spacing_y = (bottom - top) / (size - 1)
    return spacing_x * size, spacing_y * size, right < left


def test_crop_areas_within_scale_and_flip_rate_from_pixels():
    size, side, n = 16, 64, 4000
    cfg = AugmentConfig(recipe="mae", size=size, scale=(0.25, 0.6), ratio=(0.5, 2.0), **IDENTITY)
    views = make(cfg, image_size=side)
    x = ramp_images(n, side)
    g = torch.Generator().manual_seed(0)
    (out,) = views(x, n_views=1, generator=g)
    w, h, flipped = read_boxes(out, size)
    area = w * h / side**2
    assert area.min() >= 0.25 - 1e-3 and area.max() <= 0.6 + 1e-3
    ratio = w / h
    assert ratio.min() >= 0.5 - 1e-3 and ratio.max() <= 2.0 + 1e-3
    # the areas really spread over the range (not one crop for the whole batch)
    assert area.std() > 0.05 and len(torch.unique((area * 100).round())) > 20
    assert abs(flipped.float().mean().item() - 0.5) < 0.03
    # what the pixels say agrees with the recorded parameters, sample by sample
    g = torch.Generator().manual_seed(0)
    params = views.sample(1, n, side, side, x.device, g)
    assert torch.equal(params.flip, flipped)
    torch.testing.assert_close(params.box[:, 2], w, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(params.box[:, 3], h, atol=1e-3, rtol=1e-4)


def test_gray_rate_from_pixels():
    cfg = AugmentConfig(scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0, jitter_p=0.0, **IDENTITY)
    views = make(cfg)
    x = torch.randint(0, 256, (4000, 3, 32, 32), dtype=torch.uint8)
    (out,) = views(x, n_views=1, generator=torch.Generator().manual_seed(1))
    gray = (out.amax(1) - out.amin(1)).amax(dim=(1, 2)) < 1e-6
    assert abs(gray.float().mean().item() - 0.2) < 0.03
    # a grayscale view holds the luma (ITU-R 601) of the source
    lum = (x[gray].float() / 255 * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1)
    torch.testing.assert_close(out[gray][:, 0], lum, atol=1e-5, rtol=0)
    torch.testing.assert_close(out[~gray], x[~gray].float() / 255, atol=1e-5, rtol=0)


def test_jitter_rate_from_pixels():
    cfg = AugmentConfig(scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0, gray_p=0.0, **IDENTITY)
    views = make(cfg)
    x = torch.randint(0, 256, (4000, 3, 32, 32), dtype=torch.uint8)
    (out,) = views(x, n_views=1, generator=torch.Generator().manual_seed(2))
    changed = (out - x.float() / 255).abs().amax(dim=(1, 2, 3)) > 1e-4
    assert abs(changed.float().mean().item() - 0.8) < 0.03


def reference_jitter(img: np.ndarray, b: float, c: float, s: float, hue: float) -> np.ndarray:
    """Independent float64 reference of torchvision's ColorJitter: PIL's ImageEnhance definitions
    (blend with black, with the mean luma, with the luma image; clipped after each step) and
    colorsys for the hue rotation."""
    luma = np.array([0.299, 0.587, 0.114])
    x = img.astype(np.float64) / 255
    x = np.clip(x * b, 0, 1)
    x = np.clip(c * x + (1 - c) * (x @ luma).mean(), 0, 1)
    x = np.clip(s * x + (1 - s) * (x @ luma)[..., None], 0, 1)
    out = np.empty_like(x)
    for i in range(x.shape[0]):
        for j in range(x.shape[1]):
            hh, ss, vv = colorsys.rgb_to_hsv(*x[i, j])
            out[i, j] = colorsys.hsv_to_rgb((hh + hue) % 1.0, ss, vv)
    return out


def test_colour_jitter_matches_reference():
    cfg = AugmentConfig(
        scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0, gray_p=0.0, jitter_p=1.0, **IDENTITY
    )
    views = make(cfg, image_size=8)
    x = torch.randint(
        0, 256, (6, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(3)
    )
    g = torch.Generator().manual_seed(4)
    params = views.sample(1, 6, 8, 8, x.device, g)
    out = views.apply(x, params)
    for k in range(6):
        b, c, s, hue = params.jitter[k].tolist()
        ref = reference_jitter(x[k].permute(1, 2, 0).numpy(), b, c, s, hue)
        got = out[k].permute(1, 2, 0).double().numpy()
        np.testing.assert_allclose(got, ref, atol=1e-4)


def test_shift_hue_matches_kornia():
    x = torch.rand(16, 3, 9, 9)
    x[0] = 0.5  # gray pixels keep their value
    shift = torch.rand(16) - 0.5
    ref = kornia.enhance.adjust_hue(x, shift * 2 * math.pi)
    torch.testing.assert_close(shift_hue(x, shift), ref, atol=1e-5, rtol=0)


def test_grayscale_input_brightness_contrast_only():
    cfg = AugmentConfig(
        scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0, jitter_p=1.0, blur_p=0.5, **IDENTITY
    )
    views = make(cfg, channels=1, image_size=12)
    x = torch.randint(0, 256, (64, 1, 12, 12), dtype=torch.uint8)
    g = torch.Generator().manual_seed(5)
    params = views.sample(1, 64, 12, 12, x.device, g)
    params.blur.zero_()
    out = views.apply(x, params)
    b, c = params.jitter[:, 0].view(-1, 1, 1, 1), params.jitter[:, 1].view(-1, 1, 1, 1)
    y = (x.double() / 255 * b).clamp(0, 1)
    mean = y.mean(dim=(1, 2, 3), keepdim=True)
    ref = (y * c + mean * (1 - c)).clamp(0, 1)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=0)
    # the whole simclr recipe with blur runs on one channel
    v1, v2 = views(x, generator=g)
    assert v1.shape == (64, 1, 12, 12) and not torch.equal(v1, v2)


@pytest.mark.parametrize("recipe", ["simclr", "byol", "mae", "none"])
@pytest.mark.parametrize("channels", [1, 3])
def test_shapes_dtype_range_and_device(recipe, channels):
    cfg = AugmentConfig(recipe=recipe, size=24, blur_p=0.5, solarize_p=0.5)
    views = make(cfg, channels=channels, image_size=32)
    x = torch.randint(0, 256, (8, channels, 32, 32), dtype=torch.uint8)
    out = views(x, n_views=3, generator=torch.Generator().manual_seed(0))
    assert len(out) == 3
    for v in out:
        assert v.shape == (8, channels, 24, 24) and v.dtype == torch.float32
        assert v.device == x.device
        # normalised with mean 0.5 / std 0.25: [0, 1] maps to [-2, 2]
        assert v.min() >= -2 - 1e-5 and v.max() <= 2 + 1e-5
        assert torch.isfinite(v).all()


def test_views_differ_and_seed_reproduces():
    views = make(AugmentConfig(blur_p=0.5))
    x = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    a1, a2 = views(x, generator=torch.Generator().manual_seed(7))
    b1, b2 = views(x, generator=torch.Generator().manual_seed(7))
    c1, _ = views(x, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a1, b1) and torch.equal(a2, b2)
    assert not torch.equal(a1, c1)
    per_image = (a1 - a2).abs().flatten(1).amax(1)
    assert (per_image > 1e-3).all()  # the two views of every image differ


def test_different_samples_get_different_parameters():
    views = make(AugmentConfig(blur_p=0.5))
    p = views.sample(2, 256, 32, 32, torch.device("cpu"), torch.Generator().manual_seed(0))
    assert len(torch.unique(p.box, dim=0)) == 512
    assert len(torch.unique(p.jitter, dim=0)) == 512
    assert 0 < p.flip.sum() < 512 and 0 < p.blur.sum() < 512


def test_byol_views_are_asymmetric():
    views = make(AugmentConfig(recipe="byol"))
    n = 4000
    p = views.sample(2, n, 32, 32, torch.device("cpu"), torch.Generator().manual_seed(0))
    blur1, blur2 = p.blur[:n].float().mean(), p.blur[n:].float().mean()
    sol1, sol2 = p.solarize[:n].float().mean(), p.solarize[n:].float().mean()
    assert blur1 == 1.0 and abs(blur2 - 0.1) < 0.02
    assert sol1 == 0.0 and abs(sol2 - 0.2) < 0.03
    # and solarisation is visible in the pixels: values above 0.5 are inverted
    x = torch.full((4, 3, 8, 8), 230, dtype=torch.uint8)
    cfg = AugmentConfig(
        recipe="byol",
        scale=(1.0, 1.0),
        ratio=(1.0, 1.0),
        jitter_p=0.0,
        gray_p=0.0,
        view_blur_p=[0.0],
        view_solarize_p=[1.0],
        **IDENTITY,
    )
    out = make(cfg, image_size=8)(x, n_views=1)[0]
    torch.testing.assert_close(out, torch.full_like(out, 1 - 230 / 255))


def test_none_recipe_resizes_and_normalises_only():
    views = make(AugmentConfig(recipe="none"))
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    (out,) = views(x, n_views=1)
    torch.testing.assert_close(out, (x.float() / 255 - 0.5) / 0.25)
    small = make(AugmentConfig(recipe="none", size=64))(x, n_views=1)[0]
    assert small.shape == (4, 3, 64, 64)


def test_images_smaller_than_output_are_upsampled():
    views = make(AugmentConfig(size=48), image_size=16)
    x = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    v1, v2 = views(x)
    assert v1.shape == (4, 3, 48, 48)


def test_normalize_matches_definition():
    x = torch.randint(0, 256, (2, 3, 5, 5), dtype=torch.uint8)
    mean, std = [0.1, 0.2, 0.3], [0.5, 0.25, 0.125]
    ref = torch.stack([(x[:, i].double() / 255 - mean[i]) / std[i] for i in range(3)], 1)
    torch.testing.assert_close(normalize(x, mean, std).double(), ref, atol=1e-5, rtol=0)
    gray = torch.randint(0, 256, (2, 1, 5, 5), dtype=torch.uint8)
    torch.testing.assert_close(normalize(gray, [0.5], [0.5]), gray.float() / 127.5 - 1)


def test_mean_std_from_config_override_info():
    cfg = AugmentConfig(recipe="none", mean=[0.0, 0.0, 0.0], std=[1.0, 1.0, 1.0])
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    torch.testing.assert_close(make(cfg)(x, n_views=1)[0], x.float() / 255)


@pytest.mark.parametrize(
    ("cfg", "key"),
    [
        (AugmentConfig(recipe="simclrr"), "augment.recipe"),
        (AugmentConfig(scale=(0.2, 1.5)), "augment.scale"),
        (AugmentConfig(scale=(0.8, 0.2)), "augment.scale"),
        (AugmentConfig(ratio=(0.0, 1.0)), "augment.ratio"),
        (AugmentConfig(flip_p=1.5), "augment.flip_p"),
        (AugmentConfig(view_blur_p=[0.5, -0.1]), "augment.view_blur_p"),
        (AugmentConfig(jitter_strength=-1.0), "augment.jitter_strength"),
        (AugmentConfig(size=-2), "augment.size"),
        (AugmentConfig(std=[0.0]), "std"),
        (AugmentConfig(mean=[0.1, 0.2]), "mean"),
    ],
)
def test_bad_config_names_the_key(cfg, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        make(cfg)


def test_bad_input_is_named():
    views = make(AugmentConfig())
    with pytest.raises(TypeError, match="uint8"):
        views(torch.rand(2, 3, 32, 32))
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        views(torch.zeros(3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="channels"):
        views(torch.zeros(2, 1, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="n_views"):
        views(torch.zeros(2, 3, 32, 32, dtype=torch.uint8), n_views=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_same_code_path():
    views = make(AugmentConfig(blur_p=0.5))
    x = torch.randint(0, 256, (32, 3, 32, 32), dtype=torch.uint8, device="cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    v1, v2 = views(x, generator=g)
    assert v1.device.type == "cuda" and v1.shape == (32, 3, 32, 32)
    with pytest.raises(ValueError, match="generator"):
        views(x, generator=torch.Generator().manual_seed(0))


def test_blur_kernel_is_about_a_tenth_of_the_size():
    assert make(AugmentConfig(size=96)).blur_kernel in (9, 11)
    assert make(AugmentConfig(size=224)).blur_kernel == 23
    assert make(AugmentConfig()).blur_kernel == 3
    assert math.isclose(make(AugmentConfig(jitter_strength=1.0)).jitter_range[3], 0.2)


def test_cpu_chunking_gives_the_same_views_as_one_batch():
    views = make(AugmentConfig(blur_p=0.5, solarize_p=0.3), image_size=96)
    x = torch.randint(0, 256, (40, 3, 96, 96), dtype=torch.uint8)
    v1, v2 = views(x, generator=torch.Generator().manual_seed(9))  # chunked: > 6 MB of views
    params = views.sample(2, 40, 96, 96, x.device, torch.Generator().manual_seed(9))
    whole = (views.apply(x.repeat(2, 1, 1, 1), params) - 0.5) / 0.25
    torch.testing.assert_close(torch.cat([v1, v2]), whole)
