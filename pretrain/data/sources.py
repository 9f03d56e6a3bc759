"""One entry point to every data source, by the name ``selfsup shards --source`` takes."""

from __future__ import annotations

from selfsup.pretrain.data.datasets import (
    FASHION_MNIST_DEBIAN_DIR,
    ArraySource,
    DatasetError,
    cifar,
    embedded,
    fashion_mnist,
    shapes,
)
from selfsup.pretrain.data.folders import ImageFiles, image_folder, image_list

SOURCES = ("embedded", "fashion-mnist", "cifar", "folder", "list", "shapes")


def open_source(
    kind: str,
    *,
    path: str | None = None,
    split: str = "train",
    size: int = 64,
    mode: str = "RGB",
    count: int = 10000,
    seed: int = 0,
    labels: str = "auto",
    keep_depth: bool = False,
) -> ArraySource | ImageFiles:
    """Open one of ``SOURCES`` by name (what ``selfsup shards --source`` takes); ``folder`` and
    ``list`` return a ``folders.ImageFiles`` (``labels``: auto | folders | none)."""
    if kind == "embedded":
        return embedded(split)
    if kind == "fashion-mnist":
        return fashion_mnist(path or FASHION_MNIST_DEBIAN_DIR, split)
    if kind == "cifar":
        if not path:
            raise DatasetError("--source cifar needs --path to the CIFAR python batch folder")
        return cifar(path, split)
    if kind in ("folder", "list"):
        if not path:
            what = "a folder of images (root/<class>/<image> for labels)" if kind == "folder" else "a list file"
            raise DatasetError(f"--source {kind} needs --path to {what}")
        if kind == "folder":
            return image_folder(path, labels=labels, size=size, mode=mode, keep_depth=keep_depth)
        src = image_list(path, size=size, mode=mode, labels=labels)
        src.keep_depth = keep_depth
        return src
    if kind == "shapes":
        return shapes(count, size=size, seed=seed + (0 if split == "train" else 1_000_003), name=f"shapes-{split}")
    raise DatasetError(f"unknown source {kind!r}; choose one of {', '.join(SOURCES)}")
