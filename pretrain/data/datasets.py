"""Dataset sources that ``selfsup shards`` turns into WebDataset shards.

Every source yields ``Sample(image, label, key)`` with ``image`` a uint8 array ``[H, W, C]`` and
exposes ``classes`` (empty for an unlabelled source, whose labels are -1). Sources read from disk
lazily where they can (image folders and list files, ``folders.py``), so writing shards of a large
folder never holds it in memory. The embedded default dataset ships inside the package so the
demo and tests need no network and no apt.
"""

from __future__ import annotations

import colorsys
import gzip
import pickle
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from selfsup.pretrain.data.factors import FactorSpec

FASHION_MNIST_CLASSES = [
    "t-shirt/top", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle boot",
]  # fmt: skip
FASHION_MNIST_DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


class DatasetError(ValueError):
    """A dataset path or file is missing or not in the expected format."""


@dataclass
class Sample:
    image: np.ndarray  # uint8 [H, W, C]
    label: int
    key: str
    factors: np.ndarray | None = None  # generating factors [F] (see selfsup.pretrain.data.factors)


@dataclass
class ArraySource:
    """An in-memory dataset: uint8 images ``[N, H, W, C]``, integer labels and, optionally,
    generating factors ``[N, F]`` described by ``factor_specs``."""

    name: str
    images: np.ndarray
    labels: np.ndarray
    classes: list[str]
    factors: np.ndarray | None = None
    factor_specs: list[FactorSpec] | None = None

    def __len__(self) -> int:
        return len(self.images)

    def sample(self, i: int) -> Sample:
        fac = None if self.factors is None else self.factors[i]
        return Sample(self.images[i], int(self.labels[i]), f"{self.name}-{i:08d}", fac)

    def __iter__(self) -> Iterator[Sample]:
        for i in range(len(self.images)):
            yield self.sample(i)


# --------------------------------------------------------------------------- Fashion-MNIST (idx)
def _read_idx(path: Path) -> np.ndarray:
    """Read an idx file (optionally gzipped) as in LeCun's MNIST format."""
    if not path.is_file():
        raise DatasetError(f"idx file not found: {path}")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DatasetError(f"{path} is not a uint8 idx file")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise DatasetError(f"{path}: header says {dims} but holds {body.size} bytes (truncated?)")
    return body.reshape(dims)


def fashion_mnist(root: str | Path = FASHION_MNIST_DEBIAN_DIR, split: str = "train") -> ArraySource:
    """Full Fashion-MNIST from its idx files (Debian's ``dataset-fashion-mnist`` or any folder)."""
    root = Path(root)
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise DatasetError(f"fashion-mnist split must be train or test, got {split!r}")

    def find(stem: str) -> Path:
        for name in (f"{stem}.gz", stem):
            if (root / name).is_file():
                return root / name
        raise DatasetError(f"{root}: no {stem}[.gz] (is this a Fashion-MNIST idx folder?)")

    images = _read_idx(find(f"{prefix}-images-idx3-ubyte"))[..., None]
    labels = _read_idx(find(f"{prefix}-labels-idx1-ubyte")).astype(np.int64)
    return ArraySource(f"fmnist-{split}", images, labels, list(FASHION_MNIST_CLASSES))


# --------------------------------------------------------------------------- embedded default set
EMBEDDED_FILE = "fashion_mnist_subset.npz"


def build_embedded_subset(
    root: str | Path, out: str | Path, per_class_train: int = 1000, per_class_test: int = 200
) -> None:
    """Write the stratified subset shipped as the embedded default dataset (run once, by hand).

    ``python -c "from selfsup.pretrain.data.datasets import build_embedded_subset as b;
    b('/usr/share/datasets/fashion-mnist', 'pretrain/data/fashion_mnist_subset.npz')"``
    """
    rng = np.random.default_rng(0)
    arrays = {}
    for split, per_class in (("train", per_class_train), ("test", per_class_test)):
        src = fashion_mnist(root, split)
        picks = [
            np.sort(rng.choice(np.flatnonzero(src.labels == c), per_class, replace=False))
            for c in range(len(src.classes))
        ]
        idx = np.sort(np.concatenate(picks))
        arrays[f"{split}_images"] = src.images[idx, :, :, 0]
        arrays[f"{split}_labels"] = src.labels[idx].astype(np.uint8)
    np.savez_compressed(out, **arrays)


