"""The official transforms, on the host in NumPy (NHWC, no torch), and the normalisation on the
device.

- ``pretrain_crop`` is the official pretraining augmentation on uint8 pixels: RandomResizedCrop
  (scale (0.2, 1), ratio (3/4, 4/3), bicubic) with torchvision's sampling algorithm, then a
  horizontal flip with p=0.5. A JPEG that is opened but not yet decoded is decoded at a reduced
  DCT scale (Pillow's draft mode) when the crop stays at least ``size`` pixels on both sides.
  ``pretrain_transform`` adds ToTensor and ImageNet normalisation, in float32 like torchvision.
- ``eval_transform`` is the official classifier evaluation transform (shorter side to
  int(size / 0.875), bicubic, centre crop, normalise).
- ``normalize_on_device`` (jax.numpy, ``Normalization.on_device``) is what the train step calls
  on uint8 batches: the same values as ``normalize``, bit for bit.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from mae_jax.data.images import cannot_decode, decode_rgb, pixel_array, to_channels
from mae_jax.normalization import IMAGENET, Normalization

if TYPE_CHECKING:
    import jax

PRETRAIN_SCALE = (0.2, 1.0)
PRETRAIN_RATIO = (3.0 / 4.0, 4.0 / 3.0)
# Official classifier evaluation: resize to size / crop_pct, then centre-crop size.
EVAL_CROP_PCT = 224 / 256
# The DCT scale reductions libjpeg offers through Pillow's draft mode, largest first.
JPEG_DRAFT_SCALES = (8, 4, 2)

# transform(img, rng, size) -> (size, size, C) float32 pixels, img a decoded RGB (or grayscale)
# image
Transform = Callable[[Image.Image, np.random.Generator, int], np.ndarray]


# ----------------------------------------------------------------------------------------------
# Transforms
# ----------------------------------------------------------------------------------------------


def random_resized_crop_box(
    rng: np.random.Generator,
    width: int,
    height: int,
    scale: tuple[float, float] = PRETRAIN_SCALE,
    ratio: tuple[float, float] = PRETRAIN_RATIO,
) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop box for a width x height image: (top, left, h, w).

    Up to 10 tries draw an area fraction uniformly in ``scale`` and an aspect ratio (w/h)
    log-uniformly in ``ratio``; the first box that fits is placed uniformly. If none fits, the
    fallback is a centred box of the whole image with its aspect ratio clamped into ``ratio``.
    """
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    image_ratio = width / height
    if image_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif image_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def draft_scale(img: Image.Image, box_h: int, box_w: int, size: int) -> int:
    """The JPEG draft reduction (8, 4, 2 or 1) for cropping an h x w box to ``size``.

    The largest reduction that keeps the box at least ``size`` pixels on both sides, so the
    bicubic resize still only shrinks; 1 when the image is not a JPEG or is already decoded.
    """
    if img.format != "JPEG" or len(getattr(img, "tile", ())) != 1:
        return 1
    for scale in JPEG_DRAFT_SCALES:
        if box_w >= scale * size and box_h >= scale * size:
            return scale
    return 1


