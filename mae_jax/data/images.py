"""Image sets on disk, their bytes opened and decoded: ``ImageFolder``, ``open_image``,
``decode_bytes`` / ``decode_rgb`` and ``DataError``.

Images are decoded with Pillow as 8-bit RGB, or as grayscale for 1-channel models
(``channels=1``); 16-bit grayscale is scaled, not clipped, and alpha is dropped. The record
directories (``mae_jax.data.records``) and the loaders (``mae_jax.data.loaders``) stand on
this module.
"""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image

from mae_jax.normalization import check_channels

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
# Pillow mode of the decoded pixels for each supported channel count.
CHANNEL_MODES = {1: "L", 3: "RGB"}
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


class DataError(ValueError):
    """Bad input data (missing folder, no images, unreadable files); the message names the path."""


# ----------------------------------------------------------------------------------------------
# Listing
# ----------------------------------------------------------------------------------------------


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def _images_under(folder: str) -> list[str]:
    """All image files below ``folder`` (recursive, following links), sorted by relative path."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found.extend(os.path.join(dirpath, f) for f in filenames if _is_image_name(f))
    return sorted(found, key=lambda p: os.path.relpath(p, folder))


class ImageFolder:
    """The images of a folder and their labels.

    Layout: either one sub-folder per class (label = index of the class name in sorted order, images
    found recursively inside), or a flat folder of images (label 0, ``classes == ("",)``). Hidden
    files and folders are ignored. Attributes: ``root``, ``classes``, ``paths`` (N,) and ``labels``
    (N,) int32, both sorted by class then path.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = os.fspath(root)
        if not os.path.exists(self.root):
            raise DataError(f"{self.root}: folder does not exist")
        if not os.path.isdir(self.root):
            raise DataError(f"{self.root}: is not a folder")
        entries = sorted(e for e in os.listdir(self.root) if not e.startswith("."))
        subdirs = [e for e in entries if os.path.isdir(os.path.join(self.root, e))]
        flat_files = [
            os.path.join(self.root, e)
            for e in entries
            if _is_image_name(e) and os.path.isfile(os.path.join(self.root, e))
        ]
        per_class = {d: _images_under(os.path.join(self.root, d)) for d in subdirs}
        class_mode = any(per_class.values())
        if class_mode and flat_files:
            raise DataError(
                f"{self.root}: holds both image files and class sub-folders; "
                "put every image in a class folder, or use a flat folder without sub-folders"
            )
        if not class_mode and not flat_files:
            looked_for = ", ".join(IMAGE_EXTENSIONS)
            raise DataError(f"{self.root}: no images found (looked for {looked_for})")
        if class_mode:
            empty = [d for d in subdirs if not per_class[d]]
            if empty:
                # Same rule as torchvision's ImageFolder: an empty class would shift no label but
                # can never be sampled, which is almost always a mistake in the folder.
                raise DataError(f"{os.path.join(self.root, empty[0])}: class folder has no images")
            self.classes = tuple(subdirs)
            paths = [p for d in subdirs for p in per_class[d]]
            labels = [i for i, d in enumerate(subdirs) for _ in per_class[d]]
        else:
            self.classes = ("",)
            paths, labels = flat_files, [0] * len(flat_files)
        self.paths = tuple(paths)
        self.labels = np.asarray(labels, dtype=np.int32)

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, index: int) -> tuple[bytes, str]:
        """Image ``index``'s encoded file bytes and its path (for messages); DataError if unreadable."""
        path = self.paths[index]
        try:
            with open(path, "rb") as f:
                return f.read(), path
        except OSError as err:
            raise DataError(f"{path}: cannot read file ({err.strerror or err})") from err

    def __repr__(self) -> str:
        return f"ImageFolder({self.root!r}: {len(self)} images, {len(self.classes)} classes)"


# ----------------------------------------------------------------------------------------------
# Opening
# ----------------------------------------------------------------------------------------------


def cannot_decode(name: str, err: Exception) -> DataError:
    return DataError(f"{name}: cannot decode image ({type(err).__name__}: {err})")


def open_image(encoded: bytes, name: str) -> Image.Image:
    """Encoded image bytes opened by Pillow: header read, pixels not decoded yet.

    ``name`` (a path, or a record's description) is what a DataError names on failure.
    """
    try:
        return Image.open(io.BytesIO(encoded))
    except Exception as err:  # any failure inside Pillow means the file is unusable
        raise cannot_decode(name, err) from err


# ----------------------------------------------------------------------------------------------
# Decoding
# ----------------------------------------------------------------------------------------------


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow image as 8-bit RGB; alpha is dropped (as torchvision's loader does)."""
    return to_channels(img, 3)


def to_channels(img: Image.Image, channels: int = 3) -> Image.Image:
    """Any Pillow image as 8-bit pixels of ``channels`` channels: 3 is RGB, 1 is grayscale
    (Pillow's ITU-R 601-2 luma, what torchvision's Grayscale computes). Alpha is dropped."""
    mode = _mode_of(channels)
    if img.mode == mode:
        return img
    if img.mode in _SIXTEEN_BIT_MODES:
        # Pillow's own conversion clips 16-bit values at 255 (a white image); scale instead.
        wide = np.clip(np.asarray(img, dtype=np.int64), 0, 65535)
        gray = ((wide * 255 + 32767) // 65535).astype(np.uint8)
        return Image.fromarray(gray if channels == 1 else np.repeat(gray[:, :, None], 3, axis=2))
    if img.mode == "P" and "transparency" in img.info:
        # Going through RGBA avoids Pillow's warning about palette transparency.
        img = img.convert("RGBA")
    return img.convert(mode)


def _mode_of(channels: int) -> str:
    check_channels(channels)
    return CHANNEL_MODES[channels]


def pixel_array(img: Image.Image) -> np.ndarray:
    """A decoded 8-bit image as (H, W, C) uint8: grayscale gets its channel axis."""
    pixels = np.asarray(img)
    return pixels[:, :, None] if pixels.ndim == 2 else pixels


def decode_bytes(encoded: bytes, name: str, channels: int = 3) -> Image.Image:
    """Encoded image bytes fully decoded and converted to RGB (``channels`` 3) or grayscale (1);
    DataError naming ``name``."""
    img = open_image(encoded, name)
    try:
        img.load()
        return to_channels(img, channels)
    except Exception as err:
        raise cannot_decode(name, err) from err


def decode_rgb(path: str | os.PathLike, channels: int = 3) -> Image.Image:
    """Open, fully decode and convert one image file to RGB (or grayscale with ``channels`` 1);
    DataError naming the file on failure."""
    try:
        with Image.open(path) as img:
            img.load()
            return to_channels(img, channels)
    except Exception as err:  # any failure inside Pillow means the file is unusable
        raise cannot_decode(os.fspath(path), err) from err
