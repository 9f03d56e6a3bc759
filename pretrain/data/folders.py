"""Image files as a dataset source: folders (labelled by sub-folder, or not) and list files.

``image_folder(root, labels=...)`` takes every image under ``root``:

* ``labels="folders"``: ``root/<class>/.../<image>``, the label is the first-level sub-folder
  (every non-hidden sub-folder is a class, sorted by name, as torchvision's ImageFolder does);
  an image directly in ``root`` is an error that names it.
* ``labels="none"``: every image at any depth, unlabelled (label -1, no classes).
* ``labels="auto"`` (default): ``folders`` when every image sits in a first-level sub-folder,
  else ``none``. ``describe()`` says which was chosen and why.

``image_list(path)`` reads a list file: one image path per line, optionally followed by a label
after a tab or a comma (split at the last one; a path containing a comma needs the tab form).
Relative paths are resolved against the list file's folder. Blank lines and ``#`` comments are
skipped. Either every line has a label or none has; when every label is a non-negative integer
it is used as the class index, otherwise labels are class names (sorted).

Every image is decoded the way a viewer shows it (``load_image``): EXIF orientation applied,
palette and alpha composited onto white, CMYK converted, 16-bit scaled (not clipped) to 8 bits,
then resized so that its shorter side is ``size`` and centre-cropped square. JPEGs are decoded at
a reduced scale when that still leaves at least ``size`` pixels (``Image.draft``: the DCT does
the first downscale, ~2x faster than decoding at full size and resizing). An unreadable file is a
``DatasetError`` naming it.

This module imports only numpy and PIL, so that import worker processes start fast.
"""

from __future__ import annotations

import os
import re
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from selfsup.pretrain.data.datasets import IMAGE_SUFFIXES, DatasetError, Sample
from selfsup.pretrain.data.multichannel import ARRAY_SUFFIXES, load_channels

LABEL_MODES = ("auto", "folders", "none")
BACKGROUND = (255, 255, 255)  # what transparent pixels become (a viewer on a white page)
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")
# what PIL raises on broken, truncated, unsupported or huge files
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, Image.DecompressionBombError)


