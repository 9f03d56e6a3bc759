"""Reconstruction grid PNG for autoencoder methods: what went in, what the model saw, what came out.

Rows are input, corrupted (or masked) and reconstruction; columns are the first ``n`` images.
Small images (28/32 px) are enlarged by pixel repetition so the PNG is readable, never smoothed,
so what is shown is exactly what the model produced. A method whose reconstruction row needs
explaining (MAE with ``norm_pix_loss`` predicts standardised patches) declares a
``reconstruction_caption``; it is printed under the grid and stored in the PNG's Description.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

from selfsup.pretrain.hooks.base import HookContext, TrainHook
from selfsup.pretrain.run.rundir import RECONSTRUCTIONS_FILE

ROWS = ("input", "corrupted", "reconstruction")
MIN_CELL_PX = 96  # enlarge each image to at least this side
GAP_PX = 2


class Reconstructs(Protocol):
    training: bool

    def reconstruct(self, images: torch.Tensor) -> dict[str, torch.Tensor]: ...

    def train(self, mode: bool = True) -> object: ...


def grid_array(rows: list[torch.Tensor]) -> np.ndarray:
    """Tile equal-shaped [n, C, H, W] float [0, 1] batches into one uint8 [rows*H', n*W', 3]."""
    n, c, h, w = rows[0].shape
    scale = max(1, -(-MIN_CELL_PX // max(h, w)))
    ch, cw = h * scale + GAP_PX, w * scale + GAP_PX
    canvas = np.full((len(rows) * ch - GAP_PX, n * cw - GAP_PX, 3), 255, dtype=np.uint8)
    for r, batch in enumerate(rows):
        if batch.shape != rows[0].shape:
            raise ValueError(
                f"row {r} has shape {tuple(batch.shape)}, expected {(n, c, h, w)}"
            )
        pix = (batch.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
        pix = pix.expand(-1, 3, -1, -1) if c == 1 else pix
        pix = pix.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
        for i in range(n):
            canvas[r * ch : r * ch + h * scale, i * cw : i * cw + w * scale] = (
                pix[i].permute(1, 2, 0).numpy()
            )
    return canvas


def save_reconstruction_grid(
    method: Reconstructs, images_uint8: torch.Tensor, path: str | Path, n: int = 8
) -> Path:
    """Run ``method.reconstruct`` on the first ``n`` images in eval mode and write the PNG."""
    if images_uint8.dim() != 4 or images_uint8.dtype != torch.uint8:
        raise ValueError(
            f"expected uint8 images [B, C, H, W], got {images_uint8.dtype} {tuple(images_uint8.shape)}"
        )
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    was_training = method.training
    method.train(False)
    try:
        out = method.reconstruct(images_uint8[:n])
    finally:
        method.train(was_training)
    missing = [k for k in ROWS if k not in out]
    if missing:
        raise ValueError(f"reconstruct() returned no {', '.join(missing)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(grid_array([out[k] for k in ROWS]))
    caption = getattr(method, "reconstruction_caption", "")
    meta = PngInfo()
    if caption:
        image = _with_caption(image, f"rows: {', '.join(ROWS)}. {caption}")
        meta.add_text("Description", caption)
    image.save(path, pnginfo=meta)
    return path


def _with_caption(image: Image.Image, text: str) -> Image.Image:
    """The grid with ``text`` wrapped into lines below it (PIL's built-in font)."""
    font = ImageFont.load_default()
    per_line = max(20, image.width // 6)
    words, lines = text.split(), [""]
    for w in words:
        if len(lines[-1]) + len(w) + 1 > per_line:
            lines.append("")
        lines[-1] = f"{lines[-1]} {w}".strip()
    out = Image.new("RGB", (image.width, image.height + 12 * len(lines) + 6), "white")
    out.paste(image, (0, 0))
    draw = ImageDraw.Draw(out)
    for i, line in enumerate(lines):
        draw.text((2, image.height + 4 + 12 * i), line, fill="black", font=font)
    return out


class ReconstructionGrid(TrainHook):
    """At the end of a run of a method that reconstructs: ``reconstructions.png`` in the run
    directory (the first ``n`` training images, un-augmented), also logged as a W&B image."""

    def __init__(self, shards: str, n: int = 8) -> None:
        self.shards = shards
        self.n = n

    def on_end(self, ctx: HookContext) -> None:
        if not (ctx.is_main and ctx.method.reconstructs):
            return
        from selfsup.pretrain.data.stream import ShardSet, ShardStream

        stream = ShardStream(ShardSet.open(self.shards), self.n, shuffle=False, drop_last=False)
        images = next(iter(stream))["images"].to(ctx.device)
        path = save_reconstruction_grid(ctx.method, images, ctx.run_dir / RECONSTRUCTIONS_FILE, self.n)
        ctx.log.image("reconstructions", path, ctx.step)
