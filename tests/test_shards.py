"""Shard writing and streaming on real tar files: round trip, coverage, equal batches, resume,
determinism and every bad-input case."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from selfsup.pretrain.data.datasets import ArraySource, DatasetError, cifar, shapes
from selfsup.pretrain.data.folders import image_folder
from selfsup.pretrain.data.shards import ShardOptions, ShardWriteError, write_shards
from selfsup.pretrain.data.stream import (
    ShardError,
    ShardLoader,
    ShardSet,
    ShardStream,
    epoch_order,
    load_arrays,
    plan_epoch,
)


def _source(n: int = 230, size: int = 8, channels: int = 3, seed: int = 0) -> ArraySource:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, size, size, channels), dtype=np.uint8)
    labels = rng.integers(0, 5, n)
    return ArraySource("toy", images, labels, [f"c{i}" for i in range(5)])


def _write(tmp: Path, src: ArraySource, **kw) -> ShardSet:
    opts = ShardOptions(progress=False, **kw)
    write_shards(iter(src), tmp, src.classes, opts)
    return ShardSet.open(tmp)


@pytest.mark.parametrize("encoding", ["raw", "png"])
def test_round_trip_pixels_and_labels(tmp_path: Path, encoding: str) -> None:
    src = _source(channels=1 if encoding == "png" else 3)
    ss = _write(tmp_path, src, samples_per_shard=50, encoding=encoding)
    images, labels, keys = load_arrays(ss)
    assert np.array_equal(images.permute(0, 2, 3, 1).numpy(), src.images)
    assert np.array_equal(labels.numpy(), src.labels)
    assert keys == [f"toy-{i:08d}" for i in range(len(src))]
    m = ss.manifest
    assert [s["num_samples"] for s in m["shards"]] == [50, 50, 50, 50, 30]
    assert m["num_samples"] == 230 and m["channels"] == src.images.shape[-1]
    assert np.allclose(m["mean"], (src.images / 255.0).reshape(-1, src.images.shape[-1]).mean(0), atol=1e-5)


def test_jpeg_is_lossy_but_close(tmp_path: Path) -> None:
    src = shapes(20, size=32, seed=3)
    ss = _write(tmp_path, src, encoding="jpeg")
    images, _, _ = load_arrays(ss)
    err = np.abs(images.permute(0, 2, 3, 1).numpy().astype(int) - src.images.astype(int)).mean()
    assert 0 < err < 12


def test_shard_size_by_bytes(tmp_path: Path) -> None:
    src = _source(n=100, size=8)  # 192 bytes of pixels per sample
    ss = _write(tmp_path, src, samples_per_shard=10_000, max_bytes=20_000)
    assert len(ss.shards) > 1
    assert all(s["bytes"] <= 20_000 + 10_240 for s in ss.shards)  # + tar end-of-archive blocks
    assert sum(ss.counts) == 100


def test_output_is_deterministic(tmp_path: Path) -> None:
    src = _source()
    a = _write(tmp_path / "a", src, samples_per_shard=64)
    b = _write(tmp_path / "b", src, samples_per_shard=64)
    assert [s["sha256"] for s in a.shards] == [s["sha256"] for s in b.shards]


def test_refuses_to_overwrite_unless_told(tmp_path: Path) -> None:
    src = _source()
    _write(tmp_path, src)
    with pytest.raises(ShardWriteError, match="--overwrite"):
        _write(tmp_path, src)
    _write(tmp_path, _source(n=40), overwrite=True)
    assert ShardSet.open(tmp_path).num_samples == 40
    assert len(list(tmp_path.glob("*.tar"))) == 1


def _all_keys(ss: ShardSet, batch: int, world: int, workers: int, epoch: int, seed: int = 0) -> list[list[list[str]]]:
    per_rank = []
    for rank in range(world):
        loader = ShardLoader(ShardStream(ss, batch, rank, world, workers, seed=seed, shuffle_buffer=50))
        loader.set_epoch(epoch)
        per_rank.append([b["keys"] for b in loader])
        assert len(per_rank[-1]) == len(loader)
    return per_rank


def test_two_ranks_two_workers_exact_coverage_equal_batches(tmp_path: Path) -> None:
    # 230 samples in 7 uneven shards: nothing divides evenly by 2 ranks x 2 workers.
    ss = _write(tmp_path, _source(), samples_per_shard=33)
    per_rank = _all_keys(ss, batch=16, world=2, workers=2, epoch=0)
    assert len(per_rank[0]) == len(per_rank[1]) == (230 // 2) // 16
    flat = [k for rank in per_rank for b in rank for k in b]
    assert len(flat) == len(set(flat)) == 2 * 7 * 16  # no sample twice; only the documented drop
    assert all(len(b) == 16 for rank in per_rank for b in rank)
    # over epochs the dropped remainder changes, so every sample is eventually seen
    seen = set(flat)
    for epoch in range(1, 6):
        seen |= {k for rank in _all_keys(ss, 16, 2, 2, epoch) for b in rank for k in b}
    assert len(seen) == 230


def test_eval_mode_reads_every_sample_once(tmp_path: Path) -> None:
    ss = _write(tmp_path, _source(), samples_per_shard=33)
    keys = []
    for rank in range(3):
        stream = ShardStream(ss, 20, rank, 3, 2, shuffle=False, drop_last=False)
        loader = ShardLoader(stream)
        keys += [k for b in loader for k in b["keys"]]
    assert sorted(keys) == sorted(f"toy-{i:08d}" for i in range(230))


def test_shuffle_is_deterministic_per_seed_and_epoch(tmp_path: Path) -> None:
    ss = _write(tmp_path, _source(), samples_per_shard=33)
    a = _all_keys(ss, 16, 2, 2, epoch=1, seed=5)
    assert a == _all_keys(ss, 16, 2, 2, epoch=1, seed=5)
    assert a != _all_keys(ss, 16, 2, 2, epoch=2, seed=5)
    assert a != _all_keys(ss, 16, 2, 2, epoch=1, seed=6)


def _reference_shuffle(items: list, rng: np.random.Generator, size: int, overdraw: bool = False) -> list:
    """The shuffle buffer with one ``rng.integers`` call per item (the stream's draws, written out);
    ``overdraw``: a planted variant that draws a whole block ahead, past the items it needs."""
    buf, out = [], []
    ahead = rng.integers(size, size=1024).tolist() if overdraw else []
    for s in items:
        if len(buf) < size:
            buf.append(s)
            continue
        j = ahead.pop(0) if ahead else int(rng.integers(size))
        buf[j], s = s, buf[j]
        out.append(s)
    rng.shuffle(buf)
    return out + buf


@pytest.mark.parametrize("buffer", [7, 40, 229, 230, 1000])
def test_shuffle_buffer_order_is_one_draw_per_sample(tmp_path: Path, buffer: int) -> None:
    # the stream draws the buffer's swaps in blocks; the order it delivers is the one single draws
    # give (an independent, written-out buffer over the plan's sample sequence), for buffers smaller
    # than, equal to and larger than the epoch; the planted over-drawing variant differs
    ss = _write(tmp_path, _source(230), samples_per_shard=33)
    stream = ShardStream(ss, 5, seed=3, shuffle_buffer=buffer, drop_last=False)
    stream.epoch = 2
    keys = [k for b in ShardLoader(stream) for k in b["keys"]]
    (plan,), _ = stream.plan()
    seq = []  # the samples in the order the plan reads them, keys listed by stdlib tarfile
    for shard, lo, hi in plan.segments:
        with tarfile.open(ss.urls[shard]) as tf:
            names = list(dict.fromkeys(m.name.split(".")[0] for m in tf.getmembers()))
        seq += names[lo:hi]
    assert len(seq) == 230 and keys == _reference_shuffle(seq, stream.sample_rng(0), buffer)
    if buffer < 230:
        assert keys != _reference_shuffle(seq, stream.sample_rng(0), buffer, overdraw=True)


@pytest.mark.parametrize("workers", [0, 2, 3])
def test_resume_mid_epoch_continues_exactly(tmp_path: Path, workers: int) -> None:
    ss = _write(tmp_path, _source(), samples_per_shard=33)
    loader = ShardLoader(ShardStream(ss, 8, 1, 2, workers, seed=2, shuffle_buffer=40))
    loader.set_epoch(4)
    full = [b["keys"] for b in loader]
    for k in (1, 5, len(full) - 1):
        loader.set_epoch(4, start_batch=k)
        assert [b["keys"] for b in loader] == full[k:]


def test_plan_covers_rank_slice_without_overlap() -> None:
    counts = [33, 33, 33, 33, 33, 33, 32]
    plans, n = plan_epoch(counts, 16, rank=1, world=2, workers=3, seed=0, epoch=0)
    covered = [(s, i) for p in plans for s, lo, hi in p.segments for i in range(lo, hi)]
    assert len(covered) == len(set(covered)) == n * 16
    assert sum(len(p.batch_sizes) for p in plans) == n


@pytest.mark.parametrize("encoding", ["png", "jpeg"])
def test_large_rgb_decodes_plane_by_plane_into_the_batch_as_pil_does(tmp_path: Path, encoding: str) -> None:
    """From BANDS_FROM_PIXELS, RGB samples are unpacked plane by plane straight into their batch
    slot; the pixels are PIL's own decode of the same bytes, also in padded batches."""
    side = 128
    src = _source(n=40, size=side)
    ss = _write(tmp_path, src, samples_per_shard=16, encoding=encoding)
    assert ss.planar and not _write(tmp_path / "small", _source(n=4), encoding=encoding).planar
    ref = {}
    for url in ss.urls:
        with tarfile.open(url) as tar:
            for m in tar.getmembers():
                if m.name.endswith(ss.extension):
                    with Image.open(tar.extractfile(m)) as im:
                        ref[m.name.rsplit(".", 1)[0]] = np.asarray(im.convert("RGB")).transpose(2, 0, 1)
    if encoding == "png":  # lossless: also the source pixels
        assert all(np.array_equal(ref[k], src.images[i].transpose(2, 0, 1)) for i, k in enumerate(sorted(ref)))
    raw = Path(ss.urls[1]).read_bytes()  # one undecodable sample: its batch is padded from the pool
    magic = b"\x89PNG" if encoding == "png" else b"\xff\xd8\xff"  # the first sample's signature
    Path(ss.urls[1]).write_bytes(raw.replace(magic, b"X" * len(magic), 1))
    loader = ShardLoader(ShardStream(ss, 8, workers=0, seed=0, max_corrupt_fraction=0.5))
    loader.set_epoch(0)
    seen = 0
    for b in loader:
        assert b["images"].is_contiguous() and b["images"].shape[1:] == (3, side, side)
        for img, key in zip(b["images"].numpy(), b["keys"], strict=True):
            assert np.array_equal(img, ref[key]), key
            seen += 1
    assert seen == 40 and loader.padded >= 1


@pytest.mark.parametrize("drop_last", [True, False])
def test_plan_equals_slicing_the_flat_epoch_sequence(drop_last: bool) -> None:
    """Independent computation: the epoch's samples as one flat list (shards in epoch order),
    the rank's contiguous slice of it, cut into the workers' contiguous runs of batches."""
    rng = np.random.default_rng(5)
    counts = [int(c) for c in rng.integers(0, 40, 300)]  # empty shards included
    counts[7] = 0
    world, workers, batch = 3, 4, 16
    order = epoch_order(len(counts), 11, 2)
    flat = [(int(s), i) for s in order for i in range(counts[s])]
    for rank in range(world):
        plans, n = plan_epoch(counts, batch, rank, world, workers, seed=11, epoch=2, drop_last=drop_last)
        if drop_last:
            per_rank = len(flat) // world
            start = rank * per_rank
        else:
            base, extra = divmod(len(flat), world)
            start, per_rank = rank * base + min(rank, extra), base + (rank < extra)
        mine = flat[start : start + per_rank]
        got = [(s, i) for p in plans for s, lo, hi in p.segments for i in range(lo, hi)]
        assert got == mine[: len(got)] and len(got) == sum(sum(p.batch_sizes) for p in plans)
        assert len(got) == (n * batch if drop_last else per_rank)
        for p in plans:  # segments never name an empty range
            assert all(lo < hi for _, lo, hi in p.segments)


def test_missing_and_empty_and_mismatch_errors(tmp_path: Path) -> None:
    with pytest.raises(ShardError, match="not found"):
        ShardSet.open(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ShardError, match=r"no manifest\.json"):
        ShardSet.open(tmp_path / "empty")
    ss = _write(tmp_path / "set", _source(), samples_per_shard=100)
    mpath = tmp_path / "set" / "manifest.json"
    m = json.loads(mpath.read_text())
    m["num_samples"] = 999
    mpath.write_text(json.dumps(m))
    with pytest.raises(ShardError, match="total says 999"):
        ShardSet.open(ss.base)
    m["num_samples"] = 230
    mpath.write_text(json.dumps(m))
    Path(ss.urls[1]).unlink()
    with pytest.raises(ShardError, match="missing.*000001.tar"):
        ShardSet.open(ss.base)


def test_truncated_shard_is_detected_then_counted_and_padded(tmp_path: Path) -> None:
    ss = _write(tmp_path, _source(n=200), samples_per_shard=100)
    path = Path(ss.urls[0])
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ShardError, match="truncated or replaced"):
        ShardSet.open(tmp_path)
    # a reader that cannot stat (e.g. a URL) still copes: skip, count, pad, keep batch counts
    ss.shards[0].pop("bytes")
    stream = ShardStream(ss, 10, shuffle=False, max_corrupt_fraction=0.6)
    loader = ShardLoader(stream)
    batches = list(loader)
    assert len(batches) == 20 and all(len(b["keys"]) == 10 for b in batches)
    assert 40 <= loader.corrupt <= 60 and loader.padded == loader.corrupt
    stream.max_corrupt_fraction = 0.1
    with pytest.raises(ShardError, match="unreadable"):
        list(ShardLoader(stream))