def embedded(split: str = "train") -> ArraySource:
    """The embedded default dataset: stratified Fashion-MNIST subset, 10k train / 2k test, 28x28x1.

    Fashion-MNIST is (c) 2017 Zalando SE, MIT licence (see ``pretrain/data/LICENSE-fashion-mnist.txt``).
    """
    if split not in ("train", "test"):
        raise DatasetError(f"embedded split must be train or test, got {split!r}")
    with resources.files("selfsup.pretrain.data").joinpath(EMBEDDED_FILE).open("rb") as f:
        data = np.load(f)
        images = data[f"{split}_images"][..., None]
        labels = data[f"{split}_labels"].astype(np.int64)
    return ArraySource(f"embedded-{split}", images, labels, list(FASHION_MNIST_CLASSES))


# --------------------------------------------------------------------------- CIFAR python batches
def cifar(root: str | Path, split: str = "train") -> ArraySource:
    """CIFAR-10 or CIFAR-100 from the python-pickle batch folder users download.

    CIFAR-10: ``data_batch_1..5`` / ``test_batch`` + ``batches.meta``;
    CIFAR-100: ``train`` / ``test`` + ``meta`` (fine labels). The pickles are the dataset's own
    format; only open folders you trust.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"CIFAR folder not found: {root}")

    def unpickle(path: Path) -> dict:
        if not path.is_file():
            raise DatasetError(f"CIFAR batch file missing: {path}")
        with open(path, "rb") as f:
            return pickle.load(f, encoding="latin1")

    if (root / "batches.meta").is_file():
        names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        classes = unpickle(root / "batches.meta")["label_names"]
        label_key = "labels"
    elif (root / "meta").is_file():
        names = ["train"] if split == "train" else ["test"]
        classes = unpickle(root / "meta")["fine_label_names"]
        label_key = "fine_labels"
    else:
        raise DatasetError(f"{root}: neither batches.meta (CIFAR-10) nor meta (CIFAR-100) found")
    if split not in ("train", "test"):
        raise DatasetError(f"CIFAR split must be train or test, got {split!r}")
    batches = [unpickle(root / n) for n in names]
    images = np.concatenate([b["data"] for b in batches]).reshape(-1, 3, 32, 32)
    labels = np.concatenate([np.asarray(b[label_key]) for b in batches]).astype(np.int64)
    name = "cifar100" if label_key == "fine_labels" else "cifar10"
    return ArraySource(f"{name}-{split}", images.transpose(0, 2, 3, 1).copy(), labels, classes)


# --------------------------------------------------------------------------- image files
# folders (labelled by sub-folder or not) and list files live in folders.py (ImageFiles)


# --------------------------------------------------------------------------- procedural shapes
SHAPES = ["circle", "square", "triangle", "cross", "ring", "star"]
# The factors shapes() records per image, in this order. Not recorded (also drawn, also nuisances):
# the two background colours, the texture's phase and stripe angle, the shape colour's saturation
# and value, and the pixel noise. Rotation is invisible for circle and ring and periodic (2π/4 for
# square and cross, 2π/5 for star), as dSprites' orientation is for its symmetric shapes.
SHAPE_FACTORS = [
    FactorSpec("shape", "discrete", tuple(SHAPES)),
    FactorSpec("hue", "continuous", low=0.0, high=1.0, period=1.0),  # HSV hue of the shape colour
    FactorSpec("x", "continuous", low=0.3, high=0.7),  # centre, fraction of the width
    FactorSpec("y", "continuous", low=0.3, high=0.7),
    FactorSpec("scale", "continuous", low=0.15, high=0.3),  # size, fraction of the side
    FactorSpec("rotation", "continuous", low=0.0, high=2 * np.pi, period=2 * np.pi),
    FactorSpec("background", "discrete", ("stripes", "checker")),  # texture kind
    FactorSpec("frequency", "continuous", low=2.0, high=8.0),  # texture frequency, cycles/side
]


def shapes(n: int, size: int = 32, seed: int = 0, name: str = "shapes") -> ArraySource:
    """Procedural RGB images: label = shape; nuisances = colour, position, scale, rotation and a
    textured background, all drawn from ``seed``. Our RGB dataset of any size and resolution.
    The generating factors (``SHAPE_FACTORS``) of each image are kept in ``factors`` [N, 8]."""
    if n <= 0 or size < 8:
        raise DatasetError(f"shapes needs n > 0 and size >= 8, got n={n}, size={size}")
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    labels = rng.integers(0, len(SHAPES), n)
    factors = np.empty((n, len(SHAPE_FACTORS)), dtype=np.float64)
    for i in range(n):
        drawn: dict[str, float] = {}
        images[i] = _draw_shape(rng, int(labels[i]), xx, yy, drawn)
        factors[i] = [drawn[f.name] for f in SHAPE_FACTORS]
    return ArraySource(name, images, labels.astype(np.int64), list(SHAPES), factors, list(SHAPE_FACTORS))


def _draw_shape(
    rng: np.random.Generator, label: int, xx: np.ndarray, yy: np.ndarray, drawn: dict | None = None
) -> np.ndarray:
    """One image; ``drawn`` (if given) receives the SHAPE_FACTORS values. Recording them draws
    nothing from ``rng``, so the images are the same with or without it."""
    # background: two random colours mixed by a random stripe/checker texture
    c0, c1 = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
    freq, phase = rng.uniform(2, 8), rng.uniform(0, 2 * np.pi)
    theta_bg = rng.uniform(0, np.pi)
    stripes = rng.random() < 0.5
    if stripes:
        tex = 0.5 + 0.5 * np.sin(2 * np.pi * freq * (xx * np.cos(theta_bg) + yy * np.sin(theta_bg)) + phase)
    else:
        tex = ((np.floor(xx * freq) + np.floor(yy * freq)) % 2).astype(np.float32)
    img = c0 * (1 - tex[..., None] * 0.35) * 0.6 + c1 * tex[..., None] * 0.25
    # foreground shape in shape-local coordinates
    cx, cy = rng.uniform(0.3, 0.7, 2)
    scale = rng.uniform(0.15, 0.3)
    rot = rng.uniform(0, 2 * np.pi)
    u = ((xx - cx) * np.cos(rot) + (yy - cy) * np.sin(rot)) / scale
    v = (-(xx - cx) * np.sin(rot) + (yy - cy) * np.cos(rot)) / scale
    r = np.hypot(u, v)
    name = SHAPES[label]
    if name == "circle":
        mask = r < 1
    elif name == "square":
        mask = (np.abs(u) < 0.85) & (np.abs(v) < 0.85)
    elif name == "triangle":
        mask = (v > -0.6) & (v < 1.2 - 1.9 * np.abs(u)) & (np.abs(u) < 1)
    elif name == "cross":
        mask = ((np.abs(u) < 0.3) & (np.abs(v) < 1)) | ((np.abs(v) < 0.3) & (np.abs(u) < 1))
    elif name == "ring":
        mask = (r < 1) & (r > 0.55)
    else:  # star: radius modulated by angle
        mask = r < 0.55 + 0.45 * np.cos(5 * np.arctan2(v, u))
    colour = rng.uniform(0.3, 1, 3)
    if drawn is not None:
        drawn.update(shape=label, hue=colorsys.rgb_to_hsv(*colour)[0], x=cx, y=cy, scale=scale,
                     rotation=rot, background=0 if stripes else 1, frequency=freq)
    img = np.where(mask[..., None], colour, img)
    img = img + rng.normal(0, 0.03, img.shape)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)
