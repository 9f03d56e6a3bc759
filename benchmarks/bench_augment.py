"""SimCLR views: batched on the training device (this package) vs per-sample PIL in DataLoader workers.

Both pipelines start from the same decoded uint8 images and produce 2 normalised float views per
image with the same recipe (resized crop, flip, colour jitter p=0.8, grayscale p=0.2, blur p=0.5
at 96 px / off at 32 px). On the same cores:

  (a) ``selfsup.augment``: 1 DataLoader worker only collates uint8 images; the views are made in
      the main process (the "device": here the CPU, on a GPU node the GPU) with ``--threads``
      intra-op threads (each count is one row).
  (b) conventional: ``--cores`` DataLoader workers each run the per-sample PIL recipe (what
      torchvision's transforms call), the main process only receives finished float batches.

Reported: source images/s end to end (worker start-up included: with few batches, excluding the
first batch would hide the work the other workers did in parallel), and CPU seconds per
1000 images in the worker processes and in the main process. ``--variants`` also times, in one
process on a preloaded batch, kornia.augmentation modules (ColorJiggle / ColorJitter with
``cropping_mode="resample"``), channels-last input, and optionally ``torch.compile``.

    .venv/bin/python benchmarks/bench_augment.py               # ~2 min on 2 busy cores
    .venv/bin/python benchmarks/bench_augment.py --variants    # + kornia-module comparison
"""

from __future__ import annotations

import argparse
import math
import os
import random
import resource
import time

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageFilter
from torch.utils.data import DataLoader, Dataset

from selfsup.augment.views import AugmentConfig, build_views
from selfsup.data_info import DataInfo
from selfsup.pretrain.data.datasets import shapes

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def recipe(size: int) -> AugmentConfig:
    return AugmentConfig(recipe="simclr", size=size, blur_p=0.5 if size >= 64 else 0.0)


class Decoded(Dataset):
    """(a): the worker only turns a stored uint8 image into a tensor (what decoding leaves)."""

    def __init__(self, images: np.ndarray) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(self.images[i]).permute(2, 0, 1)


class PILViews(Dataset):
    """(b): torchvision's SimCLR recipe per sample with PIL, as its transforms would run it."""

    def __init__(self, images: np.ndarray, cfg: AugmentConfig) -> None:
        self.images, self.cfg = images, cfg
        s = cfg.jitter_strength
        self.jitter = (0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)
        k = max(3, round(0.1 * cfg.size))
        self.kernel = k if k % 2 else k + 1

    def __len__(self) -> int:
        return len(self.images)

    def _crop(self, img: Image.Image) -> Image.Image:
        w, h = img.size
        lo, hi = self.cfg.scale
        r0, r1 = (math.log(r) for r in self.cfg.ratio)
        for _ in range(10):
            area = w * h * random.uniform(lo, hi)
            ar = math.exp(random.uniform(r0, r1))
            cw, ch = round(math.sqrt(area * ar)), round(math.sqrt(area / ar))
            if 0 < cw <= w and 0 < ch <= h:
                x0, y0 = random.randint(0, w - cw), random.randint(0, h - ch)
                break
        else:
            cw, ch, x0, y0 = w, h, 0, 0
        size = self.cfg.size
        return img.resize((size, size), Image.BILINEAR, box=(x0, y0, x0 + cw, y0 + ch))

    @staticmethod
    def _hue(img: Image.Image, shift: float) -> Image.Image:
        """torchvision's PIL ``adjust_hue``: shift the H channel of PIL's HSV mode."""
        h, s, v = img.convert("HSV").split()
        arr = np.asarray(h, dtype=np.uint8)
        with np.errstate(over="ignore"):
            arr = arr + np.uint8(int(shift * 255) % 256)
        return Image.merge("HSV", (Image.fromarray(arr, "L"), s, v)).convert("RGB")

    def _view(self, img: Image.Image) -> torch.Tensor:
        cfg = self.cfg
        img = self._crop(img)
        if random.random() < cfg.flip_p:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        if random.random() < cfg.jitter_p:
            b, c, s, hh = self.jitter
            ops = [
                lambda im: ImageEnhance.Brightness(im).enhance(random.uniform(1 - b, 1 + b)),
                lambda im: ImageEnhance.Contrast(im).enhance(random.uniform(1 - c, 1 + c)),
                lambda im: ImageEnhance.Color(im).enhance(random.uniform(1 - s, 1 + s)),
                lambda im: self._hue(im, random.uniform(-hh, hh)),
            ]
            random.shuffle(ops)
            for op in ops:
                img = op(img)
        if random.random() < cfg.gray_p:
            img = img.convert("L").convert("RGB")
        if random.random() < cfg.blur_p:
            img = img.filter(ImageFilter.GaussianBlur(random.uniform(*cfg.blur_sigma)))
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1)
        mean = torch.tensor(MEAN).view(3, 1, 1)
        std = torch.tensor(STD).view(3, 1, 1)
        return (x - mean) / std

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        img = Image.fromarray(self.images[i])
        return self._view(img), self._view(img)


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_loader(loader: DataLoader, consume) -> tuple[float, float, float]:
    """(images/s including worker start-up, worker CPU s / 1000 images, main CPU s / 1000 images).

    Workers are not persistent, so they have exited and been reaped when iteration ends and their
    CPU time is in RUSAGE_CHILDREN.
    """
    cpu0, main0 = children_cpu(), time.process_time()
    t0 = time.perf_counter()
    n = 0
    for batch in loader:
        consume(batch)
        n += len(batch[0]) if isinstance(batch, (list, tuple)) else len(batch)
    elapsed = time.perf_counter() - t0
    del loader
    workers = children_cpu() - cpu0
    main = time.process_time() - main0
    return n / elapsed, workers / n * 1000, main / n * 1000


