"""End-of-run pictures a method declares (``Method.pictures``, ``Method.latent``), as PNGs in the run
directory and W&B images.

- Every grid ``method.pictures(images)`` returns (``[rows, cols, C, H, W]`` in [0, 1]) becomes
  ``<name>.png``: e.g. a VAE's ``samples.png`` (from the prior) and ``interpolation.png``, a
  β-VAE's ``traversal.png``. The grid is tiled like the reconstruction grid (pixel repetition,
  never smoothed).
- When ``method.latent(images)`` is a 2- or 3-dimensional code, ``latent_scatter.png``: the codes
  of up to ``scatter_points`` images coloured by class (the notes' visualisation with a 2- or 3-unit
  bottleneck). The images are the test set (``data.test``) when the run names one that opens,
  else the training set; the title says which.

The hook knows nothing about which method runs; a method without pictures or code writes nothing.
Pictures are drawn in eval mode with a seeded generator, so a rerun draws the same samples.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from selfsup.pretrain.hooks.base import HookContext, TrainHook
from selfsup.pretrain.hooks.recon import grid_array
from selfsup.pretrain.methods.base import Method

LATENT_SCATTER_FILE = "latent_scatter.png"


def save_grid(grid: torch.Tensor, path: str | Path) -> Path:
    """Write a ``[rows, cols, C, H, W]`` float [0, 1] grid as a PNG."""
    if grid.dim() != 5:
        raise ValueError(f"a picture grid is [rows, cols, C, H, W], got {tuple(grid.shape)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid_array(list(grid.unbind(0)))).save(path)
    return path


def save_latent_scatter(
    codes: np.ndarray, labels: np.ndarray, classes: list[str], path: str | Path, title: str
) -> Path:
    """Scatter plot of 2- or 3-dim ``codes`` coloured by class (a legend names the classes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dims = codes.shape[1]
    if dims not in (2, 3):
        raise ValueError(f"a latent scatter needs 2 or 3 dimensions, got {dims}")
    fig = plt.figure(figsize=(7, 6))
    ax = fig.add_subplot(projection="3d" if dims == 3 else None)
    cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
    for c in np.unique(labels):
        sel = labels == c
        name = classes[c] if 0 <= c < len(classes) else str(c)
        ax.scatter(*codes[sel].T, s=6, alpha=0.7, color=cmap(int(c) % cmap.N), label=name)
    ax.set_xlabel("z1")
    ax.set_ylabel("z2")
    if dims == 3:
        ax.set_zlabel("z3")
    ax.set_title(title)
    ax.legend(markerscale=3, fontsize=8, loc="best")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _first(shards: str, n: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """The first ``n`` images of a shard set in manifest order, their labels and the classes."""
    from selfsup.pretrain.data.stream import ShardSet, ShardStream

    ss = ShardSet.open(shards)
    stream = ShardStream(ss, min(n, 1024), shuffle=False, drop_last=False)
    images, labels, got = [], [], 0
    for batch in stream:
        images.append(batch["images"])
        labels.append(batch["labels"])
        got += batch["images"].shape[0]
        if got >= n:
            break
    return torch.cat(images)[:n], torch.cat(labels)[:n], ss.classes


class MethodPictures(TrainHook):
    """At the end of a run: the method's picture grids and, for a 2-/3-dim code, the scatter."""

    def __init__(
        self, train_shards: str, test_shards: str = "", n: int = 8, seed: int = 0,
        scatter_points: int = 2000,
    ) -> None:
        self.train_shards, self.test_shards = train_shards, test_shards
        self.n, self.seed, self.scatter_points = n, seed, scatter_points

    def source(self) -> tuple[str, str]:
        """(shard set, its name): the test set if it can be opened, else the training set."""
        from selfsup.pretrain.data.stream import ShardError, ShardSet

        if self.test_shards:
            try:
                ShardSet.open(self.test_shards)
                return self.test_shards, "test"
            except ShardError as e:
                print(f"pictures: data.test unusable ({e}); using the training images", flush=True)
        return self.train_shards, "training"

    def on_end(self, ctx: HookContext) -> None:
        method = ctx.method
        declared = type(method).pictures is not Method.pictures or type(method).latent is not Method.latent
        if not (ctx.is_main and declared):  # the defaults draw nothing: no need to read images
            return
        was_training = method.training
        method.train(False)
        try:
            self._draw(ctx)
        finally:
            method.train(was_training)

    def _draw(self, ctx: HookContext) -> None:
        method = ctx.method
        shards, split = self.source()
        images, _, _ = _first(shards, self.n)
        images = images.to(ctx.device)
        generator = torch.Generator(device=ctx.device).manual_seed(self.seed)
        for name, grid in method.pictures(images, generator).items():
            path = save_grid(grid, ctx.run_dir / f"{name}.png")
            ctx.log.image(name, path, ctx.step)
        code = method.latent(images[:2])
        if code is None or code.shape[1] not in (2, 3):
            return
        images, labels, classes = _first(shards, self.scatter_points)
        codes = torch.cat([method.latent(images[i : i + 256].to(ctx.device)).float().cpu()
                           for i in range(0, images.shape[0], 256)])  # fmt: skip
        title = f"{ctx.method.name}: {code.shape[1]}-dim codes of {len(codes)} {split} images"
        path = save_latent_scatter(codes.numpy(), labels.numpy(), classes,
                                   ctx.run_dir / LATENT_SCATTER_FILE, title)  # fmt: skip
        ctx.log.image("latent_scatter", path, ctx.step)
