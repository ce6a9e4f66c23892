"""Image sets on disk and the opening of their bytes: ``ImageFolder``, ``open_image`` and
``DataError``, the floor that both ``mae_jax.records`` and ``mae_jax.data`` stand on.

``mae_jax.data`` re-exports these names (``data.ImageFolder``, ``data.DataError``, ...).
"""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


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