def bench_size(
    size: int, batch: int, batches: int, cores: int, threads: list[int]
) -> dict[str, tuple[float, ...]]:
    src = shapes(batch * batches, size=size, seed=0).images  # [N, H, W, 3] uint8
    cfg = recipe(size)
    info = DataInfo(3, size, MEAN, STD)
    views = build_views(cfg, info)
    g = torch.Generator().manual_seed(0)
    rows: dict[str, tuple[float, ...]] = {}

    # (a) device pipeline: decode-only worker, views batched in the main process
    warm = torch.from_numpy(src[:batch]).permute(0, 3, 1, 2).contiguous()
    for n_threads in threads:
        torch.set_num_threads(n_threads)
        views(warm, 2, g)
        t = time.perf_counter()
        views(warm, 2, g)
        rate = batch / (time.perf_counter() - t)
        rows[f"(a) views only, {n_threads} thread(s)"] = (rate, 0.0, float("nan"))
        loader = DataLoader(Decoded(src), batch_size=batch, num_workers=1, shuffle=True)
        result = run_loader(loader, lambda x: views(x, 2, g))
        rows[f"(a) selfsup.augment, 1 worker, {n_threads} thr"] = result

    # (b) per-sample PIL in `cores` workers; main process only receives
    torch.set_num_threads(1)
    loader = DataLoader(PILViews(src, cfg), batch_size=batch, num_workers=cores, shuffle=True)
    rows[f"(b) PIL per sample, {cores} workers"] = run_loader(loader, lambda b: None)
    torch.set_num_threads(cores)
    return rows


def bench_variants(size: int, batch: int, threads: int, compile_: bool) -> dict[str, float]:
    """In-process views/s on one preloaded batch for alternatives that were tried."""
    import kornia.augmentation as K

    torch.set_num_threads(threads)
    cfg = recipe(size)
    x = torch.from_numpy(shapes(batch, size=size, seed=1).images).permute(0, 3, 1, 2).contiguous()
    s = cfg.jitter_strength
    out: dict[str, float] = {}

    def timed(fn, reps: int = 3) -> float:
        fn()
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        return batch * reps / (time.perf_counter() - t)

    for name, jitter_cls in (("ColorJiggle", K.ColorJiggle), ("ColorJitter", K.ColorJitter)):
        ops = [
            K.RandomResizedCrop(
                (size, size), scale=cfg.scale, ratio=cfg.ratio, cropping_mode="resample"
            ),
            K.RandomHorizontalFlip(),
            jitter_cls(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s, p=cfg.jitter_p),
            K.RandomGrayscale(p=cfg.gray_p),
        ]
        if cfg.blur_p > 0:
            k = max(3, round(0.1 * size)) | 1
            ops.append(K.RandomGaussianBlur((k, k), cfg.blur_sigma, p=cfg.blur_p))
        ops.append(K.Normalize(torch.tensor(MEAN), torch.tensor(STD)))
        aug = K.AugmentationSequential(*ops)
        out[f"kornia.augmentation + {name}"] = timed(
            lambda aug=aug: aug(x.repeat(2, 1, 1, 1).float() / 255)
        )
    views = build_views(cfg, DataInfo(3, size, MEAN, STD))
    out["selfsup.augment (functional)"] = timed(lambda: views(x, 2))
    xl = x.contiguous(memory_format=torch.channels_last)
    out["selfsup.augment, channels-last input"] = timed(lambda: views(xl, 2))
    if compile_:
        compiled = torch.compile(views)
        t = time.perf_counter()
        compiled(x, 2)
        out["torch.compile first call (s)"] = time.perf_counter() - t
        out["selfsup.augment + torch.compile"] = timed(lambda: compiled(x, 2))
    return out


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--sizes", type=int, nargs="+", default=[32, 96])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--images", type=int, default=2048, help="source images per pipeline at 32 px")
    p.add_argument("--cores", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=[1, 2],
        help="torch intra-op threads for (a); on shared busy cores 1 avoids OpenMP spin-waiting",
    )
    p.add_argument("--variants", action="store_true", help="also time kornia modules etc.")
    p.add_argument("--compile", action="store_true", help="with --variants: also torch.compile")
    args = p.parse_args()
    print(f"cores={args.cores} batch={args.batch} views/image=2 torch={torch.__version__}")
    header = f"{'pipeline':40s} {'images/s':>9s} {'worker CPU s/1k':>16s} {'main CPU s/1k':>14s}"
    for size in args.sizes:
        # 96 px costs ~9x the pixels: fewer batches keep the run short
        batches = max(4, args.images // args.batch // (1 if size <= 32 else 2))
        print(f"\n{size} px, {batches} batches of {args.batch} (blur p={recipe(size).blur_p})")
        print(header)
        for name, (rate, wcpu, mcpu) in bench_size(
            size, args.batch, batches, args.cores, args.threads
        ).items():
            print(f"{name:40s} {rate:9.0f} {wcpu:16.3f} {mcpu:14.3f}")
    if args.variants:
        for size in args.sizes:
            print(f"\n{size} px, in-process source images/s on one preloaded batch (2 views each)")
            for name, value in bench_variants(
                size, args.batch, min(args.threads), args.compile
            ).items():
                print(f"  {name:45s} {value:9.1f}")


if __name__ == "__main__":
    main()
