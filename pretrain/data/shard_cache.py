"""``selfsup pretrain data.train=photos/``: a folder of images becomes a cached shard set.

When ``data.train`` (or ``data.test``) is a local folder with no ``manifest.json`` and image
files inside, the command writes it into shards once, before any heavy start-up, and trains on
those. The shards go to ``$SELFSUP_CACHE/<folder>-<key>`` when ``SELFSUP_CACHE`` is set, else to
``<run_dir>/../.shard-cache/<folder>-<key>``, where ``key`` hashes the folder's absolute path,
the name, size and mtime of every file and folder under it, and the import options
(``data.folder_size``, ``data.on_bad_image``; labels ``auto``, raw encoding). A later run with
the same folder and options finds the finished set and reuses it; any added, removed or rewritten
file gives a new key and a new set (old ones stay until deleted).

Global rank 0 (``$RANK``, set by torchrun / accelerate launch) writes the set with every core
into a temporary folder renamed into place when complete, so a crash or a concurrent job never
leaves a half set under the final name. The other ranks wait for its manifest and fail, instead
of hanging, when nothing under the cache changed for ``timeout_s`` (the cache must then be on a
file system every node sees: set ``SELFSUP_CACHE``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path

from selfsup.pretrain.data.datasets import IMAGE_SUFFIXES
from selfsup.pretrain.data.shards import FORMAT, MANIFEST, ShardOptions

CACHE_ENV = "SELFSUP_CACHE"
DEFAULT_SIZE = 64  # stored side when neither data.folder_size nor augment.size says


class CacheError(RuntimeError):
    """The folder cannot be turned into shards, or another rank never finished doing so."""


def is_image_folder(path: str | Path) -> bool:
    """A local folder without a manifest that holds at least one image file (at any depth)."""
    p = Path(path)
    if "://" in str(path) or not p.is_dir() or (p / MANIFEST).exists():
        return False
    for _dirpath, dirnames, filenames in os.walk(p, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        if any(os.path.splitext(f)[1].lower() in IMAGE_SUFFIXES for f in filenames if not f.startswith(".")):
            return True
    return False


def cache_dir(folder: Path, run_dir: str | Path, options: dict) -> Path:
    """Where the shards of ``folder`` written with ``options`` live (see the module docstring)."""
    h = hashlib.sha256(json.dumps({"folder": str(folder), "options": options, "format": FORMAT}).encode())
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames.sort()
        h.update(f"d {os.path.relpath(dirpath, folder)} {os.stat(dirpath).st_mtime_ns}\n".encode())
        for name in sorted(filenames):
            st = os.stat(os.path.join(dirpath, name))
            h.update(f"f {name} {st.st_size} {st.st_mtime_ns}\n".encode())
    base = Path(os.environ[CACHE_ENV]) if os.environ.get(CACHE_ENV) else Path(run_dir).absolute().parent / ".shard-cache"
    return base / f"{folder.name or 'images'}-{h.hexdigest()[:16]}"


def folder_to_shards(path: str, run_dir: str | Path, *, size: int, on_bad_image: str = "error",
                     what: str = "data.train", timeout_s: float = 300, progress: bool = True,
                     log: Callable[[str], None] = print) -> str:  # fmt: skip
    """``path`` itself when it is not an image folder; else the cached shard set made from it."""
    if not is_image_folder(path):
        return path
    folder = Path(path).absolute()
    options = {"size": size, "mode": "RGB", "labels": "auto", "encoding": "raw", "on_bad_image": on_bad_image}
    final = cache_dir(folder, run_dir, options)
    if (final / MANIFEST).is_file():
        log(f"{what}={path} is a folder of images: reusing the shards in {final}")
        return str(final)
    if int(os.environ.get("RANK", "0")) != 0:
        _wait(final, timeout_s, log)
        return str(final)
    log(f"{what}={path} is a folder of images: writing {size}px shards into {final} "
        "(once; later runs with the same folder reuse them)")  # fmt: skip
    _write(folder, final, size, on_bad_image, progress, log)
    return str(final)


def resolve_image_folders(cfg) -> None:
    """Replace ``cfg.data.train`` / ``cfg.data.test`` by cached shards where they are image folders."""
    size = cfg.data.folder_size or cfg.augment.size or DEFAULT_SIZE
    for key in ("train", "test"):
        path = getattr(cfg.data, key)
        if path:
            setattr(cfg.data, key, folder_to_shards(
                path, cfg.run_dir, size=size, on_bad_image=cfg.data.on_bad_image, what=f"data.{key}",
                timeout_s=cfg.train.dist_timeout_s, progress=cfg.log.progress))  # fmt: skip


def _write(folder: Path, final: Path, size: int, on_bad_image: str, progress: bool, log: Callable[[str], None]) -> None:
    from selfsup.pretrain.data.datasets import DatasetError
    from selfsup.pretrain.data.folders import image_folder
    from selfsup.pretrain.data.import_parallel import ImportPlan, available_cores, import_source
    from selfsup.pretrain.data.shards import ShardWriteError

    final.parent.mkdir(parents=True, exist_ok=True)
    host = socket.gethostname().split(".")[0]
    for stale in final.parent.glob(f".{final.name}.{host}.*.tmp"):  # crashed runs on this host
        pid = stale.name.split(".")[-2]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = final.parent / f".{final.name}.{host}.{os.getpid()}.tmp"
    tmp.mkdir()  # first: waiting ranks see that rank 0 is at work
    try:
        src = image_folder(folder, labels="auto", size=size)
        log(src.describe())
        plan = ImportPlan(workers=available_cores(), on_bad_image=on_bad_image)
        res = import_source(src, tmp, ShardOptions(name="train", progress=progress), plan, source=f"folder:{folder}")
    except (DatasetError, ShardWriteError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        hint = " (data.on_bad_image=skip leaves unreadable images out)" if "cannot read image" in str(e) else ""
        raise CacheError(f"{folder}: {e}{hint}") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        os.rename(tmp, final)
    except OSError:  # another job finished the same set first: use theirs
        shutil.rmtree(tmp, ignore_errors=True)
        if not (final / MANIFEST).is_file():
            raise
    if res.skipped:
        log(f"skipped {len(res.skipped)} unreadable images, listed in {final / 'skipped.txt'}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _last_change(final: Path) -> float:
    """Newest mtime of the temporary folders being written for ``final`` (0 when there are none)."""
    newest = 0.0
    for tmp in final.parent.glob(f".{final.name}.*.tmp"):
        for dirpath, _dirs, files in os.walk(tmp):
            for name in [".", *files]:
                with contextlib.suppress(FileNotFoundError):  # renamed into place meanwhile
                    newest = max(newest, os.stat(os.path.join(dirpath, name)).st_mtime)
    return newest


def _wait(final: Path, timeout_s: float, log: Callable[[str], None], poll_s: float = 0.5) -> None:
    log(f"rank {os.environ.get('RANK')}: waiting for rank 0 to write the shards into {final}")
    start = last = time.time()
    while not (final / MANIFEST).is_file():
        time.sleep(poll_s)
        last = max(last, _last_change(final))
        if time.time() - last > timeout_s:
            raise CacheError(
                f"rank 0 wrote nothing into {final.parent} for {timeout_s:.0f} s "
                f"(waited {time.time() - start:.0f} s): did it fail, or is the cache not on a file "
                f"system this node sees? Set {CACHE_ENV} to a shared folder"
            )
