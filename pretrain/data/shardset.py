"""A verified shard set: the manifest read and checked against the files on disk.

``ShardSet.open`` refuses a set whose manifest is missing, malformed or inconsistent, and (for
local sets) one whose shard files are missing or differ in size (or sha256, when asked) from the
manifest; with ``on_bad_shard="skip"`` such shards are left out instead, listed in ``skipped`` and
reported on stderr. ``selfsup.pretrain.stream`` plans and streams the samples of a set.
"""

from __future__ import annotations

import functools
import io
import json
import os
import stat
import sys
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from selfsup.pretrain.data.shards import FORMAT, MANIFEST
from selfsup.pretrain.data.tar_reader import is_url

_REQUIRED = ("format", "encoding", "extension", "image_size", "channels", "classes", "num_samples", "shards")


class ShardError(ValueError):
    """A shard set is missing, empty, inconsistent with its manifest, or too corrupt to use."""


# Encoded RGB images from this many pixels are unpacked plane by plane (benchmarks/bench_reader.py
# --overhead: at 224 px JPEG q95 the reader's overhead over a bare decode went from 15-23% to ~10%;
# at 96 px the three PIL calls cost more than they save)
BANDS_FROM_PIXELS = 128 * 128


class ShardSet:
    """A verified shard set: ``ShardSet.open(folder or URL prefix)``."""

    def __init__(self, base: str, manifest: dict) -> None:
        self.base = base
        self.manifest = manifest
        self.shards: list[dict] = manifest["shards"]
        self.urls = [f"{base.rstrip('/')}/{s['file']}" for s in self.shards]
        self.counts = [int(s["num_samples"]) for s in self.shards]
        self.num_samples = int(manifest["num_samples"])
        self.classes: list[str] = list(manifest["classes"])
        self.labelled = bool(manifest.get("labelled", True))  # no .cls members when false
        self.channels = int(manifest["channels"])
        self.bits = int(manifest.get("bits", 8))  # 16: pixels are 0..65535 (decoded as int32)
        self.height, self.width = (int(v) for v in manifest["image_size"])
        self.extension: str = manifest["extension"]
        self.mean: list[float] = list(manifest.get("mean") or [0.5] * self.channels)
        self.std: list[float] = list(manifest.get("std") or [0.25] * self.channels)
        self.skipped: list[dict] = []  # shards left out at open (data.on_bad_shard=skip): file, reason

    @property
    def image_size(self) -> int:
        if self.height != self.width:
            raise ShardError(f"{self.base}: images are {self.height}x{self.width}; models need square images")
        return self.height

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, self.height, self.width)

    @classmethod
    def open(cls, path: str | Path, verify_hashes: bool = False, on_bad_shard: str = "error") -> ShardSet:
        """Read and check the manifest; for local sets also check every shard file exists with the
        recorded size (and sha256 when ``verify_hashes``). A shard that fails these checks is an
        error, or with ``on_bad_shard="skip"`` is left out of the set (listed in ``skipped`` and
        reported on stderr); the plan then covers the remaining shards only."""
        if on_bad_shard not in ("error", "skip"):
            raise ShardError(f"data.on_bad_shard: '{on_bad_shard}' is not one of error, skip")
        path = str(path)
        if path.endswith(MANIFEST):
            path = path[: -len(MANIFEST)].rstrip("/") or "."
        if is_url(path):
            with wds.gopen(f"{path.rstrip('/')}/{MANIFEST}", "rb") as f:
                manifest = json.load(f)
        else:
            folder = Path(path)
            if not folder.exists():
                raise ShardError(f"shard set not found: {folder}")
            mpath = folder / MANIFEST
            if not mpath.is_file():
                raise ShardError(f"{folder} has no {MANIFEST} (write shards with 'selfsup shards')")
            try:
                manifest = json.loads(mpath.read_text())
            except json.JSONDecodeError as e:
                raise ShardError(f"{mpath} is not valid JSON: {e}") from e
        missing = [k for k in _REQUIRED if k not in manifest]
        if missing:
            raise ShardError(f"{path}/{MANIFEST} lacks {', '.join(missing)}")
        if manifest["format"] != FORMAT:
            raise ShardError(f"{path}/{MANIFEST}: format {manifest['format']!r}, expected {FORMAT!r}")
        _check_names(manifest["shards"], f"{path}/{MANIFEST}")
        counts = [int(s["num_samples"]) for s in manifest["shards"]]
        if not counts or manifest["num_samples"] <= 0:
            raise ShardError(f"{path}: the shard set is empty")
        if sum(counts) != manifest["num_samples"]:
            raise ShardError(f"{path}/{MANIFEST}: shards hold {sum(counts)} samples, total says {manifest['num_samples']}")
        shardset = cls(path, manifest)
        bad = [] if is_url(path) else shardset._bad_files(verify_hashes)
        if bad and on_bad_shard == "error":
            more = f" (and {len(bad) - 1} more bad shard(s))" if len(bad) > 1 else ""
            raise ShardError(f"{bad[0][1]}{more}; data.on_bad_shard=skip trains on the others")
        if bad:
            drop = {i for i, _ in bad}
            keep = [s for i, s in enumerate(manifest["shards"]) if i not in drop]
            if not keep:
                raise ShardError(f"{path}: every shard is bad; first: {bad[0][1]}")
            shardset = cls(path, {**manifest, "shards": keep, "num_samples": sum(int(s["num_samples"]) for s in keep)})
            shardset.skipped = [{"file": manifest["shards"][i]["file"], "reason": why} for i, why in bad]
            if rank_and_world()[0] == 0:
                lost = manifest["num_samples"] - shardset.num_samples
                print(f"selfsup: warning: data.on_bad_shard=skip: leaving out {len(bad)} of {len(manifest['shards'])} "
                      f"shard(s) ({lost} samples) of {path}:", *(f"  {why}" for _, why in bad), sep="\n",
                      file=sys.stderr, flush=True)  # fmt: skip
        return shardset

    def _bad_files(self, verify_hashes: bool) -> list[tuple[int, str]]:
        """(index, reason) of every shard that is missing or differs from the manifest."""
        from selfsup.pretrain.data.shards import _sha256

        bad = []
        for i, (shard, url) in enumerate(zip(self.shards, self.urls, strict=True)):
            p = Path(url)
            try:
                mode = os.stat(p).st_mode  # never opened: a FIFO would block the reader
            except OSError:
                mode = None
            if mode is None:
                bad.append((i, f"shard listed in the manifest is missing: {p}"))
            elif not stat.S_ISREG(mode):
                kind = "a FIFO" if stat.S_ISFIFO(mode) else "a directory" if stat.S_ISDIR(mode) else \
                    "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a socket or other special file"
                bad.append((i, f"{p}: manifest entry '{shard['file']}' is {kind}, not a regular file: refused "
                               "(a shard must be a tar file)"))  # fmt: skip
            elif "bytes" in shard and p.stat().st_size != shard["bytes"]:
                bad.append((i, f"{p}: {p.stat().st_size} bytes on disk, manifest says {shard['bytes']} "
                               "(truncated or replaced?)"))  # fmt: skip
            elif verify_hashes and shard.get("sha256") and _sha256(p) != shard["sha256"]:
                bad.append((i, f"{p}: sha256 differs from the manifest"))
        return bad

    @functools.cached_property  # asked once per decoded sample; the manifest's values do not change
    def planar(self) -> bool:
        """Encoded RGB images from ``BANDS_FROM_PIXELS`` are unpacked plane by plane, each straight into
        its slot of a C-contiguous batch; the rest is stacked as stored, [H, W, C]: channels-last."""
        return self.extension not in ("u8", "u16") and self.channels == 3 and \
            self.height * self.width >= BANDS_FROM_PIXELS  # fmt: skip

    def batch_slots(self, n: int) -> np.ndarray | None:
        """A [n, 3, H, W] uint8 batch that ``planar`` sets decode into, slot by slot; else None."""
        return np.empty((n, 3, self.height, self.width), np.uint8) if self.planar else None

    def decode(self, sample: dict, out: np.ndarray | None = None) -> tuple[np.ndarray, int, str]:
        """Raw tar sample -> (uint8 [C, H, W] (int32 for 16-bit ``u16``), label (-1 if unlabelled), key). Raises on anything
        malformed. ``planar`` sets decode into ``out`` (a C-contiguous [C, H, W] slot of the batch);
        the others give a [C, H, W] view of their [H, W, C] pixels (stacked into channels-last)."""
        payload = sample[self.extension]
        if self.extension in ("u16", "u8"):  # raw [H, W, C] (u16: 16-bit, multichannel.py)
            img = np.frombuffer(payload, dtype="<u2" if self.extension == "u16" else np.uint8)
            if img.size != self.channels * self.height * self.width:
                raise ValueError(f"raw payload of {img.size} values, expected {self.channels * self.height * self.width}")
            img = img.reshape(self.height, self.width, self.channels)
            out = (img.astype(np.int32) if self.extension == "u16" else img).transpose(2, 0, 1)
        else:
            with Image.open(io.BytesIO(payload)) as im:
                mode = "L" if self.channels == 1 else "RGB"
                im = im if im.mode == mode else im.convert(mode)
                if (im.height, im.width) != (self.height, self.width):
                    raise ValueError(f"image of {im.width}x{im.height} px, manifest says {self.width}x{self.height}")
                if not self.planar:
                    out = np.asarray(im).reshape(self.height, self.width, -1).transpose(2, 0, 1)
                else:  # one plane at a time: PIL's C packer does the HWC -> CHW gather
                    out = np.empty((3, self.height, self.width), np.uint8) if out is None else out
                    im.load()
                    for c, band in enumerate("RGB"):
                        out[c] = np.frombuffer(im.tobytes("raw", band), np.uint8).reshape(out.shape[1:])
        return out, int(sample["cls"]) if self.labelled else -1, sample["__key__"]




def _check_names(shards: list, where: str) -> None:
    """Every shard name is a relative path inside the manifest's folder: plain names joined by '/'
    (a joined import's ``part-000-of-004/x.tar``), never absolute, never '..' or '.', nothing that
    could name a file elsewhere. Every offending entry is listed."""
    bad = []
    for i, shard in enumerate(shards):
        name = shard.get("file") if isinstance(shard, dict) else None
        if not isinstance(name, str) or not name:
            bad.append(f"shards[{i}]: no file name ({shard!r})")
            continue
        parts = name.split("/")
        if name.startswith("/") or os.path.isabs(name):
            why = "an absolute path"
        elif any(p in ("", ".", "..") for p in parts):
            why = "a path with '..', '.' or an empty component"
        elif "\\" in name or "\0" in name:
            why = "a name with a backslash or NUL"
        else:
            continue
        bad.append(f"shards[{i}] file '{name}' is {why}")
    if bad:
        raise ShardError(
            f"{where}: shard names must be plain file names inside the manifest's folder; "
            + "; ".join(bad) + ". Rewrite the manifest (selfsup shards writes valid ones)"
        )


def rank_and_world() -> tuple[int, int]:
    """From an initialised process group, else from launcher environment variables."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