# ------------------------------------------------------------------------------- one image
def _to_mode(im: Image.Image, mode: str) -> Image.Image:
    """Convert to ``RGB`` or ``L`` as a viewer would show the image."""
    if im.mode in _SIXTEEN_BIT:  # 16-bit grey: scale 0..65535 to 0..255 (convert() would clip)
        a = np.clip(np.asarray(im).astype(np.int64), 0, 65535)
        im = Image.fromarray(((a * 255 + 32767) // 65535).astype(np.uint8), "L")
    elif im.mode == "F":  # float images: [0, 1] is the usual range
        a = np.clip(np.asarray(im, dtype=np.float64), 0.0, 1.0)
        im = Image.fromarray(np.round(a * 255).astype(np.uint8), "L")
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    elif im.mode == "PA":
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "La", "RGBa") or (im.mode in ("L", "RGB") and "transparency" in im.info):
        rgba = im.convert("RGBA")
        im = Image.alpha_composite(Image.new("RGBA", im.size, (*BACKGROUND, 255)), rgba)
    return im if im.mode == mode else im.convert(mode)


def load_image(path: str | Path, size: int, mode: str = "RGB") -> np.ndarray:
    """Decode one file to uint8 ``[size, size, C]`` (``C`` = 3 for RGB, 1 for L); see the module
    docstring for what is done to it. Raises what PIL raises."""
    with Image.open(path) as im:
        im.draft(im.mode, (size, size))  # JPEG only: decode at 1/2, 1/4 or 1/8 scale when >= size
        ImageOps.exif_transpose(im, in_place=True)
        im = _to_mode(im, mode)
        w, h = im.size
        side = min(w, h)
        box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
        im = im.resize((size, size), Image.BICUBIC, box=box, reducing_gap=3.0)
        arr = np.asarray(im, dtype=np.uint8)
    return arr[..., None] if arr.ndim == 2 else arr


# ------------------------------------------------------------------------------- the source
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def _key(index: int, rel: str) -> str:
    """Unique (the index), readable (the path's tail) sample key, short and ASCII for a plain tar header."""
    tail = _UNSAFE.sub("_", rel.rsplit(".", 1)[0] if "." in Path(rel).name else rel).strip("_")
    return f"{index:08d}_{tail[-80:]}" if tail else f"{index:08d}"


class ImageFiles:
    """A list of image files, with labels (``labels[i]`` indexes ``classes``) or without
    (``labels=None``: every sample's label is -1 and ``classes`` is empty)."""

    def __init__(self, files: list[Path], labels: list[int] | None, classes: list[str], *,
                 root: Path, size: int = 64, mode: str = "RGB", name: str = "images",
                 how: str = "", origin: Path | None = None, keep_depth: bool = False) -> None:  # fmt: skip
        if mode not in ("RGB", "L", "any"):
            raise DatasetError(f"image mode must be RGB, L or any (multichannel.py), got {mode!r}")
        if size < 1:
            raise DatasetError(f"image size must be >= 1, got {size}")
        if labels is not None and len(labels) != len(files):
            raise DatasetError(f"{len(files)} files but {len(labels)} labels")
        self.files, self.labels, self.classes = files, labels, list(classes)
        self.root, self.size, self.mode, self.name, self.how = root, size, mode, name, how
        self.origin = origin or root  # the folder or list file the user named
        self.keep_depth = keep_depth  # mode "any": keep 16-bit pixels as uint16

    @property
    def labelled(self) -> bool:
        return self.labels is not None

    def __len__(self) -> int:
        return len(self.files)

    def describe(self) -> str:
        what = (f"labels from {len(self.classes)} classes ({', '.join(self.classes[:5])}"
                f"{', ...' if len(self.classes) > 5 else ''})") if self.labelled else "unlabelled"
        hint = "; --labels none ignores them" if self.labelled and self.how.startswith("auto") else ""
        return f"{self.origin}: {len(self)} images, {what}{f' ({self.how}{hint})' if self.how else ''}"

    def key(self, i: int) -> str:
        path = self.files[i]
        try:
            rel = path.relative_to(self.root).as_posix()
        except ValueError:  # a list file may name images anywhere
            rel = path.as_posix()
        return _key(i, rel)

    def load(self, path: Path) -> np.ndarray:
        if self.mode == "any":  # C channels at 8 or 16 bits, from .npy / TIFF pages / PNG-16
            return load_channels(path, self.size, self.keep_depth)
        return load_image(path, self.size, self.mode)

    def sample(self, i: int) -> Sample:
        path = self.files[i]
        try:
            image = self.load(path)
        except _DECODE_ERRORS as e:  # name the unreadable file, not the decoder's internals
            raise DatasetError(f"cannot read image {path}: {e}") from e
        return Sample(image, self.labels[i] if self.labels is not None else -1, self.key(i))

    def __iter__(self) -> Iterator[Sample]:
        for i in range(len(self.files)):
            yield self.sample(i)


# ------------------------------------------------------------------------------- folders
def _walk_images(root: Path, suffixes: set[str] = IMAGE_SUFFIXES) -> list[Path]:
    """Every image file under ``root`` (following links, skipping hidden names), sorted."""
    found: list[tuple[str, ...]] = []
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen:  # a link loop
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel = Path(dirpath).relative_to(root).parts
        found += [(*rel, f) for f in filenames
                  if not f.startswith(".") and os.path.splitext(f)[1].lower() in suffixes]  # fmt: skip
    return [root.joinpath(*parts) for parts in sorted(found)]


def image_folder(root: str | Path, labels: str = "auto", size: int = 64, mode: str = "RGB",
                 keep_depth: bool = False) -> ImageFiles:  # fmt: skip
    """A folder of images, labelled by first-level sub-folder or not (see the module docstring)."""
    root = Path(root)
    if labels not in LABEL_MODES:
        raise DatasetError(f"labels must be one of {', '.join(LABEL_MODES)}, got {labels!r}")
    if not root.is_dir():
        hint = " (for a list of image paths use --source list)" if root.is_file() else ""
        raise DatasetError(f"image folder not found: {root}{hint}")
    suffixes = IMAGE_SUFFIXES | ARRAY_SUFFIXES if mode == "any" else IMAGE_SUFFIXES
    files = _walk_images(root, suffixes)
    if not files:
        raise DatasetError(f"{root}: no images with suffix {sorted(suffixes)} (hidden files are skipped)")
    top = [f for f in files if f.parent == root]
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    name = root.resolve().name or "images"
    if labels == "folders" and not classes:
        raise DatasetError(f"{root}: no class sub-folders (--labels folders expects root/<class>/<image>)")
    if labels == "folders" and top:
        raise DatasetError(
            f"{top[0]} is not in a class sub-folder ({len(top)} images directly in {root}); "
            "--labels folders expects root/<class>/<image>: move them, or use --labels none"
        )
    if labels == "none" or (labels == "auto" and top):
        how = "--labels none" if labels == "none" else f"auto: {len(top)} images directly in the folder"
        return ImageFiles(files, None, [], root=root, size=size, mode=mode, name=name, how=how, keep_depth=keep_depth)
    index = {c: i for i, c in enumerate(classes)}
    targets = [index[f.relative_to(root).parts[0]] for f in files]
    how = "--labels folders" if labels == "folders" else "auto: every image is in a sub-folder"
    return ImageFiles(files, targets, classes, root=root, size=size, mode=mode, name=name, how=how,
                      keep_depth=keep_depth)  # fmt: skip


# ------------------------------------------------------------------------------- list files
def image_list(path: str | Path, size: int = 64, mode: str = "RGB", labels: str = "auto") -> ImageFiles:
    """A list file of image paths with optional labels (see the module docstring);
    ``labels="none"`` ignores the labels the file has."""
    path = Path(path)
    if labels not in ("auto", "none"):
        raise DatasetError(f"a list file takes its labels from the file: labels must be auto or none, got {labels!r}")
    if not path.is_file():
        hint = " (for a folder of images use --source folder)" if path.is_dir() else ""
        raise DatasetError(f"list file not found: {path}{hint}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path}: not a UTF-8 text file ({e})") from e
    base = path.parent
    files: list[Path] = []
    names: list[str | None] = []
    first_line = 0
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        sep = "\t" if "\t" in line else ("," if "," in line else None)
        name, label = (line, None) if sep is None else (s.strip() for s in line.rsplit(sep, 1))
        if not name or label == "":
            raise DatasetError(f"{path} line {lineno}: expected PATH or PATH<tab>LABEL, got {raw!r}")
        if names and (label is None) != (names[0] is None):
            which = "no label" if label is None else "a label"
            raise DatasetError(
                f"{path} line {lineno}: {which}, unlike line {first_line} "
                "(give every line a label, or none)"
            )
        first_line = first_line or lineno
        p = Path(name).expanduser()
        files.append(p if p.is_absolute() else base / p)
        names.append(label)
    if not files:
        raise DatasetError(f"{path}: no image paths in the list file")
    list_name = path.stem or "images"
    if names[0] is None or labels == "none":
        how = "--labels none" if names[0] is not None else f"no labels in {path.name}"
        return ImageFiles(files, None, [], root=base, size=size, mode=mode, name=list_name, how=how, origin=path)
    if all(re.fullmatch(r"[0-9]+", n) for n in names):  # type: ignore[arg-type]
        targets = [int(n) for n in names]  # type: ignore[arg-type]
        classes = [str(c) for c in range(max(targets) + 1)]
        how = f"integer labels in {path.name}"
    else:
        classes = sorted(set(names))  # type: ignore[arg-type]
        index = {c: i for i, c in enumerate(classes)}
        targets = [index[n] for n in names]  # type: ignore[index]
        how = f"class names in {path.name}"
    return ImageFiles(files, targets, classes, root=base, size=size, mode=mode, name=list_name, how=how,
                      origin=path)  # fmt: skip
