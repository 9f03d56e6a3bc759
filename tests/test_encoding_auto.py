"""``--encoding auto``: the rule in docs/data.md picks the encoding from the image shape, the
manifest records it, every encoding decodes to the same shapes, and an old manifest still reads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from selfsup.pretrain.data.datasets import ArraySource
from selfsup.pretrain.data.shards import (
    AUTO_RAW_MAX_PIXELS,
    MANIFEST,
    ShardOptions,
    auto_encoding,
    write_shards,
)
from selfsup.pretrain.data.stream import ShardSet, load_arrays


def _source(n: int, size: int, channels: int, seed: int = 0) -> ArraySource:
    rng = np.random.default_rng(seed)
    # smooth images (a gradient plus mild noise) so JPEG stays close to the source
    ramp = np.linspace(0, 200, size)[None, :, None, None] + np.linspace(0, 40, size)[None, None, :, None]
    noise = rng.integers(0, 16, (n, size, size, channels))
    images = np.clip(ramp + noise, 0, 255).astype(np.uint8)
    return ArraySource("toy", images, rng.integers(0, 3, n), ["a", "b", "c"])


def _write(tmp: Path, src: ArraySource, encoding: str = "auto") -> ShardSet:
    opts = ShardOptions(progress=False, samples_per_shard=4, encoding=encoding)
    write_shards(iter(src), tmp, src.classes, opts)
    return ShardSet.open(tmp)


@pytest.mark.parametrize(("size", "channels", "expect"), [(28, 1, "raw"), (32, 3, "raw"), (224, 3, "jpeg"), (96, 1, "png")])
def test_auto_picks_the_documented_rule_and_records_it(tmp_path: Path, size: int, channels: int, expect: str) -> None:
    ss = _write(tmp_path, _source(6, size, channels))
    m = json.loads((tmp_path / MANIFEST).read_text())
    assert m["encoding"] == expect and m["encoding_requested"] == "auto"
    assert m["extension"] == {"raw": "u8", "png": "png", "jpeg": "jpg"}[expect]
    assert (size * size <= AUTO_RAW_MAX_PIXELS) == (expect == "raw")
    assert ss.manifest["encoding"] == expect
    # the rule itself, independent of the writer: the threshold is inclusive and is about pixels
    side = int(AUTO_RAW_MAX_PIXELS**0.5)
    assert auto_encoding(side, side, 3) == "raw" and auto_encoding(side + 1, side, 3) == "jpeg"


def test_encodings_decode_to_same_shapes_png_raw_exact(tmp_path: Path) -> None:
    src = _source(9, 40, 3)
    out = {}
    for enc in ("raw", "png", "jpeg"):
        images, labels, keys = load_arrays(_write(tmp_path / enc, src, enc))
        out[enc] = images.permute(0, 2, 3, 1).numpy()
        assert out[enc].shape == src.images.shape and np.array_equal(labels.numpy(), src.labels)
    assert np.array_equal(out["raw"], src.images) and np.array_equal(out["png"], src.images)
    err = np.abs(out["jpeg"].astype(int) - src.images.astype(int))
    assert 0 < err.mean() < 6  # lossy, but close: a broken decode (wrong mode/transposed) is far off


def test_grey_png_and_rgb_jpeg_skip_convert_but_keep_mode(tmp_path: Path) -> None:
    for ch, enc in ((1, "png"), (3, "jpeg"), (3, "png")):
        src = _source(5, 20, ch)
        images, _, _ = load_arrays(_write(tmp_path / f"{ch}{enc}", src, enc))
        assert tuple(images.shape[1:]) == (ch, 20, 20)


def test_old_manifest_without_the_new_field_reads(tmp_path: Path) -> None:
    src = _source(6, 16, 3)
    _write(tmp_path, src, "raw")
    m = json.loads((tmp_path / MANIFEST).read_text())
    del m["encoding_requested"]
    (tmp_path / MANIFEST).write_text(json.dumps(m, indent=1))
    images, _, _ = load_arrays(ShardSet.open(tmp_path))
    assert np.array_equal(images.permute(0, 2, 3, 1).numpy(), src.images)