def decode_for_crop(
    img: Image.Image,
    box: tuple[int, int, int, int],
    size: int,
    name: str = "image",
    channels: int = 3,
) -> tuple[Image.Image, int]:
    """Decodes ``img`` (opened, maybe not yet decoded) as RGB (or grayscale: ``channels`` 1) for
    cropping ``box`` to ``size``.

    Returns (the RGB image, its reduction: 1, 2, 4 or 8, the box's coordinates divided by it).
    A not-yet-decoded JPEG is decoded at ``draft_scale``; libjpeg's scaled IDCT skips most of the
    work of the pixels that a full decode and bicubic shrink would throw away. DataError naming
    ``name`` if the pixels cannot be decoded.
    """
    top, left, h, w = box
    scale = draft_scale(img, h, w, size)
    try:
        if scale > 1:
            full_width = img.width
            drafted = img.draft("RGB", (img.width // scale, img.height // scale))
            # draft returns the decoded area in reduced pixels: the scale libjpeg really uses.
            scale = 1 if drafted is None else round(full_width / drafted[1][2])
        img.load()
        return to_channels(img, channels), scale
    except Exception as err:  # any failure inside Pillow means the file is unusable
        raise cannot_decode(name, err) from err


def crop_resize(
    img: Image.Image, box: tuple[int, int, int, int], size: int, flipped: bool, scale: int = 1
) -> np.ndarray:
    """``box`` (top, left, h, w, in full-size pixels) of 8-bit ``img`` as (size, size, C) uint8.

    Crop, bicubic resize, optional horizontal flip. ``scale`` > 1: ``img`` is a draft decoded at
    1/scale, and the box falls between its pixels; it is cropped to the pixels that cover the box
    and resized from the exact fractional box inside them.
    """
    top, left, h, w = box
    if scale == 1:
        # Crop first, then resize, as torchvision does: resizing with a ``box`` would let the
        # bicubic filter read pixels outside the crop and change the border values.
        out = img.crop((left, top, left + w, top + h)).resize(
            (size, size), Image.Resampling.BICUBIC
        )
    else:
        x0, y0, x1, y1 = left / scale, top / scale, (left + w) / scale, (top + h) / scale
        ix0, iy0 = math.floor(x0), math.floor(y0)
        ix1, iy1 = min(math.ceil(x1), img.width), min(math.ceil(y1), img.height)
        out = img.crop((ix0, iy0, ix1, iy1)).resize(
            (size, size), Image.Resampling.BICUBIC, box=(x0 - ix0, y0 - iy0, x1 - ix0, y1 - iy0)
        )
    if flipped:
        # Pillow's mirror is a plain copy; NumPy's [:, ::-1] of 3-byte pixels is 5x slower.
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return pixel_array(out)


def pretrain_crop(
    img: Image.Image, rng: np.random.Generator, size: int, name: str = "image", channels: int = 3
) -> tuple[np.ndarray, tuple[int, int, int, int], bool]:
    """Official MAE pretraining augmentation as uint8: RandomResizedCrop, bicubic, flip p=0.5.

    ``img``: any Pillow image, decoded or only opened (``open_image``); an opened JPEG is decoded
    in draft mode when the crop allows (``decode_for_crop``), any other image gives exactly the
    pixels of a full decode. The box is drawn from the full size, so ``rng`` makes the same draws
    either way. Returns (pixels (size, size, channels) uint8, crop box (top, left, h, w), flipped);
    ``channels`` 1 converts to grayscale after decoding.
    """
    box = random_resized_crop_box(rng, img.width, img.height)
    flipped = bool(rng.random() < 0.5)
    decoded, scale = decode_for_crop(img, box, size, name, channels)
    return crop_resize(decoded, box, size, flipped, scale), box, flipped


def normalize(pixels: np.ndarray, norm: Normalization = IMAGENET) -> np.ndarray:
    """uint8 (..., 3) RGB to float32 ImageNet-normalised values, bit-equal to torchvision's
    (``norm`` for other statistics or channel counts)."""
    return norm.normalize(pixels)


def denormalize(x: Any, norm: Normalization = IMAGENET) -> np.ndarray:
    """Normalised (..., 3) values back to float32 RGB in [0, 1] (clipped)."""
    return norm.denormalize(x)


def pretrain_transform(
    img: Image.Image, rng: np.random.Generator, size: int, norm: Normalization = IMAGENET
) -> tuple[np.ndarray, tuple[int, int, int, int], bool]:
    """Official MAE pretraining augmentation of an image, normalised as torchvision does.

    Returns (pixels (size, size, C) float32 normalised, crop box (top, left, h, w), flipped),
    C = ``norm.channels`` (3 for the default ImageNet statistics).
    """
    pixels, box, flipped = pretrain_crop(img, rng, size, channels=norm.channels)
    return norm.normalize(pixels), box, flipped


def pretrain_pixels(
    img: Image.Image, rng: np.random.Generator, size: int, norm: Normalization = IMAGENET
) -> np.ndarray:
    """``pretrain_transform``'s pixels alone: (size, size, C) float32 normalised."""
    return pretrain_transform(img, rng, size, norm)[0]


def resize_shorter_side(img: Image.Image, size: int) -> Image.Image:
    """Bicubic resize so that the shorter side is ``size`` (torchvision ``Resize(int)`` rounding)."""
    if img.width <= img.height:
        new_w, new_h = size, int(size * img.height / img.width)
    else:
        new_w, new_h = int(size * img.width / img.height), size
    return img.resize((new_w, new_h), Image.Resampling.BICUBIC)


def crop_center(img: Image.Image, size: int) -> Image.Image:
    """Central size x size crop, offsets rounded like torchvision's ``CenterCrop``."""
    if img.width < size or img.height < size:
        raise ValueError(f"cannot centre-crop {size}x{size} from a {img.width}x{img.height} image")
    top = int(round((img.height - size) / 2.0))
    left = int(round((img.width - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def eval_resize_size(size: int) -> int:
    """Shorter side before the centre crop, as the official fine-tune code picks it (256 for 224)."""
    crop_pct = EVAL_CROP_PCT if size <= 224 else 1.0
    return int(size / crop_pct)


def eval_transform(
    img: Image.Image, size: int, resize_to: int | None = None, norm: Normalization = IMAGENET
) -> np.ndarray:
    """Official classifier eval transform: (size, size, C) float32 normalised.

    Shorter side to ``resize_to`` (default ``eval_resize_size(size)``), bicubic, then centre crop.
    ``img`` has ``norm``'s channel count (RGB for the default ImageNet statistics).
    """
    resized = resize_shorter_side(img, eval_resize_size(size) if resize_to is None else resize_to)
    return norm.normalize(pixel_array(crop_center(resized, size)))


def square_image(
    img: Image.Image, size: int, center_crop: bool = False, norm: Normalization = IMAGENET
) -> np.ndarray:
    """An image of ``norm``'s channel count (RGB by default) as (size, size, C) float32
    normalised, for the demo and reconstructions.

    Without ``center_crop`` the image is squashed to size x size with bicubic (what the official
    demo does); with it, the shorter side goes to ``size`` and the centre is cropped.
    """
    if center_crop:
        img = crop_center(resize_shorter_side(img, size), size)
    else:
        img = img.resize((size, size), Image.Resampling.BICUBIC)
    return norm.normalize(pixel_array(img))


def load_image(
    path: str | os.PathLike, size: int, center_crop: bool = False, norm: Normalization = IMAGENET
) -> np.ndarray:
    """One image file as (size, size, C) float32 normalised (see ``square_image``); decoded as
    grayscale when ``norm`` has one channel."""
    return square_image(decode_rgb(path, norm.channels), size, center_crop, norm)


# ----------------------------------------------------------------------------------------------
# Normalisation on the device
# ----------------------------------------------------------------------------------------------


def normalize_on_device(imgs: jax.Array, norm: Normalization = IMAGENET) -> jax.Array:
    """uint8 (..., 3) RGB to float32 ImageNet-normalised values on the device, bit-equal to
    ``normalize`` (``Normalization.on_device``; ``norm`` for other statistics)."""
    return norm.on_device(imgs)
