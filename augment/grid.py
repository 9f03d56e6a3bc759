"""PNG grids of images (source + views, or input / corrupted / reconstruction) for a person to check.

Plain PIL: each tile is scaled with nearest-neighbour (pixels stay visible at 28 px) and laid out
on a fixed grid, so the file's size is a simple function of the arguments (tests rely on that).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

HEADER = 14  # pixels above the tiles when column labels are drawn


def to_unit(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Undo ``normalize``: normalised float views -> [0, 1] for display."""
    m = torch.as_tensor(list(mean), dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(list(std), dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x * s + m).clamp(0.0, 1.0)


def grid_size(rows: int, cols: int, tile: int, pad: int, labelled: bool) -> tuple[int, int]:
    """(width, height) in pixels of a grid made by ``make_grid``."""
    width = cols * tile + (cols + 1) * pad
    height = rows * tile + (rows + 1) * pad + (HEADER if labelled else 0)
    return width, height


def shown_channels(img: torch.Tensor, channels: Sequence[int] | None = None) -> torch.Tensor:
    """The planes of a ``[C, H, W]`` image a person sees: ``channels`` (1 or 3 indices, shown as
    grey or RGB), by default all of a C = 1 or 3 image, else the first 3 (C = 2: the first)."""
    c = img.shape[0]
    pick = list(channels) if channels else ([] if c in (1, 3) else [0] if c == 2 else [0, 1, 2])
    if not pick:
        return img
    if len(pick) not in (1, 3) or not all(0 <= k < c for k in pick):
        raise ValueError(f"channels to show: 1 or 3 indices in 0..{c - 1}, got {pick}")
    return img[pick]


def make_grid(
    rows: Sequence[Sequence[torch.Tensor]],
    tile: int = 96,
    pad: int = 2,
    col_labels: Sequence[str] | None = None,
    channels: Sequence[int] | None = None,
) -> Image.Image:
    """One grid row per sequence of images ``[C, H, W]`` (a ``[K, C, H, W]`` tensor is one), float
    in [0, 1]; C other than 1 or 3 shows ``channels`` (``shown_channels``). Images may differ in
    size; each is scaled to ``tile`` x ``tile``."""
    if not rows:
        raise ValueError("make_grid: no rows to draw")
    if any(img.ndim == 3 for row in rows for img in row):
        rows = [[shown_channels(img, channels) if img.ndim == 3 else img for img in row] for row in rows]
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            if img.ndim != 3 or img.shape[0] not in (1, 3):
                raise ValueError(
                    f"make_grid: image ({i}, {j}) must be [C, H, W] with C = 1 or 3, "
                    f"got {tuple(img.shape)}"
                )
    cols = max(len(r) for r in rows)
    labelled = bool(col_labels)
    width, height = grid_size(len(rows), cols, tile, pad, labelled)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    top = HEADER if labelled else 0
    if labelled:
        draw = ImageDraw.Draw(canvas)
        for j, text in enumerate(col_labels or []):
            draw.text((pad + j * (tile + pad) + 2, 1), str(text), fill=(0, 0, 0))
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            pixels = (img.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
            arr = pixels.expand(3, -1, -1).permute(1, 2, 0).numpy()
            pil = Image.fromarray(np.ascontiguousarray(arr)).resize((tile, tile), Image.NEAREST)
            canvas.paste(pil, (pad + j * (tile + pad), top + pad + i * (tile + pad)))
    return canvas


def save_grid(
    rows: Sequence[Sequence[torch.Tensor]],
    path: str | Path,
    tile: int = 96,
    pad: int = 2,
    col_labels: Sequence[str] | None = None,
    channels: Sequence[int] | None = None,
) -> Path:
    """``make_grid`` written as PNG to ``path`` (parent folders created)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    make_grid(rows, tile, pad, col_labels, channels).save(out, format="PNG")
    return out
