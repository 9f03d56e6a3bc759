"""Write a dataset once into WebDataset tar shards plus a ``manifest.json``.

Each sample is ``<key>.<ext>`` (the image: ``u8`` raw bytes, ``png`` or ``jpg``) and ``<key>.cls``
(the integer label as text; absent in an unlabelled set, whose manifest says ``"labelled": false``
and lists no classes), plus ``<key>.factors.json`` when the set carries generating factors (format:
``selfsup.pretrain.data.factors``). The manifest records everything a reader must verify before trusting the
set: per-shard sample counts and sha256, total, classes, image shape, encoding, split, and
per-channel mean/std (used for normalisation) with the exact integer pixel sums behind them.
Output is byte-for-byte deterministic for the same input, seed and options (fixed tar mtime,
seeded sample order).
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from selfsup.pretrain.data.datasets import Sample
from selfsup.pretrain.data.factors import (
    FACTORS_EXT,
    FactorError,
    FactorSpec,
    check_specs,
    encode_factors,
)
from selfsup.pretrain.data.pixel_stats import PixelSums, mean_std
from selfsup.pretrain.data.tar_writer import TarWriter

MANIFEST = "manifest.json"
FORMAT = "selfsup-shards/1"
ENCODINGS = {"raw": "u8", "png": "png", "jpeg": "jpg"}
# "auto" (the default) picks one of ENCODINGS from the image size: see ``auto_encoding``.
DEFAULT_ENCODING = "auto"
# Measured with ``benchmarks/bench_reader.py --decode-table`` (docs/data.md): below this many pixels
# raw bytes decode several times faster than PNG/JPEG and the set is small anyway (the demo and
# test sets, 28-32 px, stay raw); at and above it, RGB is stored as JPEG q95 (~5-8x fewer bytes
# than raw at 224 px, decode within the budget of one core per worker) and grey as PNG (lossless).
AUTO_RAW_MAX_PIXELS = 64 * 64


def auto_encoding(height: int, width: int, channels: int) -> str:
    """The encoding ``--encoding auto`` chooses for images of this shape (rule in docs/data.md)."""
    if height * width <= AUTO_RAW_MAX_PIXELS:
        return "raw"
    return "jpeg" if channels == 3 else "png"


class ShardWriteError(ValueError):
    """The output exists, the input is empty, or samples disagree in shape."""


@dataclass
class ShardOptions:
    name: str = "data"
    split: str = "train"
    encoding: str = DEFAULT_ENCODING
    samples_per_shard: int = 1000  # start a new shard after this many samples ...
    max_bytes: int = 0  # ... or before exceeding this many bytes (0 = no byte limit)
    jpeg_quality: int = 95
    overwrite: bool = False
    progress: bool = True
    # labels left out of the set (e.g. a "normal classes only" set for anomaly detection); the
    # manifest keeps every class name and records these under "exclude_classes"
    exclude_classes: tuple[int, ...] = ()


def encode_image(image: np.ndarray, encoding: str, jpeg_quality: int = 95) -> bytes:
    """Encode one uint8 ``[H, W, C]`` image for a shard (uint16: raw only, little-endian ``u16``)."""
    if encoding == "raw":
        return np.ascontiguousarray(image, dtype="<u2" if image.dtype == np.uint16 else None).tobytes()
    pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    buf = io.BytesIO()
    if encoding == "png":
        pil.save(buf, format="PNG", compress_level=1)
    else:
        pil.save(buf, format="JPEG", quality=jpeg_quality)
    return buf.getvalue()


def _tar_member_bytes(size: int) -> int:
    """Bytes a tar member occupies: a 512-byte header plus data padded to 512-byte blocks."""
    return 512 + -(-size // 512) * 512


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def temp_dir(out_dir: str | Path, name: str) -> Path:
    """The hidden folder ``write_shards`` writes into before moving the finished set into place."""
    return Path(out_dir) / f".writing-{name}"


def write_shards(
    samples: Iterable[Sample],
    out_dir: str | Path,
    classes: list[str],
    options: ShardOptions | None = None,
    total: int | None = None,
    source: str = "",
    extra: Callable[[], dict] | None = None,
    factors: list[FactorSpec | dict] | None = None,
) -> dict:
    """Write ``samples`` (in the given order) as shards under ``out_dir``; return the manifest.

    ``classes`` empty means an unlabelled set: every sample's label must then be -1 and no ``cls``
    member is written. ``extra`` is called after the last sample; its items go into the manifest.
    ``factors``: specs of the generating factors every sample carries in ``Sample.factors``
    (recorded in the manifest and as ``<key>.factors.json``); None writes no factors.
    Writes into a hidden temporary folder first and moves the finished shards and manifest into
    place at the end, so an interrupted write never leaves a set that looks complete.
    """
    opt = options or ShardOptions()
    if opt.encoding not in ENCODINGS and opt.encoding != "auto":
        raise ShardWriteError(f"encoding must be auto or one of {', '.join(ENCODINGS)}, got {opt.encoding!r}")
    if opt.samples_per_shard <= 0:
        raise ShardWriteError(f"samples_per_shard must be > 0, got {opt.samples_per_shard}")
    out = Path(out_dir)
    existing = sorted(out.glob(f"{opt.name}-*.tar")) + ([out / MANIFEST] if (out / MANIFEST).exists() else [])
    if existing and not opt.overwrite:
        raise ShardWriteError(
            f"{out} already holds a shard set ({existing[0].name}, ...); pass --overwrite to replace it"
        )
    out.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir(out, opt.name)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    encoding = opt.encoding  # "auto" is resolved from the first sample's shape
    ext = ENCODINGS.get(encoding, "")
    labelled = bool(classes)
    try:
        specs = check_specs(factors, "write_shards(factors=...)") if factors is not None else None
    except FactorError as e:
        raise ShardWriteError(str(e)) from e

    shards: list[dict] = []
    writer: TarWriter | None = None
    count = nbytes = 0
    shape: tuple[int, ...] | None = None
    bits = 8
    stats: PixelSums | None = None
    n_total = 0

    def close() -> None:
        nonlocal writer
        if writer is not None:
            writer.close()
            writer = None

    excluded = {int(c) for c in opt.exclude_classes}
    bar = tqdm(samples, total=total, desc=f"shards {opt.name}", unit="img", disable=not opt.progress)
    for s in bar:
        if int(s.label) in excluded:
            continue
        img = np.asarray(s.image)
        if img.dtype not in (np.uint8, np.uint16) or img.ndim != 3:
            raise ShardWriteError(f"sample {s.key}: expected uint8/uint16 [H, W, C], got {img.dtype} {img.shape}")
        if shape is None:
            shape, bits = img.shape, 8 * img.itemsize
            stats = PixelSums(shape[-1], bits)
            if encoding == "auto":  # 16-bit and C not in {1, 3} have raw only
                encoding = "raw" if bits == 16 or shape[-1] not in (1, 3) else auto_encoding(*shape)
                ext = ENCODINGS[encoding]
            if bits == 16 and encoding != "raw":
                raise ShardWriteError(f"sample {s.key}: 16-bit images need --encoding raw, not {encoding}")
            if shape[-1] not in (1, 3) and encoding != "raw":
                raise ShardWriteError(f"sample {s.key}: {shape[-1]} channels need --encoding raw, not {encoding}")
            ext = "u16" if bits == 16 else ext
        elif img.shape != shape or 8 * img.itemsize != bits:
            raise ShardWriteError(f"sample {s.key}: {img.dtype} {img.shape} differs from the first sample's "
                                  f"uint{bits} {shape} (one channel count and depth per set)")  # fmt: skip
        if (s.label >= 0) != labelled:
            raise ShardWriteError(f"sample {s.key}: label {s.label} in a set with {len(classes)} classes")
        payload = encode_image(img, encoding, opt.jpeg_quality)
        record = {"__key__": s.key, ext: payload, **({"cls": str(int(s.label))} if labelled else {})}
        if specs is not None:
            try:
                record[FACTORS_EXT] = encode_factors(s.factors, specs, s.key)
            except FactorError as e:
                raise ShardWriteError(str(e)) from e
        size = sum(_tar_member_bytes(len(v)) for k, v in record.items() if k != "__key__")
        full = count >= opt.samples_per_shard or (opt.max_bytes and count and nbytes + size > opt.max_bytes)
        if writer is None or full:
            close()
            fname = f"{opt.name}-{len(shards):06d}.tar"
            shards.append({"file": fname, "num_samples": 0})
            writer = TarWriter(tmp / fname, mtime=0, user="selfsup", group="selfsup")
            count = nbytes = 0
        writer.write(record)
        count += 1
        nbytes += size
        shards[-1]["num_samples"] = count
        stats.add(img)
        n_total += 1
    close()
    if n_total == 0:
        shutil.rmtree(tmp)
        raise ShardWriteError("the source yielded no samples: nothing to write")

    for old in existing:
        old.unlink()
    for sh in shards:
        (tmp / sh["file"]).replace(out / sh["file"])
        sh["sha256"] = _sha256(out / sh["file"])
        sh["bytes"] = (out / sh["file"]).stat().st_size
    assert shape is not None and stats is not None
    sums = stats.to_json()
    mean, std = mean_std(sums, (1 << bits) - 1)
    manifest = {
        "format": FORMAT,
        "name": opt.name,
        "split": opt.split,
        "source": source,
        "encoding": encoding,
        "encoding_requested": opt.encoding,
        "extension": ext,
        "image_size": [shape[0], shape[1]],
        "channels": shape[2],
        **({"bits": 16} if bits == 16 else {}),  # absent: 8-bit
        "classes": list(classes),
        "labelled": labelled,
        "num_samples": n_total,
        "mean": mean,
        "std": std,
        "pixel_sums": sums,
        "shards": shards,
        **(extra() if extra else {}),
    }
    if specs is not None:
        manifest["factors"] = [f.to_json() for f in specs]
    if excluded:
        manifest["exclude_classes"] = sorted(excluded)
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    (tmp / MANIFEST).replace(out / MANIFEST)
    tmp.rmdir()
    return manifest


def shuffled(source, seed: int) -> Iterable[Sample]:
    """Yield the source's samples in a seeded permutation, so that every shard mixes classes even
    when the source is ordered by class (image folders). Needs ``len`` and index access."""
    order = np.random.default_rng(seed).permutation(len(source))
    for i in order:
        yield source.sample(int(i))
