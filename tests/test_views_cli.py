"""``selfsup views`` on real shard sets: the PNG exists, has the expected size, and shows the
source images unchanged in its first column."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from selfsup.augment.grid import HEADER, grid_size
from selfsup.launch.cli.main import main
from selfsup.pretrain.data.datasets import ArraySource, embedded, shapes
from selfsup.pretrain.data.shards import ShardOptions, write_shards
from selfsup.pretrain.data.stream import ShardSet, load_arrays


def write(src: ArraySource, out) -> str:
    opts = ShardOptions(name="t", samples_per_shard=16, progress=False)
    write_shards(iter(src), out, src.classes, opts, total=len(src))
    return str(out)


@pytest.fixture(scope="module")
def rgb_shards(tmp_path_factory) -> str:
    return write(shapes(40, size=32), tmp_path_factory.mktemp("rgb") / "set")


@pytest.fixture(scope="module")
def gray_shards(tmp_path_factory) -> str:
    src = embedded("test")
    small = ArraySource("fm", src.images[:20], src.labels[:20], src.classes)
    return write(small, tmp_path_factory.mktemp("gray") / "set")


@pytest.mark.parametrize("recipe", ["simclr", "byol", "mae"])
def test_views_png_has_expected_size_and_sources(rgb_shards, tmp_path, recipe, capsys):
    out = tmp_path / "views.png"
    args = ["views", "--shards", rgb_shards, "--out", str(out), "--n-images", "5"]
    args += ["--n-views", "4", "--tile", "32", f"augment.recipe={recipe}"]
    assert main(args) == 0
    assert "wrote" in capsys.readouterr().out
    img = Image.open(out)
    img.verify()
    img = Image.open(out)
    assert img.format == "PNG" and img.size == grid_size(5, 5, 32, 2, labelled=True)
    # tile size == image size: the first column holds the source pixels exactly
    sources = load_arrays(ShardSet.open(rgb_shards))[0][:5].permute(0, 2, 3, 1).numpy()
    arr = np.asarray(img.convert("RGB"))
    for i in range(5):
        top = HEADER + 2 + i * 34
        np.testing.assert_array_equal(arr[top : top + 32, 2:34], sources[i])
    # and the view tiles are not copies of the source
    assert not np.array_equal(arr[HEADER + 2 : HEADER + 34, 36:68], sources[0])


def test_views_on_grayscale_shards_with_overrides(gray_shards, tmp_path):
    out = tmp_path / "sub" / "gray.png"
    args = [
        "views",
        "--shards",
        gray_shards,
        "--out",
        str(out),
        "--n-images",
        "3",
        "--n-views",
        "2",
    ]
    args += ["augment.size=40", "augment.blur_p=1.0", "--seed", "3"]
    assert main(args) == 0
    assert Image.open(out).size == grid_size(3, 3, 96, 2, labelled=True)


def test_views_reports_bad_input(rgb_shards, tmp_path, capsys):
    out = str(tmp_path / "x.png")
    assert main(["views", "--shards", str(tmp_path / "missing"), "--out", out]) == 2
    assert "not found" in capsys.readouterr().out
    assert main(["views", "--shards", rgb_shards, "--out", out, "augment.recipe=nope"]) == 2
    assert "augment.recipe" in capsys.readouterr().out
    assert main(["views", "--shards", rgb_shards, "--out", out, "augment.scale=[0.5,2.0]"]) == 2
    assert "augment.scale" in capsys.readouterr().out
    assert main(["views", "--shards", rgb_shards, "--out", out, "--n-views", "0"]) == 2
