"""``selfsup pretrain data.train=photos/``: a folder of real image files is written once into cached
shards and reused; other ranks wait for rank 0; the command trains on it end to end."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from selfsup.pretrain.data.shard_cache import (
    CACHE_ENV,
    CacheError,
    folder_to_shards,
    is_image_folder,
)
from selfsup.pretrain.data.stream import ShardSet


def _photos(root: Path, n: int = 40, seed: int = 0) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        h, w = rng.integers(20, 48, 2)
        arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(arr).save(root / f"p{i:03d}.{'jpg' if i % 2 else 'png'}")
    return root


def _shard_stamps(path: str) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in Path(path).glob("*.tar")}


def test_folder_written_once_then_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(CACHE_ENV, raising=False)
    monkeypatch.delenv("RANK", raising=False)
    photos = _photos(tmp_path / "photos")
    logs: list[str] = []
    first = folder_to_shards(str(photos), tmp_path / "runs" / "a", size=16, log=logs.append)
    assert Path(first).parent == tmp_path / "runs" / ".shard-cache" and Path(first).name.startswith("photos-")
    assert "writing 16px shards" in logs[0] and "unlabelled" in logs[1]
    ss = ShardSet.open(first)
    assert ss.num_samples == 40 and not ss.labelled and ss.shape == (3, 16, 16)
    stamps = _shard_stamps(first)
    logs.clear()
    second = folder_to_shards(str(photos), tmp_path / "runs" / "b", size=16, log=logs.append)
    assert second == first and _shard_stamps(second) == stamps and "reusing the shards" in logs[0]
    assert sorted(p.name for p in Path(first).parent.iterdir()) == [Path(first).name]  # no temp left
    # other options, or a changed folder, give another set; SELFSUP_CACHE moves the cache
    assert folder_to_shards(str(photos), tmp_path / "runs" / "b", size=24, log=logs.append) != first
    Image.fromarray(np.zeros((30, 30, 3), np.uint8)).save(photos / "new.png")
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    third = folder_to_shards(str(photos), tmp_path / "runs" / "b", size=16, log=logs.append)
    assert Path(third).parent == tmp_path / "cache" and ShardSet.open(third).num_samples == 41


def test_not_an_image_folder_passes_through(tmp_path: Path, small_shards: str) -> None:
    assert folder_to_shards(small_shards, tmp_path, size=16) == small_shards  # a shard set
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("no images")
    assert not is_image_folder(tmp_path / "docs") and not is_image_folder(tmp_path / "missing")
    assert folder_to_shards(str(tmp_path / "missing"), tmp_path, size=16) == str(tmp_path / "missing")


def test_bad_image_is_a_clear_error_leaving_no_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(CACHE_ENV, raising=False)
    monkeypatch.delenv("RANK", raising=False)
    photos = _photos(tmp_path / "photos", n=6)
    (photos / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    with pytest.raises(CacheError, match=r"broken\.jpg.*data\.on_bad_image=skip"):
        folder_to_shards(str(photos), tmp_path / "runs" / "a", size=16, log=lambda _: None)
    assert list((tmp_path / "runs" / ".shard-cache").iterdir()) == []
    out = folder_to_shards(str(photos), tmp_path / "runs" / "a", size=16, on_bad_image="skip", log=lambda _: None)
    assert ShardSet.open(out).manifest["skipped"] == 1


def test_other_ranks_wait_for_rank_0(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(CACHE_ENV, raising=False)
    photos = _photos(tmp_path / "photos", n=30)
    monkeypatch.setenv("RANK", "1")
    got: list[str] = []
    waiter = threading.Thread(target=lambda: got.append(
        folder_to_shards(str(photos), tmp_path / "runs" / "a", size=16, timeout_s=60, log=lambda _: None)))
    waiter.start()
    time.sleep(1.0)
    assert waiter.is_alive() and not got  # nothing written yet: rank 1 waits
    code = ("import sys; from selfsup.pretrain.data.shard_cache import folder_to_shards as f; "
            f"print(f({str(photos)!r}, {str(tmp_path / 'runs' / 'a')!r}, size=16))")  # fmt: skip
    r = subprocess.run([sys.executable, "-c", code], env={**os.environ, "RANK": "0"}, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    waiter.join(30)
    assert got == [r.stdout.strip().splitlines()[-1]]
    with pytest.raises(CacheError, match="rank 0 wrote nothing"):  # rank 0 never comes
        folder_to_shards(str(photos), tmp_path / "runs" / "a", size=20, timeout_s=1, log=lambda _: None)


ENV = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
SMALL = [
    "model.backbone=resnet_small", "model.stem=cifar_s2", "model.width=0.5", "method.simclr.proj_hidden=64",
    "method.simclr.proj_out=32", "data.batch_size=16", "data.workers=0", "optim.name=sgd", "log.progress=false",
    "train.max_steps=2", "train.log_every=1", "data.folder_size=16", "log.wandb=off",
]  # fmt: skip


@pytest.mark.slow
def test_pretrain_straight_from_a_folder(tmp_path: Path) -> None:
    photos = _photos(tmp_path / "photos", n=40)
    env = {k: v for k, v in ENV.items() if k not in (CACHE_ENV, "RANK")}

    def pretrain(run: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "selfsup.launch.cli", "pretrain", f"data.train={photos}",
               f"run_dir={tmp_path / run}", *SMALL]  # fmt: skip
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)

    r = pretrain("a")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "is a folder of images: writing 16px shards into" in r.stdout and "done: 2 steps" in r.stdout
    cache = next((tmp_path / ".shard-cache").iterdir())
    stamps = _shard_stamps(str(cache))
    r = pretrain("b")
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"reusing the shards in {cache}" in r.stdout and _shard_stamps(str(cache)) == stamps
    assert (tmp_path / "b" / "checkpoints").is_dir()


def test_periodic_knn_on_unlabelled_train_data_is_a_config_error(tmp_path: Path) -> None:
    photos = _photos(tmp_path / "photos", n=8)
    env = {k: v for k, v in ENV.items() if k not in (CACHE_ENV, "RANK")}
    cmd = [sys.executable, "-m", "selfsup.launch.cli", "pretrain", f"data.train={photos}", f"data.test={photos}",
           "eval.every_epochs=1", f"run_dir={tmp_path / 'run'}", *SMALL]  # fmt: skip
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "eval.every_epochs=1 runs kNN with data.train as the labelled database" in r.stdout
    assert not (tmp_path / "run" / "checkpoints").exists()
