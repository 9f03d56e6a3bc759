"""Writing shards at scale, on real JPEG folders and tar files: a process pool that gives the same
bytes as one worker, parts of a SLURM array joined into one set with exact statistics, resuming
after a crash, the tar writer, and the command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from selfsup.pretrain.data.datasets import DatasetError, shapes
from selfsup.pretrain.data.folders import image_folder
from selfsup.pretrain.data.import_parallel import (
    ImportPlan,
    import_source,
    join_parts,
    parse_part,
    part_dir,
)
from selfsup.pretrain.data.pixel_stats import PixelSums, add_sums, mean_std
from selfsup.pretrain.data.shards import ShardOptions, ShardWriteError
from selfsup.pretrain.data.stream import ShardSet, load_arrays


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """47 JPEGs of varied sizes in 3 class folders."""
    root = tmp_path_factory.mktemp("jpegs")
    src = shapes(47, size=40, seed=1)
    for i, img in enumerate(src.images):
        w, h = 40 + (i % 5) * 7, 40 + (i % 3) * 11
        (root / f"c{i % 3}").mkdir(exist_ok=True)
        Image.fromarray(img).resize((w, h)).save(root / f"c{i % 3}" / f"{i:03d}.jpg", quality=90)
    return root


def _opts(**kw) -> ShardOptions:
    return ShardOptions(name="train", progress=False, samples_per_shard=kw.pop("per_shard", 10), **kw)


def _run(folder: Path, out: Path, size: int = 16, **plan):
    return import_source(image_folder(folder, size=size), out, _opts(), ImportPlan(**plan), source="folder:x")


def test_workers_give_identical_bytes(jpegs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from selfsup.pretrain.data import import_parallel

    monkeypatch.setattr(import_parallel, "CHUNK", 2)  # 24 chunks: more than the 12 kept in flight
    one = _run(jpegs, tmp_path / "w1", workers=1).manifest
    three = _run(jpegs, tmp_path / "w3", workers=3).manifest
    assert len(one["shards"]) == 5
    assert [s["sha256"] for s in one["shards"]] == [s["sha256"] for s in three["shards"]]
    assert (tmp_path / "w1" / "manifest.json").read_bytes() == (tmp_path / "w3" / "manifest.json").read_bytes()


def test_parts_join_to_the_single_run_set(jpegs: Path, tmp_path: Path) -> None:
    single = _run(jpegs, tmp_path / "single", workers=2).manifest
    for i in (2, 0, 1):  # any order, as array tasks finish
        res = _run(jpegs, tmp_path / "parts", part=i, parts=3, workers=1)
        assert res.out == part_dir(tmp_path / "parts", i, 3) and res.out.name == f"part-00{i}-of-003"
        assert all(s["file"].startswith(f"train-p00{i}-") for s in res.manifest["shards"])
    joined = join_parts(tmp_path / "parts")
    assert joined["num_samples"] == single["num_samples"] == 47
    assert joined["pixel_sums"] == single["pixel_sums"]
    assert joined["mean"] == single["mean"] and joined["std"] == single["std"]  # exact, not close
    assert joined["classes"] == single["classes"] and joined["labelled"] is True
    a, b = ShardSet.open(tmp_path / "single"), ShardSet.open(tmp_path / "parts", verify_hashes=True)
    (xa, ya, ka), (xb, yb, kb) = load_arrays(a), load_arrays(b)
    assert ka == kb and np.array_equal(xa.numpy(), xb.numpy()) and np.array_equal(ya.numpy(), yb.numpy())
    assert json.loads((tmp_path / "parts" / "manifest.json").read_text()) == joined


def test_finished_part_is_skipped_and_crashed_part_rewritten(jpegs: Path, tmp_path: Path) -> None:
    out = tmp_path / "parts"
    first = _run(jpegs, out, part=0, parts=2)
    tar = first.out / first.manifest["shards"][0]["file"]
    stamp = tar.stat().st_mtime_ns
    again = _run(jpegs, out, part=0, parts=2)
    assert again.reused and tar.stat().st_mtime_ns == stamp
    # part 1 "crashed": a temp folder and a moved shard but no manifest
    crashed = part_dir(out, 1, 2)
    (crashed / ".writing-train-p001").mkdir(parents=True)
    (crashed / ".writing-train-p001" / "train-p001-000003.tar").write_bytes(b"half a tar")
    (crashed / "train-p001-000007.tar").write_bytes(b"an orphan shard")
    with pytest.raises(ShardWriteError, match=r"1 of 2 parts not finished \(1\).*part-001-of-002/manifest.json"):
        join_parts(out)
    res = _run(jpegs, out, part=1, parts=2)
    assert not res.reused
    assert sorted(p.name for p in crashed.iterdir()) == ["manifest.json", "train-p001-000000.tar",
                                                          "train-p001-000001.tar", "train-p001-000002.tar"]
    assert join_parts(out)["num_samples"] == 47
    with pytest.raises(ShardWriteError, match="other options.*seed: 0 now 5"):
        _run(jpegs, out, part=0, parts=2, seed=5)


def test_skipped_images_of_all_parts_are_joined(jpegs: Path, tmp_path: Path) -> None:
    folder = tmp_path / "in" / "c0"
    folder.mkdir(parents=True)
    for i, p in enumerate(sorted(jpegs.rglob("*.jpg"))[:12]):
        (folder / f"{i}.jpg").write_bytes(p.read_bytes()[: 200 if i in (3, 9) else None])  # 2 truncated
    for i in range(3):
        _run(tmp_path / "in", tmp_path / "out", part=i, parts=3, on_bad_image="skip")
    m = join_parts(tmp_path / "out")
    assert m["num_samples"] == 10 and m["skipped"] == 2
    lines = (tmp_path / "out" / "skipped.txt").read_text().splitlines()
    assert sorted(Path(line.split("\t")[0]).name for line in lines) == ["3.jpg", "9.jpg"]


def test_join_refuses_mismatched_parts(jpegs: Path, tmp_path: Path) -> None:
    out = tmp_path / "parts"
    _run(jpegs, out, part=0, parts=2)
    _run(jpegs, tmp_path / "other", size=24, part=1, parts=2)
    part_dir(tmp_path / "other", 1, 2).rename(part_dir(out, 1, 2))
    with pytest.raises(ShardWriteError, match="part 1 disagrees with part 0 on image_size"):
        join_parts(out)
    with pytest.raises(ShardWriteError, match="no part-I-of-N folders"):
        join_parts(tmp_path / "nothing")


def test_part_argument_and_bounds(jpegs: Path, tmp_path: Path) -> None:
    assert parse_part("3/8") == (3, 8)
    for bad in ("8/8", "x", "1/0", "-1/4"):
        with pytest.raises(DatasetError, match="--part"):
            parse_part(bad)
    with pytest.raises(DatasetError, match="100 parts but the source has only 47"):
        _run(jpegs, tmp_path / "o", part=0, parts=100)


def test_pixel_sums_are_exact_and_add() -> None:
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (30, 9, 7, 3), dtype=np.uint8)
    whole, a, b = PixelSums(3), PixelSums(3), PixelSums(3)
    for i, img in enumerate(imgs):
        whole.add(img)
        (a if i < 11 else b).add(img)
    x = imgs.reshape(-1, 3).astype(np.int64)
    assert whole.to_json() == {"pixels": x.shape[0], "sum": x.sum(0).tolist(), "sum_sq": (x * x).sum(0).tolist()}
    assert add_sums([a.to_json(), b.to_json()]) == whole.to_json()
    mean, std = mean_std(whole.to_json())
    assert np.allclose(mean, (x / 255).mean(0), atol=1e-6) and np.allclose(std, (x / 255).std(0), atol=1e-6)


def test_tar_writer_matches_webdataset(tmp_path: Path) -> None:
    import webdataset as wds

    from selfsup.pretrain.data.tar_writer import TarWriter

    samples = [{"__key__": f"k{i:03d}", "u8": bytes(range(i % 256)) * (i + 1), "cls": str(i)} for i in range(40)]
    samples += [{"__key__": "x" * 96, "png": b"\x89PNG" * 300},  # exactly 100 bytes with ".png"
                {"__key__": "d" * 60 + "/" + "y" * 60, "jpg": b"prefix-split name"},  # tarfile splits it
                {"__key__": "caf\u00e9-\u732b", "u8": b""}]  # non-ASCII, empty  # fmt: skip
    with TarWriter(tmp_path / "ours.tar") as w:
        for s in samples:
            w.write(s)
    with wds.TarWriter(str(tmp_path / "wds.tar"), mtime=0, user="selfsup", group="selfsup") as w:
        for s in samples:
            w.write(s)
    assert (tmp_path / "ours.tar").read_bytes() == (tmp_path / "wds.tar").read_bytes()


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "selfsup.launch.cli", "shards", *args],
                          capture_output=True, text=True, env=env)  # fmt: skip


def test_cli_teaches_and_runs_parts(jpegs: Path, tmp_path: Path) -> None:
    help_text = _cli("--help").stdout
    for needle in ("--source list", "--labels", "--on-bad-image skip", "--part $SLURM_ARRAY_TASK_ID/8",
                   "--join", "--workers", "skipped.txt"):  # fmt: skip
        assert needle in help_text, needle
    out = tmp_path / "cli"
    for i in range(2):
        r = _cli("--source", "folder", "--path", str(jpegs), "--size", "16", "--out", str(out), "--part", f"{i}/2",
                 "--quiet", "--workers", "2")  # fmt: skip
        assert r.returncode == 0, r.stdout + r.stderr
        assert f"part {i}/2: wrote" in r.stdout and "--join" in r.stdout and "3 classes" in r.stdout
    r = _cli("--source", "folder", "--path", str(jpegs), "--size", "16", "--out", str(out), "--part", "1/2", "--quiet")
    assert "already written" in r.stdout
    r = _cli("--join", str(out))
    assert r.returncode == 0 and "joined 2 parts" in r.stdout and '"num_samples": 47' in r.stdout
    assert _cli("--verify", str(out)).returncode == 0
    r = _cli("--source", "folder", "--path", str(jpegs), "--out", str(out), "--part", "2/2")
    assert r.returncode == 2 and "0 <= I < N" in r.stdout
    r = _cli("--source", "list", "--out", str(out))
    assert r.returncode == 2 and "needs --path to a list file" in r.stdout
