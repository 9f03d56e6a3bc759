"""Generating factors in shard sets: the shapes source records them without changing its images,
they round-trip through real tar shards, and every malformed case is an error naming the sample
or the missing field."""

from __future__ import annotations

import colorsys
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from selfsup.pretrain.data.datasets import SHAPE_FACTORS, SHAPES, ArraySource, Sample, shapes
from selfsup.pretrain.data.factors import (
    FactorError,
    FactorSpec,
    factor_specs,
    load_factors,
)
from selfsup.pretrain.data.shards import ShardOptions, ShardWriteError, write_shards
from selfsup.pretrain.data.stream import ShardSet, load_arrays


def load_arrays_with_factors(shardset: ShardSet) -> tuple:
    """Images, labels, keys and factors of a set, checked to be in the same sample order."""
    values, fkeys = load_factors(shardset)
    images, labels, keys = load_arrays(shardset)
    if fkeys != keys:
        raise FactorError(f"{shardset.base}: factors and images are not in the same sample order")
    return images, labels, keys, values


# sha256 of shapes(...).images computed on main before factors were recorded (commit 00baa13)
SHAPES_SHA256 = {
    (50, 24, 7): "71fd0388df317d9725873293d295ca797d815271af2d2b10939697d782d4e679",
    (64, 32, 0): "097e06d5987c008ec049a6e152ef79c5964fa341cb661ed849aed23a258f672c",
}
SPECS = [FactorSpec("kind", "discrete", ("a", "b", "c")), FactorSpec("pos", "continuous", low=0, high=1)]


def test_shapes_images_are_the_bytes_they_were_before_factors() -> None:
    for (n, size, seed), digest in SHAPES_SHA256.items():
        assert hashlib.sha256(shapes(n, size=size, seed=seed).images.tobytes()).hexdigest() == digest


def test_shapes_factors_describe_the_drawn_images() -> None:
    src = shapes(400, size=32, seed=3)
    f = src.factors
    names = [s.name for s in src.factor_specs]
    assert names == ["shape", "hue", "x", "y", "scale", "rotation", "background", "frequency"]
    assert np.array_equal(f[:, 0], src.labels)
    for j, s in enumerate(SHAPE_FACTORS):  # inside the documented ranges, and spread over them
        if s.discrete:
            assert set(np.unique(f[:, j])) == set(range(len(s.values)))
        else:
            assert s.low <= f[:, j].min() and f[:, j].max() <= s.high
            assert f[:, j].max() - f[:, j].min() > 0.8 * (s.high - s.low)
    # the recorded position and hue are those of the pixels: the shape's colour sits at (x, y)
    # (circles only: every circle covers its centre), and has the recorded hue
    img, fac = src.images, f
    for i in np.flatnonzero(fac[:, 0] == SHAPES.index("circle"))[:20]:
        px = img[i, int(fac[i, 3] * 32), int(fac[i, 2] * 32)] / 255.0
        hue = colorsys.rgb_to_hsv(*px)[0]
        assert min(abs(hue - fac[i, 1]), 1 - abs(hue - fac[i, 1])) < 0.06, (i, hue, fac[i, 1])


def test_shapes_shards_carry_factors_and_load_back_equal(tmp_path: Path) -> None:
    out = tmp_path / "train"
    r = subprocess.run([sys.executable, "-m", "selfsup.launch.cli", "shards", "--source", "shapes",
                        "--count", "250", "--size", "16", "--per-shard", "100", "--out", str(out),
                        "--quiet"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    ss = ShardSet.open(out)
    assert [(s.name, s.kind) for s in factor_specs(ss.manifest)] == [(s.name, s.kind) for s in SHAPE_FACTORS]
    assert ss.manifest["factors"][0]["values"] == SHAPES
    images, labels, keys, factors = load_arrays_with_factors(ss)
    src = shapes(250, size=16, seed=0, name="shapes-train")
    idx = [int(k.rsplit("-", 1)[1]) for k in keys]  # the shards hold a seeded shuffle
    assert sorted(idx) == list(range(250)) and idx != sorted(idx)
    assert factors.shape == (250, 8) and factors.dtype == np.float64
    assert np.array_equal(factors, src.factors[idx])  # exact: JSON keeps every float64 bit
    assert np.array_equal(images.permute(0, 2, 3, 1).numpy(), src.images[idx])
    assert np.array_equal(labels.numpy(), src.labels[idx])
    again, fkeys = load_factors(ss)
    assert fkeys == keys and np.array_equal(again, factors)


def _toy(n: int = 12, factors=None) -> ArraySource:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 4, 4, 1), dtype=np.uint8)
    if factors is None:
        factors = np.stack([rng.integers(0, 3, n), rng.uniform(0, 1, n)], 1)
    return ArraySource("toy", images, np.zeros(n, np.int64), ["x"], factors, SPECS)


