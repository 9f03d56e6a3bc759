"""View recipes that run batched on the training device (Kornia), with per-sample random parameters.

DataLoader workers only decode; the uint8 batch goes to the training device and this module turns
it into normalised float views there. That frees the CPU cores of a GPU node, and on a CPU-only
machine one batched pass is cheaper than thousands of per-sample PIL calls.

Every random number is drawn in one batched call per parameter, on the images' device, from an
optional ``torch.Generator`` (same generator state -> same views). Sampling (``Views.sample``) is
separate from applying (``Views.apply``) so that tests and grids can see what was drawn.

Recipes: ``simclr`` (Chen et al. 2020), ``byol`` (Grill et al. 2020: the same ops, but the views get
different blur / solarize probabilities), ``mae`` (resized crop + flip only), ``none`` (resize +
normalise, for evaluation). Grayscale input (C=1) works: saturation, hue and grayscale are identities
on one channel and are skipped.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from functools import partial

import kornia
import torch
from torch import nn

from selfsup.augment.ops import colour_jitter, gaussian_blur, on_rows, take
from selfsup.augment.pixels import channel_jitter, check_channels, to_unit
from selfsup.data_info import DataInfo

RECIPES = ("simclr", "byol", "mae", "none")
# BYOL's asymmetric probabilities (Grill et al. 2020, table 6): view 1 always blurred, never
# solarised; view 2 rarely blurred, sometimes solarised.
BYOL_BLUR_P = (1.0, 0.1)
BYOL_SOLARIZE_P = (0.0, 0.2)
# On CPU the ops are memory-bound: applying the whole chain to chunks of about this many bytes of
# float pixels keeps the intermediates in cache (measured at 96 px: 4.4x faster than one batch; at
# 32 px a whole batch of 512 views already fits). Accelerators take the batch in one go.
_CPU_CHUNK_BYTES = 6 << 20
# as torchvision's RandomResizedCrop: try 10 draws, then fall back to a centre crop
_CROP_TRIES = 10


@dataclass
class AugmentConfig:
    """Which views a method sees. ``mean``/``std`` empty means: take them from the shard manifest."""

    recipe: str = "simclr"  # simclr | byol | mae | none
    size: int = 0  # output side in pixels; 0 = the shard images' size
    scale: tuple[float, float] = (0.2, 1.0)
    ratio: tuple[float, float] = (0.75, 1.3333333333333333)
    flip_p: float = 0.5
    jitter_strength: float = 0.5
    jitter_p: float = 0.8
    gray_p: float = 0.2
    blur_p: float = 0.0
    solarize_p: float = 0.0
    mean: list[float] | None = None
    std: list[float] | None = None
    # Gaussian blur sigma range in pixels (SimCLR: 0.1-2.0); the kernel side is ~10% of ``size``.
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    # Per-view probabilities, cycled over the views (view i uses item i % len). Empty = the recipe's
    # default: blur_p / solarize_p for every view, or BYOL's (1.0, 0.1) / (0.0, 0.2) for ``byol``.
    view_blur_p: list[float] = field(default_factory=list)
    view_solarize_p: list[float] = field(default_factory=list)

    def check(self) -> None:
        """Every bad recipe name or parameter is a ValueError naming the ``augment.*`` key."""
        _check_config(self)


@dataclass
class ViewParams:
    """Per-sample random parameters of one batch of views (all tensors on the images' device).

    ``box`` is ``[N, 4]`` = (x0, y0, w, h) in source pixels (continuous, pixel edges at integers);
    ``jitter`` holds the brightness, contrast, saturation factors and the hue shift (fraction of
    the colour circle) as ``[N, 4]``; the boolean masks say which samples get each op.
    """

    box: torch.Tensor
    flip: torch.Tensor
    jitter_on: torch.Tensor
    jitter: torch.Tensor
    gray: torch.Tensor
    blur: torch.Tensor
    sigma: torch.Tensor
    solarize: torch.Tensor

    def rows(self, start: int, stop: int) -> ViewParams:
        """The parameters of samples ``start:stop``."""
        return ViewParams(*(getattr(self, f.name)[start:stop] for f in fields(self)))


def _channel_values(values: Sequence[float], channels: int, name: str) -> list[float]:
    """Check on the host (no device sync) that ``values`` broadcast over ``channels``."""
    out = [float(v) for v in values]
    if len(out) not in (1, channels):
        raise ValueError(f"{name}: expected 1 or {channels} values, got {out}")
    if name == "std" and min(out) <= 0:
        raise ValueError(f"std: every value must be > 0, got {out}")
    return out


def _standardize(x01: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(x - mean) / std per channel for float images in [0, 1]."""
    channels = x01.shape[1]
    m = torch.tensor(_channel_values(mean, channels, "mean"), device=x01.device)
    s = torch.tensor(_channel_values(std, channels, "std"), device=x01.device)
    return (x01 - m.view(1, -1, 1, 1)) / s.view(1, -1, 1, 1)


def check_images(x: torch.Tensor, channels: int | None = None) -> None:
    """Raise a clear error unless ``x`` is a uint8 ``[B, C, H, W]`` batch with C = 1 or 3."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"images: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in (torch.uint8, torch.int32):
        raise TypeError(f"images: expected dtype uint8 (raw pixels 0-255) or int32 (16-bit), got {x.dtype}")
    if x.ndim != 4 or not 1 <= x.shape[1] <= 16:
        raise ValueError(
            f"images: expected shape [B, C, H, W] with C = 1..16, got {tuple(x.shape)}"
        )
    if channels is not None and x.shape[1] != channels:
        raise ValueError(
            f"images: expected {channels} channels (from the data info), got {x.shape[1]}"
        )


def normalize(x_uint8: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 ``[B, C, H, W]`` -> float32 ``(x / 255 - mean) / std`` per channel (mean/std in [0, 1])."""
    check_images(x_uint8)
    return _standardize(to_unit(x_uint8), mean, std)


def check_generator(generator: torch.Generator | None, device: torch.device) -> None:
    """Random parameters are drawn on the images' device, so the generator must live there."""
    if generator is not None and torch.device(generator.device).type != torch.device(device).type:
        raise ValueError(
            f"generator is on {generator.device} but the images are on {device}; "
            f"create it with torch.Generator(device=images.device)"
        )


def _check_config(cfg: AugmentConfig) -> None:
    """Every bad recipe name or parameter is an error naming the ``augment.*`` key."""
    if cfg.recipe not in RECIPES:
        raise ValueError(f"augment.recipe: '{cfg.recipe}' is not one of {', '.join(RECIPES)}")
    if cfg.size < 0:
        raise ValueError(f"augment.size: must be >= 0 (0 = the images' size), got {cfg.size}")
    lo, hi = cfg.scale
    if not 0.0 < lo <= hi <= 1.0:
        raise ValueError(
            f"augment.scale: need 0 < min <= max <= 1 (fraction of the image area; a crop cannot "
            f"be larger than the image), got {tuple(cfg.scale)}"
        )
    if not 0.0 < cfg.ratio[0] <= cfg.ratio[1]:
        raise ValueError(f"augment.ratio: need 0 < min <= max, got {tuple(cfg.ratio)}")
    probs = {
        "augment.flip_p": [cfg.flip_p],
        "augment.jitter_p": [cfg.jitter_p],
        "augment.gray_p": [cfg.gray_p],
        "augment.blur_p": [cfg.blur_p],
        "augment.solarize_p": [cfg.solarize_p],
        "augment.view_blur_p": cfg.view_blur_p,
        "augment.view_solarize_p": cfg.view_solarize_p,
    }
    for key, values in probs.items():
        for p in values:
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{key}: a probability in [0, 1], got {p}")
    if cfg.jitter_strength < 0:
        raise ValueError(f"augment.jitter_strength: must be >= 0, got {cfg.jitter_strength}")
    if not 0.0 < cfg.blur_sigma[0] <= cfg.blur_sigma[1]:
        raise ValueError(f"augment.blur_sigma: need 0 < min <= max, got {tuple(cfg.blur_sigma)}")


class Views(nn.Module):
    """Callable as ``views(images_uint8, n_views=2, generator=None) -> list[Tensor]``.

    Each view is a normalised float32 ``[B, C, size, size]`` tensor on the images' device. All views
    of a call are processed as one batch of ``B * n_views`` samples (fewer, larger kernels).
    """

    def __init__(self, cfg: AugmentConfig, channels: int, size: int, mean, std) -> None:
        super().__init__()
        _check_config(cfg)
        check_channels(cfg, channels)  # 1..16; augment.gray_p refused for C not in {1, 3}
        if size <= 0:
            raise ValueError(f"size: the output side must be > 0, got {size}")
        self.cfg = cfg
        self.channels = channels
        self.size = size
        self.mean = tuple(_channel_values(mean, channels, "mean"))
        self.std = tuple(_channel_values(std, channels, "std"))
        recipe = cfg.recipe
        colour = recipe in ("simclr", "byol")
        self.crop = recipe != "none"
        self.flip_p = cfg.flip_p if self.crop else 0.0
        self.jitter_p = cfg.jitter_p if colour else 0.0
        self.gray_p = cfg.gray_p if colour and channels == 3 else 0.0
        default_blur = BYOL_BLUR_P if recipe == "byol" else (cfg.blur_p,)
        default_sol = BYOL_SOLARIZE_P if recipe == "byol" else (cfg.solarize_p,)
        self.view_blur_p = tuple(cfg.view_blur_p or default_blur) if colour else (0.0,)
        self.view_solarize_p = tuple(cfg.view_solarize_p or default_sol) if colour else (0.0,)
        s = cfg.jitter_strength
        # SimCLR's colour distortion: brightness, contrast, saturation 0.8 s; hue 0.2 s.
        self.jitter_range = (0.8 * s, 0.8 * s, 0.8 * s, min(0.2 * s, 0.5))
        k = max(3, int(round(0.1 * size)))
        self.blur_kernel = k if k % 2 == 1 else k + 1
        self._consts: dict[tuple, torch.Tensor] = {}

    def _const(self, key: str, values, device) -> torch.Tensor:
        """A small constant on ``device``, copied there on first use only: later batches do no
        host work and no blocking host-to-device copy (a host sync on CUDA)."""
        t = self._consts.get((key, str(device)))
        if t is None:
            t = self._consts[(key, str(device))] = torch.tensor(values, device=device)
        return t

    def extra_repr(self) -> str:
        return f"recipe={self.cfg.recipe}, channels={self.channels}, size={self.size}"

    def plain(self) -> Views:
        """The same size and normalisation with no random crop, flip or colour: what grids and
        evaluation show."""
        return Views(dataclasses.replace(self.cfg, recipe="none"), self.channels, self.size,
                     self.mean, self.std)  # fmt: skip

    def _standardize(self, x01: torch.Tensor) -> torch.Tensor:
        mean = self._const("mean", self.mean, x01.device).view(1, -1, 1, 1)
        return (x01 - mean) / self._const("std", self.std, x01.device).view(1, -1, 1, 1)

    def to_unit(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised float images back to [0, 1] (inverse of the normalisation, clamped)."""
        mean = torch.tensor(self.mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        return (x * std + mean).clamp(0, 1)

    def _per_view(self, probs: tuple[float, ...], n_views: int, batch: int, device) -> torch.Tensor:
        p = [probs[i % len(probs)] for i in range(n_views)]
        p = self._const(f"p{probs}x{n_views}", p, device)
        return p[:, None].expand(n_views, batch).reshape(-1)

    def sample(
        self,
        n_views: int,
        batch: int,
        height: int,
        width: int,
        device: torch.device,
        generator: torch.Generator | None = None,
    ) -> ViewParams:
        """Draw parameters for ``n_views * batch`` samples (view-major order) on ``device``."""
        n = n_views * batch
        g = generator

        def rand(*shape: int) -> torch.Tensor:
            return torch.rand(*shape, device=device, generator=g)

        box = self._sample_boxes(n, height, width, device, g)
        flip = rand(n) < self.flip_p
        jitter_on = rand(n) < self.jitter_p
        b, c, s, h = self.jitter_range
        lows = self._const("lows", [max(0.0, 1 - b), max(0.0, 1 - c), max(0.0, 1 - s), -h], device)
        highs = self._const("highs", [1 + b, 1 + c, 1 + s, h], device)
        jitter = lows + (highs - lows) * rand(n, 4)
        gray = rand(n) < self.gray_p
        blur = rand(n) < self._per_view(self.view_blur_p, n_views, batch, device)
        lo, hi = self.cfg.blur_sigma
        sigma = lo + (hi - lo) * rand(n)
        solarize = rand(n) < self._per_view(self.view_solarize_p, n_views, batch, device)
        return ViewParams(box, flip, jitter_on, jitter, gray, blur, sigma, solarize)

    def _sample_boxes(self, n: int, height: int, width: int, device, g) -> torch.Tensor:
        """torchvision's RandomResizedCrop rule, vectorised, with continuous (sub-pixel) boxes.

        Each sample tries ``_CROP_TRIES`` (area, log-ratio) draws and keeps the first that fits;
        if none fits it takes the largest centred crop with a ratio in range. Areas are therefore
        exactly within ``scale`` whenever a draw fits.
        """
        if not self.crop:
            full = self._const(f"full{height}x{width}", [0.0, 0.0, width, height], device)
            return full.expand(n, 4).float().clone()
        area = float(height * width)
        lo, hi = self.cfg.scale
        r0, r1 = math.log(self.cfg.ratio[0]), math.log(self.cfg.ratio[1])
        target = area * (lo + (hi - lo) * torch.rand(n, _CROP_TRIES, device=device, generator=g))
        aspect = torch.exp(r0 + (r1 - r0) * torch.rand(n, _CROP_TRIES, device=device, generator=g))
        w = torch.sqrt(target * aspect)
        h = torch.sqrt(target / aspect)
        fits = (w <= width) & (h <= height)
        first = fits.int().argmax(dim=1, keepdim=True)
        w = w.gather(1, first).squeeze(1)
        h = h.gather(1, first).squeeze(1)
        in_ratio = width / height
        if in_ratio < self.cfg.ratio[0]:
            fw, fh = float(width), width / self.cfg.ratio[0]
        elif in_ratio > self.cfg.ratio[1]:
            fw, fh = height * self.cfg.ratio[1], float(height)
        else:
            fw, fh = float(width), float(height)
        any_fit = fits.any(dim=1)
        w = torch.where(any_fit, w, torch.full_like(w, fw))
        h = torch.where(any_fit, h, torch.full_like(h, fh))
        x0 = (width - w) * torch.rand(n, device=device, generator=g)
        y0 = (height - h) * torch.rand(n, device=device, generator=g)
        return torch.stack([x0, y0, w, h], dim=1)

    def apply(self, x: torch.Tensor, p: ViewParams) -> torch.Tensor:
        """Apply ``p`` to uint8 (or 16-bit: int32) ``x`` (already repeated to one row per sample);
        float in [0, 1].

        Each random op runs only on the rows that draw it (``ops.on_rows``): on the CPU the rows are
        gathered, changed and scattered back; on accelerators the op runs on every row and
        ``torch.where`` picks (no ``nonzero``, so no host sync).
        """
        x = to_unit(x)
        x = self._crop_flip(x, p)
        if self.jitter_p > 0:
            rgb_or_gray = self.channels in (1, 3)  # else pixels.py's per-channel jitter
            jit = partial(colour_jitter, hue=self.jitter_range[3] > 0) if rgb_or_gray else channel_jitter
            x = on_rows(x, p.jitter_on, lambda v, i: jit(v, take(p.jitter, i)))
        if self.gray_p > 0:
            x = on_rows(x, p.gray, lambda v, i: kornia.color.rgb_to_grayscale(v).expand_as(v))
        if max(self.view_blur_p) > 0:
            k = self.blur_kernel
            x = on_rows(x, p.blur, lambda v, i: gaussian_blur(v, take(p.sigma, i), k))
        if max(self.view_solarize_p) > 0:
            x = on_rows(x, p.solarize, lambda v, i: kornia.enhance.solarize(v, 0.5))
        return x

    def _crop_flip(self, x: torch.Tensor, p: ViewParams) -> torch.Tensor:
        """Resized crop and horizontal flip in one bilinear resampling (one affine warp).

        The matrix maps source pixel centres to output pixel centres (``align_corners=True``
        convention): output pixel ``u`` samples source ``x0 + (u + 0.5) * w / size - 0.5``.
        """
        size = self.size
        _, _, height, width = x.shape
        if not self.crop and (height, width) == (size, size):
            return x
        x0, y0, w, h = p.box.unbind(1)
        ax, ay = w / size, h / size
        bx, by = x0 + 0.5 * ax - 0.5, y0 + 0.5 * ay - 0.5
        sx = torch.where(p.flip, -1.0 / ax, 1.0 / ax)
        tx = torch.where(p.flip, (size - 1) + bx / ax, -bx / ax)
        zeros = torch.zeros_like(ax)
        mat = torch.stack(
            [torch.stack([sx, zeros, tx], 1), torch.stack([zeros, 1.0 / ay, -by / ay], 1)], 1
        )
        # "border": an upsampled crop touching the edge samples up to half a pixel outside it.
        return kornia.geometry.transform.crop_by_transform_mat(
            x, mat, (size, size), mode="bilinear", padding_mode="border", align_corners=True
        )

    def forward(
        self, images: torch.Tensor, n_views: int = 2, generator: torch.Generator | None = None
    ) -> list[torch.Tensor]:
        check_images(images, self.channels)
        if n_views < 1:
            raise ValueError(f"n_views: must be >= 1, got {n_views}")
        check_generator(generator, images.device)
        batch, _, height, width = images.shape
        params = self.sample(n_views, batch, height, width, images.device, generator)
        x = images.repeat(n_views, 1, 1, 1) if n_views > 1 else images
        n = len(x)
        per = n
        if x.device.type == "cpu":
            pixels = x.shape[1] * max(height * width, self.size * self.size)
            per = max(1, _CPU_CHUNK_BYTES // (4 * pixels))
        chunks = [
            self._standardize(self.apply(x[i : i + per], params.rows(i, i + per)))
            for i in range(0, n, per)
        ]
        out = chunks[0] if len(chunks) == 1 else torch.cat(chunks)
        return list(out.split(batch))


def build_views(cfg: AugmentConfig, info: DataInfo) -> Views:
    """The view module for ``cfg.recipe`` on data described by ``info``.

    ``cfg.size`` 0 means the images' own size; ``cfg.mean``/``cfg.std`` override the manifest's.
    """
    size = cfg.size or info.image_size
    mean = cfg.mean if cfg.mean else info.mean
    std = cfg.std if cfg.std else info.std
    return Views(cfg, info.channels, size, mean, std)
