"""A lean sequential reader of WebDataset tar shards: the samples ``webdataset.tariterators.
tarfile_samples`` yields (``{"__key__", "__url__", <ext>: bytes, ...}``), without stdlib tarfile.

Why: at 96-224 px the per-member cost of ``tarfile`` (a ``TarInfo`` object, ~15 header fields
decoded, PAX/GNU checks) was 10-20% of a JPEG decode (``benchmarks/bench_reader.py --overhead``).
Here each 512-byte header is checked (checksum) and only its name, size, type and ustar prefix are
read; the data follow in one ``read``. Handled: regular files (``0``/NUL), PAX extended headers
(``x``, for long names; ``g`` ignored) and GNU long names (``L``); any other member (directories,
links) is skipped. Grouping into samples follows webdataset: the key is the path up to the first
``.`` of the base name, the lower-cased rest is the extension, ``__...__`` metadata is skipped.
A shard that ends inside a member or before its end-of-archive block (where stdlib tarfile
stops quietly), or a header with a bad checksum, raises ``TarReadError`` naming
the shard (the partial sample is not yielded).
"""

from __future__ import annotations

import os
import re
import zlib
from collections.abc import Iterator

import webdataset as wds

_BLOCK = 512
_END = bytes(_BLOCK)
_BUFFER = 1 << 16
_REGULAR, _PAX, _GNU_LONG = (ord("0"), 0), ord("x"), ord("L")  # typeflag bytes
_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext
_META = re.compile(r"__[^/]*__($|/)")


class TarReadError(ValueError):
    """A shard is truncated or its tar headers are corrupt."""


def _number(field: bytes) -> int:
    if field[:1] in (b"\x80", b"\xff"):  # base-256 (GNU) for large sizes
        n = int.from_bytes(field[1:], "big")
        return n - (1 << (8 * (len(field) - 1))) if field[:1] == b"\xff" else n
    field = field.rstrip(b"\x00 ").lstrip(b" ")
    return int(field, 8) if field else 0


def _cstr(field: bytes) -> str:
    return field.split(b"\x00", 1)[0].decode("utf-8", "surrogateescape")


def _pax_path(data: bytes) -> str | None:
    """The ``path`` record of a PAX extended header (``"<len> path=<name>\\n"`` records)."""
    pos, path = 0, None
    while pos < len(data):
        sp = data.index(b" ", pos)
        length = int(data[pos:sp])
        key, _, value = data[sp + 1 : pos + length - 1].partition(b"=")
        if key == b"path":
            path = value.decode("utf-8", "surrogateescape")
        pos += length
    return path


def _byte_sum(header: bytes) -> int:
    """The unsigned sum of a header's 512 bytes, in C: the low 16 bits of Adler-32 are 1 + the byte
    sum mod 65521, exact for 256 bytes (at most 65,280), so two halves give the sum. ``sum(header)``
    in Python cost ~5 µs per member, a third of the reader's whole overhead at 96 px."""
    mv = memoryview(header)
    return (zlib.adler32(mv[:256]) & 0xFFFF) + (zlib.adler32(mv[256:]) & 0xFFFF) - 2


def tar_members(f, url: str) -> Iterator[tuple[str, bytes]]:
    """(name, data) of the regular files of the tar stream ``f``, in order."""
    long_name: str | None = None
    read = f.read
    while True:
        header = read(_BLOCK)
        if header == _END:
            return  # the zero end-of-archive block every tar writer (tarfile, GNU tar, ours) adds
        if len(header) < _BLOCK:
            raise TarReadError(f"{url}: truncated tar (it ends before its end-of-archive block); rewrite the shard")
        field = header[148:156]
        if _number(field) != _byte_sum(header) - sum(field) + 256:
            raise TarReadError(f"{url}: corrupt tar header (bad checksum); rewrite the shard")
        size = _number(header[124:136])
        kind = header[156]
        data = read(size)
        if len(data) < size:
            raise TarReadError(f"{url}: truncated tar (a member ends early); rewrite the shard")
        if size % _BLOCK:
            read(_BLOCK - size % _BLOCK)
        if kind not in _REGULAR:
            if kind == _PAX:
                long_name = _pax_path(data) or long_name
            elif kind == _GNU_LONG:
                long_name = _cstr(data)
            else:
                long_name = None  # directories, links, global PAX headers: nothing to yield
            continue
        if long_name is not None:
            name, long_name = long_name, None
        else:
            name = _cstr(header[0:100])
            if header[345] != 0 and header[257:262] == b"ustar":
                name = _cstr(header[345:500]) + "/" + name
        yield name, data


def is_url(path: str) -> bool:
    """A shard location webdataset opens (``http://``, ``s3://``, ``pipe:``...), not a local path."""
    return "://" in path or path.startswith("pipe:")


def _open(url: str):
    """A local shard through a 64 KiB buffer (Python's default of 8 KiB costs system calls per member
    at 96 px); URLs (``pipe:``, ``http://``, ``-``), or any shard when ``GOPEN_BUFFER`` is set,
    through ``webdataset.gopen`` as before."""
    if url == "-" or is_url(url) or "GOPEN_BUFFER" in os.environ:
        return wds.gopen(url, "rb")
    return open(url, "rb", buffering=_BUFFER)


def tar_samples(url: str) -> Iterator[dict]:
    """The samples of one shard, grouped as ``webdataset.tariterators.tarfile_samples`` groups them."""
    current: dict | None = None
    with _open(url) as f:
        for name, data in tar_members(f, url):
            if name.startswith("__") and (_META.match(name) or ("/" not in name and name.endswith("__"))):
                continue  # webdataset's metadata members (both tests need the leading "__")
            m = _KEY.match(name)
            if m is None:
                continue
            prefix, suffix = m.group(1), m.group(2).lower()
            if current is None or prefix != current["__key__"]:
                if current is not None and len(current) > 2:
                    yield current
                current = {"__key__": prefix, "__url__": url}
            if suffix in current:
                raise TarReadError(f"{url}: duplicate file name {name!r} in the shard")
            current[suffix] = data
    if current is not None and len(current) > 2:
        yield current
