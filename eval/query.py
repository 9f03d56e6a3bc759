"""One image against the saved retrieval index: its nearest training items, printed and drawn.

The index (``eval/index/`` of a run) stores the hash of the weights it was built from, so a query
with other weights is an error instead of silently wrong neighbours.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from selfsup.eval.features import extract_features, weights_hash
from selfsup.eval.knn import load_index, search
from selfsup.eval.plots import plot_neighbours
from selfsup.eval.run import EvalError, load_model, resolve_checkpoint


def read_image(path: str | Path, channels: int, size: int) -> torch.Tensor:
    """An image file as uint8 ``[1, C, size, size]`` (converted to L or RGB, resized)."""
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    try:
        img = Image.open(p)
        img = img.convert("L" if channels == 1 else "RGB")
    except FileNotFoundError as e:
        raise EvalError(f"query image not found: {p}") from e
    except (UnidentifiedImageError, OSError) as e:
        raise EvalError(f"query image {p} cannot be read as an image ({e})") from e
    if img.size != (size, size):
        img = img.resize((size, size), Image.BILINEAR)
    a = np.array(img, dtype=np.uint8)
    a = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(a))[None]


def query(
    index_dir: str | Path, image: str | Path, topk: int = 8, checkpoint: str | Path | None = None,
    out_png: str | Path | None = None,
) -> list[dict[str, Any]]:
    """Nearest training items of one image, from the saved index; writes a PNG grid."""
    index, labels, keys, meta = load_index(index_dir)
    backbone = load_model(resolve_checkpoint(checkpoint or meta["checkpoint"]))
    if weights_hash(backbone) != meta["weights_hash"]:
        raise EvalError(
            f"the index in {index_dir} was built from other weights than {checkpoint or meta['checkpoint']} "
            "(re-run 'selfsup eval' with the retrieval protocol for this checkpoint)"
        )
    info = backbone.data_info
    x = read_image(image, info.channels, info.image_size)
    f = extract_features(backbone, x, info.mean, info.std)
    sims, ids = search(index, f, topk)
    classes = meta.get("classes", [])
    rows = [{"rank": r + 1, "similarity": float(s), "key": keys[i], "label": int(labels[i]),
             "class": classes[labels[i]] if labels[i] < len(classes) else str(labels[i])}
            for r, (s, i) in enumerate(zip(sims[0], ids[0], strict=True)) if i >= 0]
    if out_png is not None:
        from selfsup.pretrain.data.stream import ShardSet, load_arrays

        db_images, _, _ = load_arrays(ShardSet.open(meta["train_shards"]))
        plot_neighbours(x[0], [db_images[ids[0][r["rank"] - 1]] for r in rows],
                        [f"{r['class']}\n{r['similarity']:.2f}" for r in rows], out_png)
    return rows
