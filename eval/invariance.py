"""Invariance of a representation to nuisance transforms g (the course notes' ``f(g·x) = f(x)``).

For each transform the score is the normalised change of the L2-normalised features,

    E_x ‖f(g·x) − f(x)‖² / E_{x ≠ x'} ‖f(x) − f(x')‖²,

0 when f ignores g, about 1 when g moves a feature as far as swapping the image for another one.
The denominator is the exact mean over all ordered pairs of distinct images of the sample,
``2n/(n−1) (mean ‖f(x)‖² − ‖mean f(x)‖²)``. A constant f scores 0 (0/0 is taken as 0): it is
perfectly invariant and useless, which the sufficiency bound beside it shows.

The transforms are the augment module's own operations, one at a time (``selfsup.augment.views``
with every other op off), plus Kornia's rotation and translation and the Gaussian pixel noise of
``selfsup.augment.corrupt``. Strengths are those of the SimCLR recipe where it has them (crop
scale 0.2-1, colour jitter strength 0.5, blur sigma 0.1-2 px); rotation is uniform in ±15°,
translation uniform in ±10 % of the side per axis (reflection padding), noise sigma 0.05 of the
pixel range. Each image gets its own random parameters from a seeded generator.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import kornia
import torch
import torch.nn.functional as F
from torch import nn

from selfsup.augment.corrupt import CorruptConfig, corrupt
from selfsup.augment.views import AugmentConfig, Views, _standardize, check_images

TRANSFORMS = ("crop", "flip", "jitter", "grayscale", "blur", "noise", "rotation", "translation")
ROTATION_DEG = 15.0
TRANSLATION_FRACTION = 0.10
NOISE_SIGMA = 0.05

FeatureFn = Callable[[torch.Tensor], torch.Tensor]  # normalised float [B, C, H, W] -> [B, D]

_FULL = {"scale": (1.0, 1.0), "ratio": (1.0, 1.0), "flip_p": 0.0}
_VIEW_CONFIGS = {
    "crop": AugmentConfig(recipe="mae", flip_p=0.0),  # resized crop, scale (0.2, 1)
    "flip": AugmentConfig(recipe="mae", scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=1.0),
    "jitter": AugmentConfig(recipe="simclr", jitter_p=1.0, gray_p=0.0, **_FULL),
    "grayscale": AugmentConfig(recipe="simclr", jitter_p=0.0, gray_p=1.0, **_FULL),
    "blur": AugmentConfig(recipe="simclr", jitter_p=0.0, gray_p=0.0, blur_p=1.0, **_FULL),
}


def applicable(name: str, channels: int) -> bool:
    """Grayscale (and the hue/saturation part of jitter) do nothing to one-channel images."""
    return not (name == "grayscale" and channels == 1)


def transform(
    name: str, images: torch.Tensor, mean: Sequence[float], std: Sequence[float],
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``g·x`` for uint8 ``[B, C, H, W]`` images: normalised float32 of the same size."""
    check_images(images)
    if name not in TRANSFORMS:
        raise ValueError(f"unknown invariance transform {name!r}; choose from {', '.join(TRANSFORMS)}")
    b, c, h, w = images.shape
    if name in _VIEW_CONFIGS:
        return Views(_VIEW_CONFIGS[name], c, h, mean, std)(images, n_views=1, generator=generator)[0]
    x = images.float().div_(255.0)
    dev = images.device

    def uniform(*shape: int) -> torch.Tensor:
        return 2 * torch.rand(*shape, device=dev, generator=generator) - 1

    if name == "noise":
        x = corrupt(x, CorruptConfig(kind="gaussian", sigma=NOISE_SIGMA), generator).clamp_(0, 1)
    elif name == "rotation":
        x = kornia.geometry.transform.rotate(x, ROTATION_DEG * uniform(b), padding_mode="reflection")
    else:  # translation
        shift = TRANSLATION_FRACTION * uniform(b, 2) * torch.tensor([w, h], device=dev)
        x = kornia.geometry.transform.translate(x, shift, padding_mode="reflection")
    return _standardize(x, mean, std)


def invariance_ratio(base: torch.Tensor, moved: torch.Tensor) -> dict[str, float]:
    """The normalised change of L2-normalised features ``moved = f(g·x)`` from ``base = f(x)``."""
    if base.shape != moved.shape or base.ndim != 2 or base.shape[0] < 2:
        raise ValueError(f"need two [n >= 2, D] feature sets of one shape, got {tuple(base.shape)}, {tuple(moved.shape)}")
    a = F.normalize(base.double(), dim=1)
    m = F.normalize(moved.double(), dim=1)
    n = a.shape[0]
    num = float(((m - a) ** 2).sum(1).mean())
    den = float(2 * n / (n - 1) * ((a**2).sum(1).mean() - (a.mean(0) ** 2).sum()))
    # nothing moved: perfectly invariant, even for a constant f (0/0); moved but no spread: nan
    ratio = 0.0 if num <= 1e-12 else (num / den if den > 1e-12 else math.nan)
    return {"ratio": ratio, "change": num, "spread": den}


def invariance(
    feature_fn: FeatureFn, images: torch.Tensor, mean: Sequence[float], std: Sequence[float],
    transforms: Sequence[str] = TRANSFORMS, batch_size: int = 256, seed: int = 0,
) -> dict[str, dict[str, float]]:
    """``{transform: {"ratio", "change", "spread"}}`` for every applicable transform."""
    from selfsup.augment.views import normalize

    def feats(x_norm_batches) -> torch.Tensor:
        return torch.cat([feature_fn(x).float().cpu() for x in x_norm_batches])

    chunks = [images[i : i + batch_size] for i in range(0, images.shape[0], batch_size)]
    base = feats(normalize(x, mean, std) for x in chunks)
    out = {}
    for k, name in enumerate(transforms):
        if not applicable(name, images.shape[1]):
            continue
        g = torch.Generator(device=images.device).manual_seed(seed * 1000 + k)
        moved = feats(transform(name, x, mean, std, g) for x in chunks)
        out[name] = invariance_ratio(base, moved)
    return out


# --------------------------------------------------------------------------- feature functions
def backbone_fn(backbone: nn.Module, image_size: int, device: str | torch.device | None = None) -> FeatureFn:
    """Frozen features of normalised images (resized bilinearly to ``image_size`` if needed)."""
    from selfsup.eval.features import _FrozenEval

    dev = torch.device(device) if device else next(backbone.parameters()).device

    def fn(x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != image_size or x.shape[-2] != image_size:
            x = F.interpolate(x, size=(image_size, image_size), mode="bilinear",
                              align_corners=False, antialias=True)
        with _FrozenEval(backbone), torch.inference_mode():
            return backbone(x.to(dev)).float().cpu()

    return fn


def raw_pixel_fn(max_dims: int) -> FeatureFn:
    """Raw pixels as ``eval.run.raw_pixel_features`` makes them, from normalised images:
    flattened, area-downsampled to the largest side s with C·s·s ≤ ``max_dims``."""

    def fn(x: torch.Tensor) -> torch.Tensor:
        c, side = x.shape[1], x.shape[2]
        while c * side * side > max_dims:
            side -= 1
        if side != x.shape[2]:
            x = F.interpolate(x, size=(side, side), mode="area")
        return x.flatten(1)

    return fn