def test_undecodable_image_is_skipped_and_counted(tmp_path: Path) -> None:
    import webdataset as wds

    src = shapes(30, size=16)
    ss = _write(tmp_path, src, encoding="png")
    # rewrite the shard with one broken PNG, keeping the manifest's counts
    path = Path(ss.urls[0])
    samples = list(wds.tariterators.tarfile_samples([{"url": str(path)}]))
    samples[3]["png"] = b"not a png"
    with wds.TarWriter(str(path)) as w:
        for s in samples:
            w.write({k: v for k, v in s.items() if k in ("__key__", "png", "cls")})
    ss.shards[0].pop("bytes")
    loader = ShardLoader(ShardStream(ss, 10, shuffle=False, max_corrupt_fraction=0.1))
    batches = list(loader)
    keys = [k for b in batches for k in b["keys"]]
    assert len(batches) == 3 and loader.corrupt == 1 and loader.padded == 1
    assert "shapes-00000003" not in keys


def test_sources_bad_input(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="not found"):
        image_folder(tmp_path / "missing")
    (tmp_path / "flat").mkdir()
    with pytest.raises(DatasetError, match="no images"):
        image_folder(tmp_path / "flat")
    from PIL import Image

    Image.new("RGB", (4, 4)).save(tmp_path / "flat" / "a.png")
    with pytest.raises(DatasetError, match="no class sub-folders"):
        image_folder(tmp_path / "flat", labels="folders")
    with pytest.raises(DatasetError, match="neither batches.meta"):
        cifar(tmp_path)


