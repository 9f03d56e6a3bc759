"""The shard stream under damaged data, on real tar files: a resumed epoch is exactly the rest of
the uninterrupted one even when samples before the resume point were unreadable, the corrupt and
padded counters survive a resume, and a bad shard can be skipped by choice (``data.on_bad_shard``)
with every rank still planning the same number of batches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from faultkit import copy_set, damage_samples, truncate_shard

from selfsup.pretrain.data.datasets import ArraySource
from selfsup.pretrain.data.shards import ShardOptions, write_shards
from selfsup.pretrain.data.stream import ShardError, ShardLoader, ShardSet, ShardStream


def _set(tmp: Path, n: int = 240, per_shard: int = 60, encoding: str = "raw") -> Path:
    rng = np.random.default_rng(0)
    channels = 1 if encoding == "png" else 3
    src = ArraySource("toy", rng.integers(0, 256, (n, 8, 8, channels), dtype=np.uint8),
                      rng.integers(0, 4, n), [f"c{i}" for i in range(4)])  # fmt: skip
    write_shards(iter(src), tmp, src.classes, ShardOptions(samples_per_shard=per_shard, encoding=encoding,
                                                           progress=False))  # fmt: skip
    return tmp


def _epoch(ss: ShardSet, start: int = 0, state: dict | None = None, workers: int = 0, **kw):
    loader = ShardLoader(ShardStream(ss, 8, workers=workers, seed=3, shuffle_buffer=50,
                                     max_corrupt_fraction=0.2, **kw))  # fmt: skip
    if state is not None:
        loader.load_state_dict(state)
    loader.set_epoch(1, start)
    out, states = [], []
    for b in loader:
        out.append((b["keys"], b["images"].numpy().copy()))
        states.append(loader.state_dict())
    return out, states, loader


@pytest.mark.parametrize(("workers", "encoding"), [(0, "raw"), (2, "png")])
def test_resume_after_corrupt_samples_is_exact(tmp_path: Path, workers: int, encoding: str) -> None:
    """Two unreadable images early in the epoch (in the first batches every worker reads): the
    resumed stream must deliver exactly the batches the uninterrupted one delivered from there."""
    root = _set(tmp_path / "set", encoding=encoding)
    ss = ShardSet.open(root)
    # damage samples of the shard this epoch reads first, so they fall before every resume point
    first_shard = ShardStream(ss, 8, seed=3).plan()[0][0].segments[0][0]
    bad = damage_samples(root, first_shard, [1, 2, 5])
    ss = ShardSet.open(root)
    full, states, loader = _epoch(ss, workers=workers)
    keys = [k for ks, _ in full for k in ks]
    assert not set(bad) & set(keys)
    assert loader.counters()["corrupt"] == 3 and loader.counters()["padded"] == 3
    for start in (1, 2, 5, len(full) - 1):
        resumed, rstates, rloader = _epoch(ss, start, states[start - 1], workers=workers)
        assert len(resumed) == len(full) - start
        for i, ((k_a, x_a), (k_b, x_b)) in enumerate(zip(full[start:], resumed, strict=True)):
            assert k_a == k_b, f"resume at batch {start}: batch {start + i} differs"
            assert np.array_equal(x_a, x_b)
        assert rloader.counters() == loader.counters()  # counters persisted through the state
        assert rstates[-1] == states[-1]


def test_bad_shard_is_an_error_or_skipped_by_choice(tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    root = _set(tmp_path / "set", n=300, per_shard=60)
    truncate_shard(root, 2)
    with pytest.raises(ShardError, match=r"truncated or replaced.*on_bad_shard=skip"):
        ShardSet.open(root)
    ss = ShardSet.open(root, on_bad_shard="skip")
    err = capfd.readouterr().err
    assert "leaving out 1 of 5 shard(s) (60 samples)" in err and "data-000002.tar" in err
    assert ss.num_samples == 240 and len(ss.counts) == 4 and [s["file"] for s in ss.skipped] == ["data-000002.tar"]
    # every rank plans the same number of batches over the remaining shards, and reads none of the bad one
    lens, keys = set(), []
    for rank in range(3):
        loader = ShardLoader(ShardStream(ss, 8, rank=rank, world=3, workers=2, seed=1, max_corrupt_fraction=0.0))
        batches = list(loader)
        lens.add(len(batches))
        keys += [k for b in batches for k in b["keys"]]
        assert loader.counters() == {"corrupt": 0, "padded": 0, "skipped_shards": 1}
    assert lens == {240 // 3 // 8} and len(keys) == len(set(keys))
    assert not {f"toy-{i:08d}" for i in range(120, 180)} & set(keys)
    # a checkpoint taken with one bad shard does not resume silently on a repaired (different) set
    state = loader.state_dict()
    copy_set(root, tmp_path / "other")
    (tmp_path / "other" / "data-000002.tar").unlink()
    (tmp_path / "other" / "data-000003.tar").unlink()
    other = ShardLoader(ShardStream(ShardSet.open(tmp_path / "other", on_bad_shard="skip"), 8))
    with pytest.raises(ShardError, match="shard set changed since the checkpoint"):
        other.load_state_dict(state)
    every = tmp_path / "every"
    _set(every, n=60, per_shard=60)
    truncate_shard(every, 0)
    with pytest.raises(ShardError, match="every shard is bad"):
        ShardSet.open(every, on_bad_shard="skip")
