"""A minimal tar writer for shards, byte-identical to ``webdataset.TarWriter(mtime=0)``.

``selfsup shards`` only needs to append ``<key>.<ext>`` members to a plain tar file. Writing them
with the standard library keeps webdataset (and through it torch, ~2 s to import) out of the
command, which matters when a SLURM array starts hundreds of short import tasks. The output is
the same bytes webdataset writes (tarfile's default PAX format: a plain USTAR header for a short
ASCII name, PAX extended headers otherwise; fixed mtime/mode/owner; members in sorted extension
order; end-of-archive padded to a tar record); ``tests/test_import_parts.py`` checks that.
"""

from __future__ import annotations

import tarfile
from pathlib import Path

_BLOCK = tarfile.BLOCKSIZE
_RECORD = tarfile.RECORDSIZE


def _header(name: str, size: int, mtime: int, mode: int, uname: bytes, gname: bytes) -> bytes | None:
    """The header tarfile writes for a regular file with a short ASCII name (a plain USTAR block,
    also in PAX format), built directly (~10x faster than ``TarInfo.tobuf``); None for anything
    that needs PAX extended headers (a long or non-ASCII name, a huge size)."""
    if len(name) > 100 or not name.isascii() or size >= 8**11:
        return None
    raw = name.encode("ascii")
    buf = bytearray(
        raw.ljust(100, b"\0") + b"%07o\0" % (mode & 0o7777) + b"0000000\0" * 2 + b"%011o\0" % size
        + b"%011o\0" % mtime + b" " * 8 + b"0" + b"\0" * 100 + b"ustar\x0000" + uname + gname
    ).ljust(_BLOCK, b"\0")  # fmt: skip
    buf[148:155] = b"%06o\0" % sum(buf)
    return bytes(buf)


def _field(text: str, length: int) -> bytes:
    return text.encode("ascii").ljust(length, b"\0")


class TarWriter:
    """``TarWriter(path, mtime=0, user=..., group=...)``; ``write({"__key__": k, ext: bytes|str})``."""

    def __init__(self, path: str | Path, mtime: float = 0, user: str = "selfsup", group: str = "selfsup",
                 mode: int = 0o444) -> None:  # fmt: skip
        self.file = open(path, "wb")  # noqa: SIM115 - closed by close()
        self.mtime, self.user, self.group, self.mode = mtime, user, group, mode
        simple = isinstance(mtime, int) and 0 <= mtime < 8**11 and all(v.isascii() and len(v) <= 32 for v in (user, group))
        self._names = (_field(user, 32), _field(group, 32)) if simple else None
        self.offset = 0

    def write(self, sample: dict) -> int:
        key = sample["__key__"]
        total = 0
        for ext in sorted(sample):
            if ext.startswith("_"):
                continue
            data = sample[ext]
            if isinstance(data, str):
                data = data.encode("utf-8")
            if not isinstance(data, (bytes, bytearray, memoryview)):
                raise ValueError(f"{key}.{ext}: expected bytes or str, got {type(data).__name__}")
            header = self._names and _header(f"{key}.{ext}", len(data), self.mtime, self.mode, *self._names)
            if header is None:
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode = len(data), self.mtime, self.mode
                info.uname, info.gname = self.user, self.group
                header = info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
            pad = -len(data) % _BLOCK
            self.file.write(header)
            self.file.write(data)
            if pad:
                self.file.write(b"\0" * pad)
            self.offset += len(header) + len(data) + pad
            total += len(data)
        return total

    def close(self) -> None:
        if self.file.closed:
            return
        end = 2 * _BLOCK
        end += -(self.offset + end) % _RECORD
        self.file.write(b"\0" * end)
        self.file.close()

    def __enter__(self) -> TarWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
