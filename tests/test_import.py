"""Image files as a source, on real files written by PIL: unlabelled and labelled folders, list
files, bad images, and the image modes users bring (CMYK, palette with transparency, 16-bit,
EXIF-rotated, grey in an RGB set)."""

from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from selfsup.pretrain.data.datasets import DatasetError
from selfsup.pretrain.data.folders import _to_mode, image_folder, image_list, load_image
from selfsup.pretrain.data.import_parallel import SKIPPED, ImportPlan, import_source
from selfsup.pretrain.data.shards import ShardOptions
from selfsup.pretrain.data.sources import open_source
from selfsup.pretrain.data.stream import ShardSet, load_arrays


def _save(path: Path, size=(24, 18), seed: int = 0, colour=None, mode: str = "RGB", **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    if colour is None:
        arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    else:
        arr = np.broadcast_to(np.array(colour, dtype=np.uint8), (h, w, 3)).copy()
    im = Image.fromarray(arr)
    (im if mode == "RGB" else im.convert(mode)).save(path, **kw)
    return path


def _import(src, out: Path, **plan) -> ShardSet:
    import_source(src, out, ShardOptions(progress=False, samples_per_shard=4), ImportPlan(**plan))
    return ShardSet.open(out)


# ----------------------------------------------------------------------------- folders
def test_flat_folder_is_unlabelled_end_to_end(tmp_path: Path) -> None:
    for i, size in enumerate([(30, 20), (16, 40), (17, 17), (64, 48), (20, 30)]):
        _save(tmp_path / "photos" / f"img{i}.{'png' if i % 2 else 'jpg'}", size, seed=i)
    (tmp_path / "photos" / "notes.txt").write_text("not an image")
    (tmp_path / "photos" / ".hidden.png").write_bytes(b"ignored: hidden")
    src = open_source("folder", path=str(tmp_path / "photos"), size=16)
    assert not src.labelled and src.classes == [] and len(src) == 5
    assert "unlabelled" in src.describe() and "5 images directly in the folder" in src.describe()
    ss = _import(src, tmp_path / "out")
    assert ss.manifest["labelled"] is False and ss.classes == [] and ss.num_samples == 5
    images, labels, keys = load_arrays(ss)
    assert images.shape == (5, 3, 16, 16) and labels.tolist() == [-1] * 5 and len(set(keys)) == 5
    with tarfile.open(ss.urls[0]) as tar:  # the label is absent, not a placeholder
        names = tar.getnames()
    assert names and not any(n.endswith(".cls") for n in names)

    from selfsup.eval.run import EvalError, load_labelled

    with pytest.raises(EvalError, match="labelled"):
        load_labelled(tmp_path / "out", "train")


def test_nested_folder_labels_auto_folders_none(tmp_path: Path) -> None:
    root = tmp_path / "pics"
    _save(root / "2021" / "a.png")
    _save(root / "2021" / "trip" / "b.png", seed=1)
    _save(root / "loose.png", seed=2)
    auto = image_folder(root, size=8)
    assert not auto.labelled and len(auto) == 3  # an image at the top: not class folders
    with pytest.raises(DatasetError, match=r"loose\.png is not in a class sub-folder"):
        image_folder(root, labels="folders")
    (root / "loose.png").unlink()
    _save(root / "2022" / "c.png", seed=3)
    (root / ".thumbs").mkdir()
    _save(root / ".thumbs" / "t.png")
    labelled = image_folder(root, size=8)
    assert labelled.classes == ["2021", "2022"] and labelled.labels == [0, 0, 1]  # deep images too
    assert "--labels none" in labelled.describe()
    assert not image_folder(root, labels="none").labelled
    with pytest.raises(DatasetError, match="labels must be one of"):
        image_folder(root, labels="yes")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no images"):
        image_folder(tmp_path / "empty")
    with pytest.raises(DatasetError, match="use --source list"):
        image_folder(root / "2021" / "a.png")


def test_list_file_paths_labels_and_errors(tmp_path: Path) -> None:
    _save(tmp_path / "data" / "x" / "a.png")
    _save(tmp_path / "data" / "b.jpg", seed=1)
    far = _save(tmp_path / "elsewhere" / "c.png", seed=2)
    lst = tmp_path / "data" / "files.txt"
    lst.write_text(f"# my images\nx/a.png\tcat\n\nb.jpg, dog\n{far},cat\n")
    src = image_list(lst, size=8)
    assert src.files == [tmp_path / "data" / "x" / "a.png", tmp_path / "data" / "b.jpg", far]
    assert src.classes == ["cat", "dog"] and src.labels == [0, 1, 0]
    ss = _import(src, tmp_path / "out")
    assert ss.labelled and sorted(load_arrays(ss)[1].tolist()) == [0, 0, 1]

    lst.write_text("x/a.png\t3\nb.jpg\t0\n")
    src = image_list(lst)
    assert src.labels == [3, 0] and src.classes == ["0", "1", "2", "3"]  # integers are class indices
    assert not image_list(lst, labels="none").labelled

    lst.write_text("x/a.png\nb.jpg\n")
    assert not image_list(lst).labelled
    lst.write_text("x/a.png\tcat\nb.jpg\n")
    with pytest.raises(DatasetError, match=r"files\.txt line 2: no label, unlike line 1"):
        image_list(lst)
    lst.write_text("x/a.png,\n")
    with pytest.raises(DatasetError, match="line 1: expected PATH"):
        image_list(lst)
    lst.write_text("x/a.png\nmissing.png\n")
    with pytest.raises(DatasetError, match=r"cannot read image .*missing\.png"):
        list(image_list(lst))
    with pytest.raises(DatasetError, match="use --source folder"):
        image_list(tmp_path / "data")


# ----------------------------------------------------------------------------- bad images
def _folder_with_bad_images(root: Path) -> None:
    for i in range(6):
        _save(root / f"ok{i}.jpg", seed=i)
    good = (root / "ok0.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (root / "text.png").write_text("this is not a PNG")


def test_bad_image_stops_naming_it_and_leaves_nothing(tmp_path: Path) -> None:
    _folder_with_bad_images(tmp_path / "in")
    with pytest.raises(DatasetError, match=r"cannot read image .*(truncated\.jpg|text\.png).*--on-bad-image skip"):
        _import(image_folder(tmp_path / "in", size=8), tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == []  # no shard, no temp folder


@pytest.mark.parametrize("workers", [1, 2])
def test_bad_images_skipped_counted_and_listed(tmp_path: Path, workers: int) -> None:
    _folder_with_bad_images(tmp_path / "in")
    ss = _import(image_folder(tmp_path / "in", size=8), tmp_path / "out", on_bad_image="skip", workers=workers)
    assert ss.num_samples == 6 and ss.manifest["skipped"] == 2
    lines = (tmp_path / "out" / SKIPPED).read_text().splitlines()
    assert sorted(Path(line.split("\t")[0]).name for line in lines) == ["text.png", "truncated.jpg"]
    assert all(len(line.split("\t")) == 2 and line.split("\t")[1] for line in lines)  # with a reason


# ----------------------------------------------------------------------------- image modes
def test_cmyk_jpeg_becomes_its_rgb_colour(tmp_path: Path) -> None:
    p = _save(tmp_path / "cmyk.jpg", (32, 32), colour=(200, 30, 60), mode="CMYK", quality=95)
    assert Image.open(p).mode == "CMYK"
    out = load_image(p, 16)
    assert out.shape == (16, 16, 3) and np.abs(out.reshape(-1, 3).mean(0) - (200, 30, 60)).max() < 6


def test_palette_and_alpha_transparency_composited_on_white(tmp_path: Path) -> None:
    arr = np.zeros((16, 16), np.uint8)
    arr[:, 8:] = 1  # left: index 0 (transparent, stored as black), right: index 1 (red)
    pal = Image.fromarray(arr, "P")
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.save(tmp_path / "p.png", transparency=0)
    pal.save(tmp_path / "p.gif", transparency=0)
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[:, 8:] = (255, 0, 0, 255)  # left fully transparent black
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    Image.fromarray(rgba, "RGBA").convert("LA").save(tmp_path / "la.png")
    for name in ("p.png", "p.gif", "a.png"):
        assert Image.open(tmp_path / name).mode in ("P", "RGBA")
        out = load_image(tmp_path / name, 16)
        assert (out[:, :6] == 255).all(), name  # transparent: white, not the hidden black
        assert (out[:, 10:] == (255, 0, 0)).all(), name
    la = load_image(tmp_path / "la.png", 16, mode="L")
    assert (la[:, :6] == 255).all() and (la[:, 10:] < 100).all()
    pa = pal.convert("PA")  # PA exists only in memory (PNG cannot store it)
    pa.putalpha(Image.fromarray(np.where(arr == 0, 0, 255).astype(np.uint8)))
    pa = _to_mode(pa, "RGB")
    assert np.asarray(pa)[0, 0].tolist() == [255, 255, 255] and np.asarray(pa)[0, 15].tolist() == [255, 0, 0]


def test_16_bit_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    arr = np.zeros((16, 16), np.uint16)
    arr[:8] = 65535
    arr[8:] = 16384  # a quarter of the range: 64 in 8 bits; convert("L") would clip it to 255
    Image.fromarray(arr).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode == "I;16"
    out = load_image(tmp_path / "deep.png", 16)
    assert out.shape == (16, 16, 3)
    assert (out[:6] == 255).all() and (np.abs(out[10:].astype(int) - 64) <= 1).all()


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    arr = np.zeros((20, 40, 3), np.uint8)  # stored 40 wide x 20 tall: left red, right blue
    arr[:, :20] = (255, 0, 0)
    arr[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": shown 20 wide x 40 tall, red on top
    Image.fromarray(arr).save(tmp_path / "rot.jpg", exif=exif, quality=95)
    out = load_image(tmp_path / "rot.jpg", 20).astype(int)  # centre square of the upright image
    assert out[:6, :, 0].mean() > 200 and out[:6, :, 2].mean() < 60  # top: red
    assert out[-6:, :, 2].mean() > 200 and out[-6:, :, 0].mean() < 60  # bottom: blue


def test_grey_images_in_rgb_set_and_colour_in_grey_set(tmp_path: Path) -> None:
    grey = _save(tmp_path / "g.jpg", (20, 20), colour=(90, 90, 90), mode="L")
    colour = _save(tmp_path / "c.png", (20, 20), colour=(200, 30, 60))
    g = load_image(grey, 8)
    assert g.shape == (8, 8, 3) and (g[..., 0] == g[..., 1]).all() and (g[..., 1] == g[..., 2]).all()
    c = load_image(colour, 8, mode="L")
    assert c.shape == (8, 8, 1) and abs(int(c.mean()) - round(0.299 * 200 + 0.587 * 30 + 0.114 * 60)) <= 1
    src = image_folder(tmp_path, size=8)  # one set mixing both: one shape, 3 channels
    assert {s.image.shape for s in src} == {(8, 8, 3)}


def test_jpeg_draft_decode_matches_full_decode(tmp_path: Path) -> None:
    yy, xx = np.mgrid[0:300, 0:400]  # detail at a 14-px period: lost if decoded below 64 px
    wave = 127 + 120 * np.sin(2 * np.pi * xx / 14) * np.sin(2 * np.pi * yy / 14)
    arr = np.stack([wave, yy * 255 / 300, xx * 255 / 400], -1).astype(np.uint8)
    p = tmp_path / "big.jpg"
    Image.fromarray(arr).save(p, quality=95)
    fast = load_image(p, 64).astype(int)
    with Image.open(p) as im:  # reference: full-size decode, same crop and resize
        ref = np.asarray(im.convert("RGB").resize((64, 64), Image.BICUBIC, box=(50, 0, 350, 300))).astype(int)
    assert fast.shape == ref.shape and np.abs(fast - ref).mean() < 5  # ~2.5 here; ~11.5 from 1/8 scale
