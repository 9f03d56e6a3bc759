"""The lean tar reader yields exactly what stdlib tarfile (via webdataset) yields on the project's
shards, long names included, and a truncated or corrupt shard is an error naming the shard."""

from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from selfsup.pretrain.data.datasets import ArraySource
from selfsup.pretrain.data.shards import ShardOptions, write_shards
from selfsup.pretrain.data.tar_reader import TarReadError, _byte_sum, tar_samples


def _shard(tmp: Path, encoding: str = "png", n: int = 12) -> Path:
    rng = np.random.default_rng(0)
    src = ArraySource("toy", rng.integers(0, 256, (n, 9, 7, 3), dtype=np.uint8), rng.integers(0, 2, n), ["a", "b"])
    write_shards(iter(src), tmp, src.classes, ShardOptions(progress=False, encoding=encoding))
    return next(tmp.glob("*.tar"))


def _stdlib(path: Path) -> list[dict]:
    return list(wds.tariterators.tarfile_samples([{"url": str(path)}]))


@pytest.mark.parametrize("encoding", ["raw", "png"])
def test_same_samples_as_stdlib_tarfile(tmp_path: Path, encoding: str) -> None:
    path = _shard(tmp_path, encoding)
    ours = list(tar_samples(str(path)))
    assert len(ours) == 12 and ours == _stdlib(path)
    # independent of webdataset's grouping: the member names and bytes tarfile lists
    with tarfile.open(path) as tf:
        members = {m.name: tf.extractfile(m).read() for m in tf.getmembers()}
    assert {f"{s['__key__']}.{k}": v for s in ours for k, v in s.items() if not k.startswith("__")} == members


def test_long_names_pax_and_gnu_and_directories(tmp_path: Path) -> None:
    long = "d/" + "x" * 120
    for fmt, name in ((tarfile.PAX_FORMAT, "pax"), (tarfile.GNU_FORMAT, "gnu"), (tarfile.USTAR_FORMAT, "ustar")):
        path = tmp_path / f"{name}.tar"
        with tarfile.open(path, "w", format=fmt) as tf:
            tf.addfile(tarfile.TarInfo("d"))  # a regular empty file named like the folder: skipped (no ext)
            info = tarfile.TarInfo("dir")
            info.type = tarfile.DIRTYPE
            tf.addfile(info)
            for meta in ("__meta__", "__info__/a.png", "x/__k__.png"):  # webdataset's metadata: skipped
                info = tarfile.TarInfo(meta)
                info.size = 3
                tf.addfile(info, __import__("io").BytesIO(b"abc"))
            for i, key in enumerate([long if fmt != tarfile.USTAR_FORMAT else "p" * 90 + "/" + "k" * 60, "b/short"]):
                for ext, data in (("png", bytes([i]) * 700), ("cls", b"1")):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, __import__("io").BytesIO(data))
        assert list(tar_samples(str(path))) == _stdlib(path), name


def test_truncated_or_corrupt_shard_names_it(tmp_path: Path) -> None:
    path = _shard(tmp_path)
    data = path.read_bytes()
    for cut in (len(data) // 2, 512 + 100, 700):
        path.write_bytes(data[:cut])
        with pytest.raises(TarReadError, match=f"{path.name}.*truncated"):
            list(tar_samples(str(path)))
    bad = bytearray(data)
    bad[10] ^= 0xFF  # a byte of the first member's name: the header checksum no longer matches
    path.write_bytes(bytes(bad))
    with pytest.raises(TarReadError, match=f"{path.name}.*checksum"):
        list(tar_samples(str(path)))


def test_header_byte_sum_is_pythons_sum() -> None:
    # the checksum's byte sum in C (two Adler-32 halves) against sum() over the bytes, at the extremes
    # (all 0xFF: 130,560, above Adler's modulus 65,521) and on random headers
    rng = np.random.default_rng(0)
    headers = [bytes(512), b"\xff" * 512, b"\xff" * 256 + bytes(256), *(rng.bytes(512) for _ in range(200))]
    assert [_byte_sum(h) for h in headers] == [sum(h) for h in headers]
