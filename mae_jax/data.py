"""Image data for MAE: image sets, Pillow decoding, the official transforms, the grain loaders.

Everything here runs on the host and returns NumPy arrays in NHWC layout; there is no torch.
The one exception is ``normalize_on_device`` (jax.numpy, ``Normalization.on_device``), which
the train step calls on uint8 batches. Images are read as RGB, or as grayscale for 1-channel
models (``channels=1``, or a one-channel ``Normalization``).

- ``ImageFolder`` (from ``mae_jax.images``) lists the images of an ImageNet-style folder (one
  sub-folder per class) or of a flat folder (every image gets label 0);
  ``mae_jax.records.RecordFolder`` reads the same images from sharded ArrayRecord files
  (``mae-jax prepare-data``); ``open_dataset`` opens either. Both give ``len``, ``root``,
  ``classes``, ``labels`` and ``read(i) -> (encoded bytes, name)``.
- ``pretrain_crop`` is the official pretraining augmentation on uint8 pixels: RandomResizedCrop
  (scale (0.2, 1), ratio (3/4, 4/3), bicubic) with torchvision's sampling algorithm, then a
  horizontal flip with p=0.5. A JPEG that is opened but not yet decoded is decoded at a reduced
  DCT scale (Pillow's draft mode) when the crop stays at least ``size`` pixels on both sides.
  ``pretrain_transform`` adds ToTensor and ImageNet normalisation, in float32 like torchvision.
- ``Normalization`` holds a channel count's mean and std: ImageNet's for RGB (the official
  recipe), any the user gives, and grayscale (one channel) images for single-channel models.
- ``eval_transform`` is the official classifier evaluation transform (shorter side to
  int(size / 0.875), bicubic, centre crop, normalise).
- ``pretrain_batches`` is the training loader: a grain pipeline whose every batch is a pure
  function of (seed, epoch, position), so a run resumed from ``get_state()`` sees exactly the batches
  an uninterrupted run would have seen, whatever the thread or worker count.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Literal

import grain
import numpy as np
from PIL import Image

from mae_jax.images import (  # noqa: F401 (IMAGE_EXTENSIONS, ...: part of this module's API)
    IMAGE_EXTENSIONS,
    DataError,
    ImageFolder,
    cannot_decode,
    open_image,
)
from mae_jax.loader_workers import remove_dead_runs_segments, worker_start_hook
from mae_jax.normalization import (  # noqa: F401 (IMAGENET_MEAN/STD: part of this module's API)
    IMAGENET,
    IMAGENET_MEAN,
    IMAGENET_STD,
    Normalization,
    check_channels,
)

if TYPE_CHECKING:
    import jax

    from mae_jax.records import RecordFolder

# Pillow mode of the decoded pixels for each supported channel count.
CHANNEL_MODES = {1: "L", 3: "RGB"}
PRETRAIN_SCALE = (0.2, 1.0)
PRETRAIN_RATIO = (3.0 / 4.0, 4.0 / 3.0)
# Official classifier evaluation: resize to size / crop_pct, then centre-crop size.
EVAL_CROP_PCT = 224 / 256
# The DCT scale reductions libjpeg offers through Pillow's draft mode, largest first.
JPEG_DRAFT_SCALES = (8, 4, 2)

# First word of every SeedSequence entropy list, so that the shuffle and the augmentation streams
# never coincide (SeedSequence pads short entropy with zeros: [a, b] and [a, b, 0] are the same).
_SHUFFLE_STREAM = 0
_AUGMENT_STREAM = 1
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_LOG = logging.getLogger(__name__)


# transform(img, rng, size) -> (size, size, C) float32 pixels, img a decoded RGB (or grayscale)
# image
Transform = Callable[[Image.Image, np.random.Generator, int], np.ndarray]
Pixels = Literal["float32", "uint8"]


# ----------------------------------------------------------------------------------------------
# Image sets
# ----------------------------------------------------------------------------------------------


def open_dataset(root: str | os.PathLike) -> ImageFolder | RecordFolder:
    """The image set at ``root``: a record directory (``mae-jax prepare-data``) or an image folder."""
    from mae_jax import records
    from mae_jax._files import is_url

    if is_url(root) or records.is_record_dir(root):  # in a bucket: record directories only
        return records.RecordFolder(root)
    return ImageFolder(root)


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


# ----------------------------------------------------------------------------------------------
# Pretraining loader
# ----------------------------------------------------------------------------------------------


def steps_per_epoch(num_examples: int, batch_size: int, shard_count: int = 1) -> int:
    """Batches per epoch and host: each host gets num_examples // shard_count, drop-last."""
    return (num_examples // shard_count) // batch_size


def epoch_order(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    """(num_examples,) int64 permutation of the dataset for ``epoch``; the same on every host."""
    return np.random.default_rng([_SHUFFLE_STREAM, seed, epoch]).permutation(num_examples)


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, else ``os.cpu_count()``)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def auto_worker_count() -> int:
    """Loader worker processes for ``worker_count=-1``: every usable core but one, at least 1.

    The core left over runs the training process, which feeds the accelerators and collects the
    batches from shared memory.
    """
    return max(1, usable_cores() - 1)


class _PretrainExample:
    """Maps a global example position to one augmented example (picklable, for grain workers).

    Position g belongs to epoch g // per_epoch and slot g % per_epoch of this host's shard of that
    epoch's permutation. A slot whose file cannot be decoded takes the next decodable file of the
    shard instead, so every epoch has the same number of batches on every host.
    """

    def __init__(
        self,
        images: ImageFolder | RecordFolder,
        img_size: int,
        seed: int,
        shard_index: int,
        shard_count: int,
        per_epoch: int,
        transform: Transform | None,
        pixels: Pixels,
        norm: Normalization = IMAGENET,
    ):
        self.images = images
        self.transform = transform
        self.pixels = pixels
        self.norm = norm
        self.img_size = img_size
        self.seed = seed
        self.shard_index = shard_index
        self.shard_count = shard_count
        self.per_epoch = per_epoch
        self._init_cache()

    def _init_cache(self) -> None:
        self._lock = threading.Lock()
        self._shards: dict[int, np.ndarray] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        del state["_lock"], state["_shards"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_cache()

    def shard(self, epoch: int) -> np.ndarray:
        """This host's image indices for ``epoch``, in order: (len(images) // shard_count,)."""
        with self._lock:
            order = self._shards.get(epoch)
            if order is None:
                per_shard = len(self.images) // self.shard_count
                perm = epoch_order(len(self.images), self.seed, epoch)
                order = perm[self.shard_index :: self.shard_count][:per_shard]
                if len(self._shards) >= 2:  # keep the current and the next epoch only
                    self._shards.pop(min(self._shards))
                self._shards[epoch] = order
            return order

    def _augment(self, index: int, rng: np.random.Generator) -> np.ndarray:
        """Image ``index`` through the transform; DataError if it cannot be read or decoded."""
        encoded, name = self.images.read(index)
        channels = self.norm.channels
        if self.transform is not None:
            return self.transform(decode_bytes(encoded, name, channels), rng, self.img_size)
        # Only opened, not decoded: pretrain_crop can then decode a JPEG in draft mode.
        pixels = pretrain_crop(open_image(encoded, name), rng, self.img_size, name, channels)[0]
        return pixels if self.pixels == "uint8" else self.norm.normalize(pixels)

    def __call__(self, position: int) -> dict[str, np.ndarray]:
        epoch, slot = divmod(int(position), self.per_epoch)
        order = self.shard(epoch)
        for skipped in range(len(order)):
            index = int(order[(slot + skipped) % len(order)])
            # The slot's own file index keys the augmentation, so a file gets the same crop in an
            # epoch whatever the number of hosts. A fresh generator per try: a file that fails to
            # decode after its box was drawn must not shift the draws of the file replacing it.
            rng = np.random.default_rng([_AUGMENT_STREAM, self.seed, epoch, int(order[slot])])
            try:
                pixels = self._augment(index, rng)
            except DataError as err:
                _LOG.warning("skipping unreadable image: %s", err)
                continue
            return dict(image=pixels, label=self.images.labels[index], skipped=np.int32(skipped))
        raise DataError(
            f"{self.images.root}: none of the {len(order)} images of shard {self.shard_index} "
            f"of epoch {epoch} could be decoded"
        )


class _PretrainBatch:
    """Maps a global batch index to a whole stacked batch (picklable): one unit of worker work.

    grain hands each worker process every worker_count-th element of the dataset before the
    ``to_iter_dataset`` step and interleaves their outputs in order; with whole batches as
    elements, batch k is the same whatever the number of workers.
    """

    def __init__(self, example: _PretrainExample, batch_size: int):
        self.example = example
        self.batch_size = batch_size

    def __call__(self, batch_index: int) -> dict[str, np.ndarray]:
        first = int(batch_index) * self.batch_size
        rows = [self.example(first + i) for i in range(self.batch_size)]
        return {key: np.stack([row[key] for row in rows]) for key in rows[0]}


class PretrainBatches(Iterator[tuple[int, dict[str, np.ndarray]]]):
    """Iterator of (epoch, dict(image=(B, H, W, 3), label=(B,) int32)) pretraining batches.

    ``image`` is uint8 or float32 as ``pretrain_batches`` says. Position, skipped-file count and
    resume: ``epoch`` and ``step`` name the next batch, ``num_skipped`` counts unreadable files met
    so far (each one replaced by the next file of the shard), and ``get_state()`` /
    ``set_state()`` save and restore all three as a JSON-able dict. Call ``close()`` (or use
    ``with``) when done, to stop the reading threads or worker processes.
    """

    def __init__(
        self,
        images: ImageFolder | RecordFolder,
        *,
        batch_size: int,
        img_size: int,
        seed: int,
        shard_index: int,
        shard_count: int,
        start_epoch: int,
        end_epoch: int | None,
        read_threads: int,
        prefetch_batches: int,
        worker_count: int,
        transform: Transform | None = None,
        pixels: Pixels = "float32",
        norm: Normalization = IMAGENET,
    ):
        if batch_size < 1 or img_size < 1:
            raise ValueError(f"batch_size {batch_size} and img_size {img_size} must be positive")
        if not 0 <= shard_index < shard_count:
            raise ValueError(f"shard_index {shard_index} is not in [0, shard_count={shard_count})")
        if seed < 0 or start_epoch < 0:
            raise ValueError(f"seed {seed} and start_epoch {start_epoch} must be >= 0")
        if pixels not in ("float32", "uint8"):
            raise ValueError(f"pixels must be 'float32' or 'uint8', got {pixels!r}")
        if transform is not None and pixels != "float32":
            raise ValueError(
                "pixels='uint8' is for the default pretraining transform; "
                "a custom transform returns its own pixels"
            )
        if prefetch_batches < 1 or read_threads < 0 or worker_count < -1:
            raise ValueError(
                f"prefetch_batches {prefetch_batches} must be >= 1, read_threads {read_threads} "
                f">= 0 and worker_count {worker_count} >= -1 (-1: one per core but one)"
            )
        self.steps_per_epoch = steps_per_epoch(len(images), batch_size, shard_count)
        if self.steps_per_epoch == 0:
            raise DataError(
                f"{images.root}: {len(images)} images over {shard_count} host(s) "
                f"are fewer than one batch of {batch_size} per host"
            )
        self.images = images
        self.batch_size = batch_size
        self.img_size = img_size
        self.seed = seed
        self.shard_index = shard_index
        self.shard_count = shard_count
        self.end_epoch = end_epoch
        self.read_threads = read_threads
        self.prefetch_batches = prefetch_batches
        self.worker_count = auto_worker_count() if worker_count == -1 else worker_count
        self._example = _PretrainExample(
            images,
            img_size,
            seed,
            shard_index,
            shard_count,
            self.steps_per_epoch * batch_size,
            transform,
            pixels,
            norm,
        )
        self._iterator: Iterator[dict[str, np.ndarray]] | None = None
        self.num_skipped = 0
        self._seek(start_epoch * self.steps_per_epoch)

    @property
    def epoch(self) -> int:
        """Epoch of the next batch."""
        return self._next_batch // self.steps_per_epoch

    @property
    def step(self) -> int:
        """Index of the next batch within its epoch."""
        return self._next_batch % self.steps_per_epoch

    def _seek(self, batch_index: int) -> None:
        """Move to global batch ``batch_index``; the pipeline restarts there on the next batch."""
        self.close()
        self._next_batch = batch_index

    def _open(self) -> Iterator[dict[str, np.ndarray]]:
        """A grain pipeline from the next batch to ``end_epoch`` (or practically forever)."""
        stop = None if self.end_epoch is None else self.end_epoch * self.steps_per_epoch
        if stop is not None and self._next_batch >= stop:
            raise StopIteration
        per_batch = self.batch_size
        if self.worker_count == 0:
            # Threads of this process decode examples; the buffer holds prefetch_batches batches.
            stop_position = 2**62 if stop is None else stop * per_batch
            read = grain.ReadOptions(
                num_threads=self.read_threads,
                prefetch_buffer_size=self.prefetch_batches * per_batch,
            )
            dataset = (
                grain.MapDataset.range(self._next_batch * per_batch, stop_position)
                .map(self._example)
                .to_iter_dataset(read)
                .batch(per_batch, drop_remainder=True)
            )
            return iter(dataset)
        # Each worker process builds whole batches on one core (no reading threads, which would
        # only contend for that core) and keeps its share of the read-ahead in shared memory.
        # Workers exit with this process, however it dies; segments of dead runs are unlinked.
        _allow_grain_workers()
        remove_dead_runs_segments()
        per_worker = -(-self.prefetch_batches // self.worker_count)
        dataset = (
            grain.MapDataset.range(self._next_batch, 2**62 if stop is None else stop)
            .map(_PretrainBatch(self._example, per_batch))
            .to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
            .mp_prefetch(
                grain.MultiprocessingOptions(
                    num_workers=self.worker_count, per_worker_buffer_size=per_worker
                ),
                worker_init_fn=worker_start_hook(),
            )
        )
        return iter(dataset)

    def __next__(self) -> tuple[int, dict[str, np.ndarray]]:
        if self._iterator is None:
            # Started lazily, so that set_state() right after construction wastes no reading.
            self._iterator = self._open()
        batch = next(self._iterator)
        epoch = self.epoch
        self._next_batch += 1
        self.num_skipped += int(batch.pop("skipped").sum())
        return epoch, batch

    def get_state(self) -> dict[str, Any]:
        """JSON-serialisable position: the next batch, the skip count and what they depend on."""
        return dict(
            epoch=self.epoch, step=self.step, num_skipped=self.num_skipped, **self._fingerprint()
        )

    def set_state(self, state: dict[str, Any]) -> None:
        """Continue from a ``get_state()`` result of an identically configured loader."""
        expected = self._fingerprint()
        saved = {k: state.get(k) for k in expected}
        if saved != expected:
            raise DataError(
                f"data loader state was saved with {saved}, but this loader has {expected}"
            )
        self.num_skipped = int(state["num_skipped"])
        self._seek(int(state["epoch"]) * self.steps_per_epoch + int(state["step"]))

    def _fingerprint(self) -> dict[str, int]:
        return dict(
            num_images=len(self.images),
            batch_size=self.batch_size,
            img_size=self.img_size,
            seed=self.seed,
            shard_index=self.shard_index,
            shard_count=self.shard_count,
        )

    def close(self) -> None:
        """Stop the background threads or worker processes of the current pipeline."""
        iterator, self._iterator = getattr(self, "_iterator", None), None
        if iterator is not None and hasattr(iterator, "close"):
            iterator.close()

    def __enter__(self) -> PretrainBatches:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()


def _allow_grain_workers() -> None:
    """Work around google/grain#1355: worker processes die on absl's unparsed-flags check."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def pretrain_batches(
    images: ImageFolder | RecordFolder,
    *,
    batch_size: int,
    img_size: int,
    seed: int,
    shard_index: int = 0,
    shard_count: int = 1,
    start_epoch: int = 0,
    end_epoch: int | None = None,
    pixels: Pixels = "float32",
    worker_count: int = -1,
    prefetch_batches: int = 2,
    read_threads: int = 16,
    transform: Transform | None = None,
    norm: Normalization = IMAGENET,
) -> PretrainBatches:
    """Shuffled, sharded, drop-last pretraining batches from ``start_epoch`` to ``end_epoch``.

    Yields (epoch, dict(image=(batch_size, img_size, img_size, C), label=(batch_size,) int32));
    ``end_epoch=None`` never stops. ``images``: an ``ImageFolder`` or a record directory's
    ``RecordFolder`` (``open_dataset``); both give the same batches. Each epoch shuffles all images
    with its own seed, identically on every host; host ``shard_index`` of ``shard_count`` (pass
    ``jax.process_index()`` / ``jax.process_count()``) takes every shard_count-th image of that
    order, so hosts are disjoint.

    ``pixels``: "uint8" yields the augmented pixels as uint8, for ``Normalization.on_device`` in
    the train step (a quarter of the bytes); "float32" yields them normalised on the host, the
    same values bit for bit. ``norm``: the channel count (3: RGB, 1: grayscale, each image
    converted after decoding) and the statistics of that normalisation (default ImageNet's).

    Parallelism: ``worker_count`` worker processes each build whole batches on one core;
    -1 (the default) is ``auto_worker_count()``, every usable core but one; 0 decodes in
    ``read_threads`` threads of this process instead (no process start-up, 1.5-3 s per worker).
    On Linux, worker processes exit when this process dies, however it dies (SIGKILL included),
    and a loader that starts workers first unlinks the shared memory of runs whose process is dead
    (``mae_jax.loader_workers``).
    ``prefetch_batches``: how many finished batches may wait ahead of the consumer (rounded up to
    a multiple of the worker count, each worker keeping its share). Host memory for them is about
    (prefetch_batches + workers) x batch_size x img_size² x 3 bytes for uint8, 4x that for
    float32. Batches are identical whatever the workers, threads and read-ahead.

    ``transform(img, rng, size) -> pixels`` replaces the pretraining augmentation and gets a
    decoded image of ``norm``'s channel count (fine-tuning and linear probing pass theirs;
    their pixels are yielded as
    they are). With worker processes it must be picklable: a module-level function or a
    functools.partial of one.
    """
    return PretrainBatches(
        images,
        batch_size=batch_size,
        img_size=img_size,
        seed=seed,
        shard_index=shard_index,
        shard_count=shard_count,
        start_epoch=start_epoch,
        end_epoch=end_epoch,
        read_threads=read_threads,
        prefetch_batches=prefetch_batches,
        worker_count=worker_count,
        transform=transform,
        pixels=pixels,
        norm=norm,
    )


# ----------------------------------------------------------------------------------------------
# Evaluation loader
# ----------------------------------------------------------------------------------------------


class _EvalExample:
    """Maps a padded position of this host's shard to one eval-transformed example (picklable)."""

    def __init__(
        self,
        images: ImageFolder | RecordFolder,
        indices: np.ndarray,
        img_size: int,
        norm: Normalization = IMAGENET,
    ):
        self.images = images
        self.indices = indices
        self.img_size = img_size
        self.norm = norm

    def __call__(self, position: int) -> dict[str, np.ndarray]:
        empty = np.zeros((self.img_size, self.img_size, self.norm.channels), np.float32)
        if position >= len(self.indices):  # padding that keeps every host's batch count equal
            return dict(image=empty, label=np.int32(0), valid=np.bool_(False))
        index = int(self.indices[position])
        label = self.images.labels[index]
        try:
            img = decode_bytes(*self.images.read(index), channels=self.norm.channels)
        except DataError as err:
            _LOG.warning("skipping unreadable image: %s", err)
            return dict(image=empty, label=label, valid=np.bool_(False))
        pixels = eval_transform(img, self.img_size, norm=self.norm)
        return dict(image=pixels, label=label, valid=np.bool_(True))


def eval_batches(
    images: ImageFolder | RecordFolder,
    *,
    batch_size: int,
    img_size: int,
    shard_index: int = 0,
    shard_count: int = 1,
    read_threads: int = 16,
    norm: Normalization = IMAGENET,
) -> Iterator[dict[str, np.ndarray]]:
    """Every image once, in order, with the eval transform and fixed-size batches.

    Yields dict(image=(B, S, S, C) float32, label=(B,) int32, valid=(B,) bool), C and the
    statistics from ``norm`` (default: RGB, ImageNet's). Host
    ``shard_index`` takes every shard_count-th image; all hosts yield the same number of batches,
    the last ones padded with ``valid=False`` rows, as are unreadable files (logged).
    """
    if batch_size < 1 or img_size < 1:
        raise ValueError(f"batch_size {batch_size} and img_size {img_size} must be positive")
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index {shard_index} is not in [0, shard_count={shard_count})")
    indices = np.arange(shard_index, len(images), shard_count)
    per_host = -(-len(images) // shard_count)
    num_batches = -(-per_host // batch_size)
    dataset = (
        grain.MapDataset.range(num_batches * batch_size)
        .map(_EvalExample(images, indices, img_size, norm))
        .to_iter_dataset(grain.ReadOptions(num_threads=read_threads))
        .batch(batch_size)
    )
    return iter(dataset)