def test_user_factors_round_trip_and_wrong_ones_name_the_sample(tmp_path: Path) -> None:
    src = _toy()
    write_shards(iter(src), tmp_path / "ok", src.classes, ShardOptions(progress=False), factors=SPECS)
    values, keys = load_factors(ShardSet.open(tmp_path / "ok"))
    assert keys == [f"toy-{i:08d}" for i in range(12)] and np.array_equal(values, src.factors)

    def write(samples, name, specs=SPECS):
        write_shards(iter(samples), tmp_path / name, ["x"], ShardOptions(progress=False), factors=specs)

    good = list(src)
    bad = [*good[:5], Sample(good[5].image, 0, "short-one", np.array([1.0])), *good[6:]]
    with pytest.raises(ShardWriteError, match=r"sample 'short-one': 1 factor value\(s\), the set declares 2"):
        write(bad, "short")
    bad = [*good[:3], Sample(good[3].image, 0, "texty", ["b", 0.5])]
    with pytest.raises(ShardWriteError, match=r"sample 'texty': factor 'kind' must be a finite number"):
        write(bad, "text")
    bad = [Sample(good[0].image, 0, "half", [1.5, 0.5])]
    with pytest.raises(ShardWriteError, match=r"sample 'half': discrete factor 'kind' must be an integer"):
        write(bad, "half")
    bad = [Sample(good[0].image, 0, "big", [3, 0.5])]
    with pytest.raises(ShardWriteError, match=r"sample 'big': factor 'kind' = 3 is outside its 3 values"):
        write(bad, "big")
    bad = [Sample(good[0].image, 0, "none-here")]
    with pytest.raises(ShardWriteError, match=r"sample 'none-here': no factors"):
        write(bad, "none")
    bad = [Sample(good[0].image, 0, "nan", [1, float("nan")])]
    with pytest.raises(ShardWriteError, match=r"sample 'nan': factor 'pos' must be a finite number"):
        write(bad, "nan")
    with pytest.raises(ShardWriteError, match=r"duplicate factor name"):
        write(good, "dup", [SPECS[0], SPECS[0]])
    with pytest.raises(ShardWriteError, match=r"'kind' 'ordinal'"):
        write(good, "kind", [{"name": "k", "kind": "ordinal"}])


def _hand_made_set(root: Path, payloads: list[bytes | None], manifest_factors) -> ShardSet:
    """A shard set written by hand, as a user's own tool would: one tar and a manifest."""
    root.mkdir()
    with wds.TarWriter(str(root / "data-000000.tar")) as w:
        for i, p in enumerate(payloads):
            member = {"__key__": f"img{i:03d}", "u8": bytes(16), "cls": "0"}
            if p is not None:
                member["factors.json"] = p
            w.write(member)
    manifest = {"format": "selfsup-shards/1", "encoding": "raw", "extension": "u8",
                "image_size": [4, 4], "channels": 1, "classes": ["x"], "num_samples": len(payloads),
                "shards": [{"file": "data-000000.tar", "num_samples": len(payloads)}]}
    if manifest_factors is not None:
        manifest["factors"] = manifest_factors
    (root / "manifest.json").write_text(json.dumps(manifest))
    return ShardSet.open(root)


def test_hand_made_sets_with_bad_factors_name_the_sample(tmp_path: Path) -> None:
    specs = [s.to_json() for s in SPECS]
    ok = _hand_made_set(tmp_path / "ok", [b"[0, 0.1]", b"[2, 0.9]"], specs)
    assert load_factors(ok)[0].tolist() == [[0, 0.1], [2, 0.9]]
    cases = {
        "long": ([b"[0, 0.1]", b"[1, 0.2, 7]"], r"sample 'img001': 3 factor value\(s\), the set declares 2"),
        "string": ([b'["1", 0.1]'], r"sample 'img000': factor 'kind' must be a finite number, got '1'"),
        "bool": ([b"[0, true]"], r"sample 'img000': factor 'pos' must be a finite number, got True"),
        "notjson": ([b"[0, 0.1]", b"0.1 0.2"], r"sample 'img001' in .*data-000000.tar: factors.json is not JSON"),
        "object": ([b'{"kind": 0}'], r"sample 'img000': factors must be a list of numbers"),
        "missing": ([b"[0, 0.1]", None], r"sample 'img001' in .*data-000000.tar has no factors.json member"),
    }
    for name, (payloads, message) in cases.items():
        with pytest.raises(FactorError, match=message):
            load_factors(_hand_made_set(tmp_path / name, payloads, specs))
    with pytest.raises(FactorError, match=r"manifest has no 'factors' field"):
        load_factors(_hand_made_set(tmp_path / "nofactors", [b"[0, 0.1]"], None))
    with pytest.raises(FactorError, match=r"factor 'name' must be a non-empty string"):
        load_factors(_hand_made_set(tmp_path / "badspec", [b"[0]"], [{"kind": "discrete"}]))


def test_sets_without_factors_load_as_before(tmp_path: Path) -> None:
    src = _toy()
    write_shards(iter(src), tmp_path / "plain", src.classes, ShardOptions(progress=False))
    ss = ShardSet.open(tmp_path / "plain")
    assert "factors" not in ss.manifest and len(load_arrays(ss)) == 3
    with pytest.raises(FactorError, match=r"no 'factors' field"):
        load_arrays_with_factors(ss)
