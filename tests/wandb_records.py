"""Read what an offline W&B run wrote: the records of its ``run-*.wandb`` file.

wandb 0.31 ships no public reader for this file, so this follows the format it writes (the
LevelDB-log framing wandb has always used): a 7-byte header ``":W&B" <magic 0xBEE1> <version 0>``,
then 32 KiB blocks of chunks, each ``<crc32 u32><length u16><type u8>`` + data, where a record is
one FULL chunk or FIRST, MIDDLE..., LAST; a block tail shorter than a chunk header is zero padding.
Each record is a ``wandb_internal_pb2.Record`` protobuf. Only the framing is ours; the messages are
decoded with wandb's own protobuf classes, so a format change shows up as a failing parse.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK = 32768
HEADER = 7


def records(path: Path) -> list:
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:HEADER])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), f"{path}: not a W&B transaction log"
    out, pending, pos = [], b"", HEADER
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # zero padding at the end of a block
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        if kind == 0 and length == 0:  # unwritten tail (a killed writer)
            break
        chunk = data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):  # FULL or LAST: one complete record
            rec = pb.Record()
            rec.ParseFromString(pending)
            out.append(rec)
            pending = b""
    return out


def history(path: Path) -> list[dict]:
    """The history rows the file holds, in order, as {key: value} with ``_step``."""
    rows = []
    for rec in records(path):
        if rec.WhichOneof("record_type") == "history":
            row = {}
            for item in rec.history.item:
                key = item.key or ".".join(item.nested_key)
                row[key] = json.loads(item.value_json)
            rows.append(row)
    return rows


def run_record(path: Path):
    """The file's RunRecord (id, config, resume/branch point)."""
    for rec in records(path):
        if rec.WhichOneof("record_type") == "run":
            return rec.run
    raise AssertionError(f"{path}: no run record")


def complete(path: Path, timeout: float = 30.0) -> Path:
    """Wait until the file holds its exit record: ``run.finish()`` returns before wandb-core has
    flushed an offline run's transaction log."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(r.WhichOneof("record_type") == "exit" for r in records(path)):
            return path
        time.sleep(0.1)
    raise AssertionError(f"{path}: no exit record after {timeout:.0f}s")