def test_image_folder_and_cifar_layouts(tmp_path: Path) -> None:
    import pickle

    from PIL import Image

    rng = np.random.default_rng(0)
    for cls, (w, h) in (("cat", (40, 30)), ("dog", (20, 50))):
        (tmp_path / "img" / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(tmp_path / "img" / cls / f"{i}.png")
    folder = image_folder(tmp_path / "img", size=16)
    samples = list(folder)
    assert folder.classes == ["cat", "dog"] and len(samples) == 6
    assert all(s.image.shape == (16, 16, 3) for s in samples) and [s.label for s in samples] == [0] * 3 + [1] * 3

    c10 = tmp_path / "c10"
    c10.mkdir()
    data = rng.integers(0, 255, (4, 3072), dtype=np.uint8)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (c10 / name).write_bytes(pickle.dumps({"data": data, "labels": [0, 1, 2, 1]}))
    (c10 / "batches.meta").write_bytes(pickle.dumps({"label_names": ["a", "b", "c"]}))
    train = cifar(c10, "train")
    assert train.images.shape == (20, 32, 32, 3) and train.classes == ["a", "b", "c"]
    assert np.array_equal(train.images[0], data[0].reshape(3, 32, 32).transpose(1, 2, 0))


def test_shapes_reproducible_and_varied() -> None:
    a, b = shapes(50, size=24, seed=7), shapes(50, size=24, seed=7)
    assert np.array_equal(a.images, b.images) and np.array_equal(a.labels, b.labels)
    assert not np.array_equal(a.images, shapes(50, size=24, seed=8).images)
    assert len(set(a.labels.tolist())) > 3


def test_cli_help_and_errors(tmp_path: Path) -> None:
    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "selfsup.launch.cli", *args], capture_output=True, text=True)

    assert "examples:" in cli("shards", "--help").stdout
    r = cli("shards", "--source", "folder", "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "needs --path" in r.stdout
    r = cli("shards", "--source", "shapes", "--count", "40", "--size", "16", "--out", str(tmp_path / "s"), "--quiet")
    assert r.returncode == 0, r.stdout + r.stderr
    assert cli("shards", "--verify", str(tmp_path / "s")).returncode == 0
    r = cli("shards", "--source", "shapes", "--count", "40", "--out", str(tmp_path / "s"), "--quiet")
    assert r.returncode == 2 and "--overwrite" in r.stdout
