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

import re
from collections.abc import Iterator

import webdataset as wds

_BLOCK = 512
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


def tar_members(f, url: str) -> Iterator[tuple[str, bytes]]:
    """(name, data) of the regular files of the tar stream ``f``, in order."""
    long_name: str | None = None
    while True:
        header = f.read(_BLOCK)
        if header == bytes(_BLOCK):
            return  # the zero end-of-archive block every tar writer (tarfile, GNU tar, ours) adds
        if len(header) < _BLOCK:
            raise TarReadError(f"{url}: truncated tar (it ends before its end-of-archive block); rewrite the shard")
        stored = _number(header[148:156])
        if stored != sum(header) - sum(header[148:156]) + 256:
            raise TarReadError(f"{url}: corrupt tar header (bad checksum); rewrite the shard")
        size = _number(header[124:136])
        kind = header[156:157]
        data = f.read(size)
        if len(data) < size:
            raise TarReadError(f"{url}: truncated tar (a member ends early); rewrite the shard")
        if size % _BLOCK:
            f.read(_BLOCK - size % _BLOCK)
        if kind == b"x":
            long_name = _pax_path(data) or long_name
            continue
        if kind == b"L":
            long_name = _cstr(data)
            continue
        if kind not in (b"0", b"\x00"):
            long_name = None
            continue  # directories, links, global PAX headers: nothing to yield
        if long_name is not None:
            name, long_name = long_name, None
        else:
            name = _cstr(header[0:100])
            if header[257:262] == b"ustar" and header[345] != 0:
                name = _cstr(header[345:500]) + "/" + name
        yield name, data


def tar_samples(url: str) -> Iterator[dict]:
    """The samples of one shard, grouped as ``webdataset.tariterators.tarfile_samples`` groups them."""
    current: dict | None = None
    with wds.gopen(url, "rb") as f:
        for name, data in tar_members(f, url):
            if _META.match(name) or ("/" not in name and name.startswith("__") and name.endswith("__")):
                continue
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
