"""C-channel and 16-bit images: .npy / TIFF pages / PNG-16 -> shards -> device normalisation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from selfsup.augment.views import normalize
from selfsup.launch.cli.main import main
from selfsup.pretrain.data.datasets import DatasetError
from selfsup.pretrain.data.folders import image_folder
from selfsup.pretrain.data.multichannel import load_channels
from selfsup.pretrain.data.stream import ShardSet, load_arrays

SIZE = 8


def _import(src: Path, out: Path, *extra: str) -> int:
    return main(["shards", "--source", "folder", "--path", str(src), "--out", str(out), "--size", str(SIZE),
                 "--multichannel", "--quiet", "--workers", "1", "--no-shuffle", *extra])  # fmt: skip


def _numpy_mean_std(arrays: list[np.ndarray], top: int) -> tuple[np.ndarray, np.ndarray]:
    stack = np.stack(arrays).astype(np.float64) / top
    return stack.mean(axis=(0, 1, 2)), stack.std(axis=(0, 1, 2))


def test_four_channel_npy_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {f"{c}/img{i}.npy": rng.integers(0, 256, (SIZE, SIZE, 4), dtype=np.uint8)
              for c in ("a", "b") for i in range(3)}  # fmt: skip
    for rel, a in arrays.items():
        (tmp_path / "src" / rel).parent.mkdir(parents=True, exist_ok=True)
        np.save(tmp_path / "src" / rel, a)
    assert _import(tmp_path / "src", tmp_path / "out") == 0
    ss = ShardSet.open(tmp_path / "out")
    assert ss.channels == 4 and ss.bits == 8 and ss.classes == ["a", "b"]
    images, labels, keys = load_arrays(ss)
    assert images.dtype == torch.uint8 and images.shape == (6, 4, SIZE, SIZE)
    want = [arrays[f"{'ab'[lab]}/img{k[-1]}.npy"] for lab, k in zip(labels.tolist(), keys, strict=True)]
    np.testing.assert_array_equal(images.numpy(), np.stack(want).transpose(0, 3, 1, 2))
    mean, std = _numpy_mean_std(list(arrays.values()), 255)
    np.testing.assert_allclose(ss.mean, mean, atol=1e-6)
    np.testing.assert_allclose(ss.std, std, atol=1e-6)


def _sixteen_bit_sources(root: Path) -> dict[str, np.ndarray]:
    """PNG-16 grey files and two-page 16-bit TIFFs, each with pixels above 255."""
    rng = np.random.default_rng(1)
    made = {}
    (root / "png").mkdir(parents=True)
    for i in range(2):
        a = rng.integers(0, 65536, (SIZE, SIZE, 1), dtype=np.uint16)
        a[0, 0, 0] = 40000
        Image.fromarray(a[..., 0]).save(root / "png" / f"g{i}.png")
        made[f"png/g{i}.png"] = a
    return made


def test_sixteen_bit_png_survives_to_the_device_bit_exact(tmp_path):
    made = _sixteen_bit_sources(tmp_path / "src")
    for rel, a in made.items():  # the decoder reads PNG-16 back exactly
        np.testing.assert_array_equal(load_channels(tmp_path / "src" / rel, SIZE, keep_depth=True), a)
    assert _import(tmp_path / "src", tmp_path / "out", "--keep-depth", "--labels", "none") == 0
    ss = ShardSet.open(tmp_path / "out")
    assert ss.bits == 16 and ss.manifest["extension"] == "u16"
    images, _, keys = load_arrays(ss)
    assert images.dtype == torch.int32 and int(images.max()) > 255
    want = np.stack([made[f"png/{k.rsplit('_', 1)[1]}.png"] for k in keys]).transpose(0, 3, 1, 2)
    np.testing.assert_array_equal(images.numpy(), want)
    mean, std = _numpy_mean_std(list(made.values()), 65535)
    np.testing.assert_allclose(ss.mean, mean, atol=1e-6)
    np.testing.assert_allclose(ss.std, std, atol=1e-6)
    got = normalize(images, ss.mean, ss.std).numpy()
    expect = ((want.astype(np.float32) / np.float32(65535)) - np.float32(ss.mean[0])) / np.float32(ss.std[0])
    np.testing.assert_allclose(got, expect, rtol=1e-6, atol=1e-6)
    # negative control: the 8-bit divide (what the path did before) is far off for pixels > 255
    wrong = ((want.astype(np.float32) / 255) - ss.mean[0]) / ss.std[0]
    assert np.abs(wrong - got).max() > 100
    # without --keep-depth the same files become 8-bit, scaled (not clipped)
    assert _import(tmp_path / "src", tmp_path / "out8", "--labels", "none") == 0
    ss8 = ShardSet.open(tmp_path / "out8")
    img8, _, keys8 = load_arrays(ss8)
    assert ss8.bits == 8 and img8.dtype == torch.uint8
    want8 = np.stack([made[f"png/{k.rsplit('_', 1)[1]}.png"] for k in keys8]).astype(np.int64)
    np.testing.assert_array_equal(img8.numpy(), ((want8 * 255 + 32767) // 65535).transpose(0, 3, 1, 2))


def test_tiff_pages_are_channels(tmp_path):
    rng = np.random.default_rng(2)
    a = rng.integers(0, 65536, (SIZE, SIZE, 3), dtype=np.uint16)
    pages = [Image.fromarray(a[..., c]) for c in range(3)]
    pages[0].save(tmp_path / "t.tif", save_all=True, append_images=pages[1:])
    np.testing.assert_array_equal(load_channels(tmp_path / "t.tif", SIZE, keep_depth=True), a)


def test_bad_inputs_name_the_file(tmp_path, capsys):
    (tmp_path / "ndim").mkdir()
    np.save(tmp_path / "ndim" / "bad.npy", np.zeros((2, 4, 4, 1), np.uint8))
    with pytest.raises(DatasetError, match=r"bad\.npy.*\[H, W, C\]"):
        image_folder(tmp_path / "ndim", mode="any").sample(0)
    pages = [Image.fromarray(np.zeros((8, 8), np.uint16)), Image.fromarray(np.zeros((4, 8), np.uint16))]
    pages[0].save(tmp_path / "pages.tif", save_all=True, append_images=pages[1:])
    with pytest.raises(DatasetError, match=r"pages\.tif.*pages differ"):
        load_channels(tmp_path / "pages.tif", 4)
    np.save(tmp_path / "wide.npy", np.zeros((4, 4, 17), np.uint16))
    with pytest.raises(DatasetError, match=r"wide\.npy: 17 channels"):
        load_channels(tmp_path / "wide.npy", 4)
    np.save(tmp_path / "float.npy", np.zeros((4, 4, 2), np.float32))
    with pytest.raises(DatasetError, match=r"float\.npy.*uint8 or uint16"):
        load_channels(tmp_path / "float.npy", 4)
    (tmp_path / "mixed").mkdir()
    np.save(tmp_path / "mixed" / "a_four.npy", np.zeros((SIZE, SIZE, 4), np.uint8))
    np.save(tmp_path / "mixed" / "b_two.npy", np.zeros((SIZE, SIZE, 2), np.uint8))
    assert _import(tmp_path / "mixed", tmp_path / "out", "--labels", "none") == 2
    out = capsys.readouterr().out
    assert "b_two" in out and "differs" in out, out


def test_views_on_four_channels_refuse_grayscale_by_key_and_jitter_per_channel():
    from selfsup.augment.pixels import channel_jitter
    from selfsup.augment.views import AugmentConfig, Views

    with pytest.raises(ValueError, match=r"augment\.gray_p"):
        Views(AugmentConfig(), 4, SIZE, [0.5], [0.25])
    views = Views(AugmentConfig(gray_p=0.0, jitter_p=1.0), 4, SIZE, [0.5], [0.25])
    x = torch.randint(0, 256, (3, 4, SIZE, SIZE), dtype=torch.uint8)
    out = views(x, n_views=2, generator=torch.Generator().manual_seed(0))
    assert len(out) == 2 and out[0].shape == (3, 4, SIZE, SIZE) and torch.isfinite(out[0]).all()
    # the per-channel jitter against numpy: contrast around each channel's own mean
    x01 = np.random.default_rng(3).random((2, 4, 5, 5))
    f = np.array([[1.2, 0.6, 1.0, 0.0], [0.9, 1.4, 1.0, 0.0]])
    y = np.clip(x01 * f[:, :1, None, None], 0, 1)
    y = np.clip(y * f[:, 1:2, None, None] + y.mean(axis=(2, 3), keepdims=True) * (1 - f[:, 1:2, None, None]), 0, 1)
    got = channel_jitter(torch.from_numpy(x01), torch.from_numpy(f)).numpy()
    np.testing.assert_allclose(got, y, rtol=1e-12)
    # negative control: one mean over all channels (kornia's rule for C != 3) differs
    allmean = np.clip(x01 * f[:, :1, None, None], 0, 1)
    allmean = allmean * f[:, 1:2, None, None] + allmean.mean(axis=(1, 2, 3), keepdims=True) * (1 - f[:, 1:2, None, None])
    assert np.abs(np.clip(allmean, 0, 1) - got).max() > 1e-3


def test_grid_shows_chosen_channels():
    from selfsup.augment.grid import make_grid, shown_channels

    img = torch.rand(5, 4, 4)
    assert torch.equal(shown_channels(img), img[:3])
    assert torch.equal(shown_channels(img, [4, 0, 2]), img[[4, 0, 2]])
    with pytest.raises(ValueError, match="0..4"):
        shown_channels(img, [5])
    tile = np.asarray(make_grid([[img]], tile=4, pad=0, channels=[4]))
    np.testing.assert_array_equal(tile[..., 0], (img[4].numpy() * 255).round().astype(np.uint8))
