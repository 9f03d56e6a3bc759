"""augment/ops.py: the per-row application of random ops (CPU gather/scatter vs torch.where) and the
separable Gaussian blur, each against an independent computation."""

from __future__ import annotations

import kornia
import pytest
import torch

import selfsup.augment.views as views_mod
from selfsup.augment.ops import gaussian_blur, on_rows, take
from selfsup.augment.views import AugmentConfig, Views


def gray(v: torch.Tensor, _rows) -> torch.Tensor:  # returns a broadcast view, as the recipe's does
    return kornia.color.rgb_to_grayscale(v).expand_as(v)


@pytest.mark.parametrize("kind", ["random", "all", "none"])
def test_on_rows_equals_where_over_every_row(kind):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(12, 3, 8, 8, generator=g)
    factor = torch.rand(12, generator=g) + 0.5
    mask = {"random": torch.rand(12, generator=g) < 0.5, "all": torch.ones(12, dtype=torch.bool),
            "none": torch.zeros(12, dtype=torch.bool)}[kind]  # fmt: skip

    def scale(v, rows):  # a per-row parameter: must follow the selected rows
        return v * take(factor, rows)[:, None, None, None]

    ref = torch.where(mask[:, None, None, None], x * factor[:, None, None, None], x)
    got = on_rows(x.clone(), mask, scale)
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    ref2 = torch.where(mask[:, None, None, None], gray(ref, None), ref)
    got2 = on_rows(got, mask, gray)
    got2.mul_(1.0)  # later ops write in place: the result must not be a broadcast view
    torch.testing.assert_close(got2, ref2, rtol=0, atol=0)
    # negative control: the parameters of the first rows instead of the selected ones
    if kind == "random":
        wrong = on_rows(x.clone(), mask, lambda v, rows: v * factor[: len(v), None, None, None])
        assert not torch.allclose(wrong, ref)


@pytest.mark.parametrize("kind", ["random", "all"])
def test_on_rows_keeps_the_dtype_under_autocast(kind):
    """Training under bf16 autocast: the blur's convolutions return bfloat16 into float32 views
    (index_copy_ refused that, and every-row ops changed the views' dtype)."""
    g = torch.Generator().manual_seed(3)
    x = torch.rand(6, 3, 16, 16, generator=g)
    mask = torch.tensor([True, False] * 3) if kind == "random" else torch.ones(6, dtype=torch.bool)
    sigma = torch.rand(6, generator=g) + 0.5

    def blur(v, rows):
        return gaussian_blur(v, take(sigma, rows), 5)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = torch.where(mask[:, None, None, None], blur(x, None), x)  # the accelerator path
        got = on_rows(x.clone(), mask, blur)
    assert got.dtype == x.dtype == ref.dtype
    torch.testing.assert_close(got, ref, rtol=0, atol=0)


@pytest.mark.parametrize("kernel", [3, 11, 23])
def test_gaussian_blur_equals_kornia_2d(kernel):
    g = torch.Generator().manual_seed(1)
    x = torch.rand(5, 3, 40, 30, generator=g)
    sigma = torch.tensor([0.1, 0.3, 0.9, 1.5, 2.0])
    ref = kornia.filters.gaussian_blur2d(x, (kernel, kernel), sigma[:, None].expand(-1, 2),
                                         border_type="reflect", separable=False)  # fmt: skip
    torch.testing.assert_close(gaussian_blur(x, sigma, kernel), ref, rtol=0, atol=1e-6)
    # negative control: a sigma 10% off is visibly another blur
    assert (gaussian_blur(x, sigma * 1.1, kernel) - ref).abs().max() > 1e-3


def test_one_image_chunks_with_every_op_on_every_row(monkeypatch):
    cfg = AugmentConfig(size=24, gray_p=1.0, jitter_p=1.0, blur_p=1.0, solarize_p=1.0)
    views = Views(cfg, 3, 24, (0.5,) * 3, (0.25,) * 3)
    x = torch.randint(0, 256, (3, 3, 24, 24), dtype=torch.uint8)
    whole = views(x, generator=torch.Generator().manual_seed(2))
    monkeypatch.setattr(views_mod, "_CPU_CHUNK_BYTES", 1)  # one sample per chunk
    chunked = views(x, generator=torch.Generator().manual_seed(2))
    for a, b in zip(whole, chunked, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("channels", [1, 3])
def test_in_place_jitter_is_bitwise_kornias_chain(channels):
    """``ops.colour_jitter`` against Kornia's brightness, contrast, saturation functions and
    ``shift_hue`` called one after the other, as the recipe did before it wrote in place."""
    from selfsup.augment.ops import colour_jitter, shift_hue

    g = torch.Generator().manual_seed(1)
    x = torch.rand(9, channels, 17, 13, generator=g)
    x[0] = 1.0  # saturated pixels: the clamps between the ops matter
    lows, highs = torch.tensor([0.2, 0.2, 0.2, -0.5]), torch.tensor([1.8, 1.8, 1.8, 0.5])
    factors = lows + (highs - lows) * torch.rand(9, 4, generator=g)
    b, c, s, h = factors.unbind(1)
    ref = kornia.enhance.adjust_brightness_accumulative(x, b)
    ref = kornia.enhance.adjust_contrast_with_mean_subtraction(ref, c).clamp(0.0, 1.0)
    if channels == 3:
        ref = shift_hue(kornia.enhance.adjust_saturation_with_gray_subtraction(ref, s), h)
    before = x.clone()
    got = colour_jitter(x, factors)
    assert torch.equal(got, ref)
    assert torch.equal(x, before)  # the input is left as it was (on_rows' torch.where reads it again)
    # negative control: contrast about each channel's own mean instead of the grey mean
    if channels == 3:
        wrong = (x * b.view(-1, 1, 1, 1)).clamp(0, 1)
        wrong = (wrong * c.view(-1, 1, 1, 1) + wrong.mean((-2, -1), True) * (1 - c.view(-1, 1, 1, 1))).clamp(0, 1)
        wrong = shift_hue(kornia.enhance.adjust_saturation_with_gray_subtraction(wrong, s), h)
        assert not torch.allclose(got, wrong)
