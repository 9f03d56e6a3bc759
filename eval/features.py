"""Frozen feature extraction: the one place every evaluation protocol gets its vectors from.

Evaluation must measure the representation, not perturb it, so the backbone runs in eval mode
under ``torch.inference_mode`` (BatchNorm uses and keeps its running statistics) and every
module's previous train/eval flag is restored afterwards — the training loop calls this in the
middle of pretraining. The only preprocessing is an optional resize to the backbone's input size and
the shared ``(x/255 - mean)/std`` normalisation; no augmentation.

With ``distributed=True`` under a process group the rows are split across ranks and gathered back
(every rank receives the full matrix; rank 0 is the one that evaluates). Features can be cached on disk under a key made
from the weights' hash and the images' hash, so re-running a report does not re-extract.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from selfsup.augment.views import normalize


def _check_batch(x: torch.Tensor, mean: Sequence[float]) -> None:
    if x.dtype not in (torch.uint8, torch.int32):  # int32: 16-bit pixels (augment/pixels.py)
        raise TypeError(f"images must be uint8 (or int32 for 16-bit) [B, C, H, W], got dtype {x.dtype}")
    if x.ndim != 4:
        raise ValueError(f"images must be [B, C, H, W], got shape {tuple(x.shape)}")
    if x.shape[1] != len(mean):
        raise ValueError(
            f"channel mismatch: images have {x.shape[1]} channels but the backbone's "
            f"normalisation has {len(mean)} (mean={list(mean)})"
        )


def _preprocess(
    x: torch.Tensor, mean: Sequence[float], std: Sequence[float], image_size: int | None
) -> torch.Tensor:
    out = normalize(x, mean, std)
    if image_size is not None and tuple(out.shape[-2:]) != (image_size, image_size):
        out = F.interpolate(
            out, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=True
        )
    return out


class _FrozenEval:
    """Context: every module in eval mode inside, each module's own flag restored on exit."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.modes: list[tuple[nn.Module, bool]] = []

    def __enter__(self) -> nn.Module:
        self.modes = [(m, m.training) for m in self.module.modules()]
        self.module.eval()
        return self.module

    def __exit__(self, *exc: object) -> None:
        for m, mode in self.modes:
            m.training = mode


def _device_of(backbone: nn.Module, device: torch.device | str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    p = next(backbone.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def extract_features_from(
    backbone: nn.Module,
    batches: Iterable[torch.Tensor],
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device | str | None = None,
    image_size: int | None = None,
) -> torch.Tensor:
    """Features for an iterable of uint8 batches (a loader, for sets too large to hold twice).

    ``image_size`` (default: ``backbone.data_info.image_size`` when present) is the side the
    batches are resized to when they differ. Returns float32 ``[N, D]`` on the CPU.
    """
    dev = _device_of(backbone, device)
    info = getattr(backbone, "data_info", None)  # a Backbone's, set when loaded from a run
    if image_size is None and info is not None:
        image_size = int(info.image_size)
    chunks: list[torch.Tensor] = []
    with _FrozenEval(backbone), torch.inference_mode():
        for x in batches:
            _check_batch(x, mean)
            feats = backbone(_preprocess(x.to(dev, non_blocking=True), mean, std, image_size))
            if feats.ndim != 2:
                raise ValueError(
                    f"backbone returned shape {tuple(feats.shape)}; expected pooled [B, D]"
                )
            chunks.append(feats.float().cpu())
    if not chunks:
        raise ValueError("no images to extract features from (empty input)")
    return torch.cat(chunks)


def _is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _gather_rows(local: torch.Tensor, device: torch.device) -> torch.Tensor:
    """All-gather uneven row blocks in rank order (padded to equal length for the collective)."""
    world = dist.get_world_size()
    on = local.to(device)
    n = torch.tensor([on.shape[0]], device=device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    counts = [int(s.item()) for s in sizes]
    pad = max(counts)
    padded = torch.zeros((pad, on.shape[1]), dtype=on.dtype, device=device)
    padded[: on.shape[0]] = on
    out = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(out, padded)
    return torch.cat([o[:c] for o, c in zip(out, counts, strict=True)]).cpu()


def extract_features(
    backbone: nn.Module,
    images_uint8: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int = 512,
    device: torch.device | str | None = None,
    image_size: int | None = None,
    distributed: bool = False,
) -> torch.Tensor:
    """Frozen features ``float32 [N, D]`` (CPU) of a uint8 image tensor ``[N, C, H, W]``.

    ``distributed=True`` splits the rows across the ranks of the initialised process group and
    all-gathers them, so EVERY rank must call it (with the same images); the default extracts on
    the calling process only, which is what a rank-0-only evaluation needs (no collective, no
    hang). The backbone's train/eval flags and buffers are left as found.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be > 0, got {batch_size}")
    _check_batch(images_uint8, mean)
    use_dist = distributed and _is_distributed()
    rows = images_uint8
    if use_dist:
        rank, world = dist.get_rank(), dist.get_world_size()
        rows = torch.tensor_split(images_uint8, world)[rank]
    dev = _device_of(backbone, device)
    batches = (rows[i : i + batch_size] for i in range(0, rows.shape[0], batch_size))
    if rows.shape[0] == 0:
        with torch.inference_mode(), _FrozenEval(backbone):
            dim = backbone(_preprocess(images_uint8[:1].to(dev), mean, std, image_size)).shape[1]
        local = torch.zeros((0, dim))
    else:
        local = extract_features_from(backbone, batches, mean, std, dev, image_size)
    if not use_dist:
        return local
    gather_dev = dev if dist.get_backend() == "nccl" else torch.device("cpu")
    return _gather_rows(local, gather_dev)


def weights_hash(module: nn.Module) -> str:
    """Hash of a module's parameters and buffers: identifies *these* weights, wherever loaded."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def array_hash(x: torch.Tensor | np.ndarray) -> str:
    """Hash of an array's shape, dtype and bytes (identifies an image set for the cache)."""
    a = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{a.shape}{a.dtype}".encode())
    h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def cached_features(
    cache_dir: str | Path | None,
    backbone: nn.Module,
    images_uint8: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int = 512,
    device: torch.device | str | None = None,
    image_size: int | None = None,
) -> torch.Tensor:
    """``extract_features`` with an on-disk cache keyed by (weights hash, images hash, preprocessing).

    ``cache_dir=None`` disables caching. Writes are atomic (temp file + rename), so an interrupted
    run never leaves a truncated cache entry behind.
    """
    if cache_dir is None:
        return extract_features(backbone, images_uint8, mean, std, batch_size, device, image_size)
    key = hashlib.blake2b(
        "|".join(
            [weights_hash(backbone), array_hash(images_uint8), repr(list(mean)),
             repr(list(std)), repr(image_size)]
        ).encode(),
        digest_size=16,
    ).hexdigest()
    path = Path(cache_dir) / f"features-{key}.npy"
    if path.is_file():
        return torch.from_numpy(np.load(path))
    feats = extract_features(backbone, images_uint8, mean, std, batch_size, device, image_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}.npy")
    np.save(tmp, feats.numpy())
    os.replace(tmp, path)
    return feats
