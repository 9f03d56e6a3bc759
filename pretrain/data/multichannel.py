"""Images that are not 8-bit grey or RGB: ``C`` channels (1..16) at 8 or 16 bits.

``load_channels(path, size, keep_depth)`` decodes one file to ``[size, size, C]``:

* ``.npy``: an array ``[H, W, C]`` (or ``[H, W]``, one channel) of uint8 or uint16
  (read with ``allow_pickle=False``);
* a TIFF: one page per channel (every page one grey plane of the same size and dtype), or one
  page holding every channel;
* any other file PIL reads as 16-bit grey (PNG-16), or as 8-bit grey/RGB.

The image is centre-cropped square and resized per channel (bicubic on float32 planes, rounded
and clipped to the dtype's range), so a 16-bit value is never squeezed through 8 bits.
``keep_depth=False`` scales 16-bit data to 8 bits (``(v * 255 + 32767) // 65535``, as
``folders.load_image`` does); ``keep_depth=True`` keeps uint16. Anything else (a wrong ndim, a
float dtype, pages of different sizes, more than ``MAX_CHANNELS`` channels) is a ``DatasetError``
naming the file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageSequence

from selfsup.pretrain.data.datasets import DatasetError

MAX_CHANNELS = 16
ARRAY_SUFFIXES = {".npy"}
_MODES = {"L": np.uint8, "I;16": np.uint16, "I;16L": np.uint16, "I;16B": np.uint16, "I;16N": np.uint16,
          "RGB": np.uint8, "I": None}  # fmt: skip


def _page(im: Image.Image, path: Path) -> np.ndarray:
    """One TIFF/PNG page as ``[H, W, c]`` uint8/uint16."""
    if im.mode not in _MODES:
        raise DatasetError(f"{path}: unsupported image mode {im.mode!r} (expected 8/16-bit grey or RGB pages)")
    arr = np.asarray(im)
    if im.mode == "I":  # PIL opens some 16-bit PNGs as 32-bit int: keep them if they fit 16 bits
        if arr.size and (arr.min() < 0 or arr.max() > 65535):
            raise DatasetError(f"{path}: 32-bit integer pixels outside 0..65535")
        arr = arr.astype(np.uint16)
    return arr[..., None] if arr.ndim == 2 else arr


def read_raw(path: str | Path) -> np.ndarray:
    """The file's pixels as ``[H, W, C]`` uint8 or uint16, before any resizing."""
    path = Path(path)
    if path.suffix.lower() in ARRAY_SUFFIXES:
        try:
            arr = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise DatasetError(f"cannot read array {path}: {e}") from e
        if arr.ndim == 2:
            arr = arr[..., None]
        if arr.ndim != 3:
            raise DatasetError(f"{path}: expected an array [H, W, C] (or [H, W]), got shape {arr.shape}")
    else:
        try:
            with Image.open(path) as im:
                pages = [_page(p, path) for p in ImageSequence.Iterator(im)]
        except (OSError, ValueError, SyntaxError, EOFError) as e:
            raise DatasetError(f"cannot read image {path}: {e}") from e
        shapes = {p.shape[:2] for p in pages}
        if len(shapes) != 1 or len({p.dtype for p in pages}) != 1:
            sizes = ", ".join(f"page {i}: {p.shape[1]}x{p.shape[0]} {p.dtype}" for i, p in enumerate(pages))
            raise DatasetError(f"{path}: pages differ in size or depth ({sizes}); every page must be one channel "
                               "of the same size")  # fmt: skip
        arr = pages[0] if len(pages) == 1 else np.concatenate(pages, axis=2)
    if arr.dtype not in (np.uint8, np.uint16):
        raise DatasetError(f"{path}: pixels must be uint8 or uint16, got {arr.dtype}")
    if not 1 <= arr.shape[2] <= MAX_CHANNELS:
        raise DatasetError(f"{path}: {arr.shape[2]} channels; 1..{MAX_CHANNELS} are supported")
    return arr


def to_8bit(arr: np.ndarray) -> np.ndarray:
    """uint16 scaled (not clipped) to uint8, rounding to nearest."""
    return ((arr.astype(np.int64) * 255 + 32767) // 65535).astype(np.uint8)


def resize_square(arr: np.ndarray, size: int) -> np.ndarray:
    """Centre-crop square and resize every channel to ``size`` (bicubic in float32, same dtype)."""
    h, w, c = arr.shape
    side = min(h, w)
    y0, x0 = (h - side) // 2, (w - side) // 2
    arr = arr[y0:y0 + side, x0:x0 + side]
    if side == size:
        return np.ascontiguousarray(arr)
    top = np.iinfo(arr.dtype).max
    planes = [np.asarray(Image.fromarray(arr[..., i].astype(np.float32), "F").resize((size, size), Image.BICUBIC))
              for i in range(c)]  # fmt: skip
    return np.clip(np.rint(np.stack(planes, axis=2)), 0, top).astype(arr.dtype)


def load_channels(path: str | Path, size: int, keep_depth: bool = False) -> np.ndarray:
    """Decode one file to ``[size, size, C]`` uint8 (or uint16 with ``keep_depth``)."""
    arr = resize_square(read_raw(path), size)
    return to_8bit(arr) if arr.dtype == np.uint16 and not keep_depth else arr
