"""Fine-tuning and linear-probe augmentation, Mixup/CutMix and the classification losses.

The official fine-tuning recipe builds its training transform and label mixing with timm 0.3.2
(``create_transform`` and ``Mixup``). This module implements the same published algorithms with
Pillow and NumPy, following timm's documented semantics; every random draw comes from the NumPy
``Generator`` passed in, so a resumed run repeats an uninterrupted one.

- ``finetune_transform``: RandomResizedCrop (scale (0.08, 1), ratio (3/4, 4/3), bicubic), a
  horizontal flip with p=0.5, RandAugment (``rand-m9-mstd0.5-inc1``), ImageNet normalisation, then
  RandomErasing in 'pixel' mode (p=0.25).
- ``rand_augment``: RandAugment (Cubuk et al. 2019) as timm defines its config string: n ops drawn
  uniformly with replacement, each applied with p=0.5 at a magnitude ~ N(m, mstd) clipped to
  [0, 10].
- ``linprobe_transform``: the linear probe's weak augmentation (single-draw crop, flip, normalise).
- ``mixup_cutmix``: timm's batch-mode Mixup/CutMix with label smoothing.
- ``soft_target_cross_entropy`` / ``smoothed_cross_entropy``: the two fine-tuning losses, through optax.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import optax
from PIL import Image, ImageEnhance, ImageOps

from mae_jax.data.images import pixel_array, to_channels
from mae_jax.data.transforms import random_resized_crop_box
from mae_jax.normalization import IMAGENET, Normalization

FINETUNE_SCALE = (0.08, 1.0)
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
DEFAULT_AUTO_AUGMENT = "rand-m9-mstd0.5-inc1"
MAX_LEVEL = 10.0


def fill_color(norm: Normalization) -> tuple[int, ...]:
    """Geometric ops fill uncovered pixels with the dataset mean in 0-255, as timm does when it
    builds RandAugment for a normalised dataset: (124, 116, 104) for ImageNet."""
    return tuple(min(255, round(255 * float(m))) for m in norm.mean)


FILL_COLOR = fill_color(IMAGENET)
# The official transform asks timm for bicubic interpolation, which RandAugment then also uses for
# its geometric ops (otherwise it would pick bilinear or bicubic at random).
RESAMPLE = Image.Resampling.BICUBIC


class AugmentConfigError(ValueError):
    """A malformed augmentation config string; the message quotes the string and the bad part."""


# ----------------------------------------------------------------------------------------------
# RandAugment operations
# ----------------------------------------------------------------------------------------------


def _affine(img: Image.Image, matrix: tuple[float, ...], fill: tuple[int, ...]) -> Image.Image:
    # Pillow's affine matrix maps each output pixel to the input position it samples.
    return img.transform(
        img.size, Image.Transform.AFFINE, matrix, resample=RESAMPLE, fillcolor=_fill_of(img, fill)
    )


def _fill_of(img: Image.Image, fill: tuple[int, ...]) -> int | tuple[int, ...]:
    """``fill`` as Pillow takes it for ``img``'s mode: an int for a one-band image."""
    if len(fill) != len(img.getbands()):
        raise ValueError(f"fill {fill} does not fit a {img.mode} image")
    return fill[0] if len(fill) == 1 else fill


def _solarize_add(img: Image.Image, add: int, fill: object = None) -> Image.Image:
    # Brightens only the dark half of the range (values below 128), saturating at 255.
    lut = [min(255, v + add) if v < 128 else v for v in range(256)]
    return img.point(lut * len(img.getbands()))


def _posterize(img: Image.Image, bits: int, fill: object = None) -> Image.Image:
    # Keeps the ``bits`` high bits of every value. Written as a lookup table rather than with
    # ImageOps.posterize, which refuses 0 bits (a black image), the strongest increasing level.
    if bits >= 8:
        return img
    mask = (0xFF << (8 - max(bits, 0))) & 0xFF
    return img.point([v & mask for v in range(256)] * len(img.getbands()))


# name -> f(img, argument, fill). The argument's meaning per op is given by _LEVEL_TO_ARG below;
# fill (one 0-255 value per band) is what the geometric ops put where the image was not.
_APPLY: dict[str, Callable[[Image.Image, float, tuple[int, ...]], Image.Image]] = {
    "AutoContrast": lambda img, _, fill: ImageOps.autocontrast(img),
    "Equalize": lambda img, _, fill: ImageOps.equalize(img),
    "Invert": lambda img, _, fill: ImageOps.invert(img),
    "Rotate": lambda img, degrees, fill: img.rotate(
        degrees, resample=RESAMPLE, fillcolor=_fill_of(img, fill)
    ),
    "Posterize": _posterize,
    "PosterizeIncreasing": _posterize,
    "Solarize": lambda img, threshold, fill: ImageOps.solarize(img, threshold),
    "SolarizeIncreasing": lambda img, threshold, fill: ImageOps.solarize(img, threshold),
    "SolarizeAdd": _solarize_add,
    "Color": lambda img, factor, fill: ImageEnhance.Color(img).enhance(factor),
    "ColorIncreasing": lambda img, factor, fill: ImageEnhance.Color(img).enhance(factor),
    "Contrast": lambda img, factor, fill: ImageEnhance.Contrast(img).enhance(factor),
    "ContrastIncreasing": lambda img, factor, fill: ImageEnhance.Contrast(img).enhance(factor),
    "Brightness": lambda img, factor, fill: ImageEnhance.Brightness(img).enhance(factor),
    "BrightnessIncreasing": lambda img, factor, fill: ImageEnhance.Brightness(img).enhance(factor),
    "Sharpness": lambda img, factor, fill: ImageEnhance.Sharpness(img).enhance(factor),
    "SharpnessIncreasing": lambda img, factor, fill: ImageEnhance.Sharpness(img).enhance(factor),
    "ShearX": lambda img, shear, fill: _affine(img, (1, shear, 0, 0, 1, 0), fill),
    "ShearY": lambda img, shear, fill: _affine(img, (1, 0, 0, shear, 1, 0), fill),
    "TranslateXRel": lambda img, frac, fill: _affine(img, (1, 0, frac * img.width, 0, 1, 0), fill),
    "TranslateYRel": lambda img, frac, fill: _affine(img, (1, 0, 0, 0, 1, frac * img.height), fill),
}


def _signed(value: float, rng: np.random.Generator) -> float:
    """``value`` or ``-value`` with equal probability (timm negates when a uniform draw > 0.5)."""
    return -value if rng.random() > 0.5 else value


def _enhance(level: float, rng: np.random.Generator) -> float:
    return level / MAX_LEVEL * 1.8 + 0.1


def _enhance_increasing(level: float, rng: np.random.Generator) -> float:
    # 1.0 leaves the image unchanged; larger levels move the factor away from it either way.
    return 1.0 + _signed(level / MAX_LEVEL * 0.9, rng)


def _posterize_bits(level: float, rng: np.random.Generator) -> int:
    return int(level / MAX_LEVEL * 4)


def _solarize_threshold(level: float, rng: np.random.Generator) -> int:
    return int(level / MAX_LEVEL * 256)


# name -> f(level in [0, 10], rng) -> the op's argument; ops missing here take no argument.
_LEVEL_TO_ARG: dict[str, Callable[[float, np.random.Generator], float]] = {
    "Rotate": lambda level, rng: _signed(level / MAX_LEVEL * 30.0, rng),
    "Posterize": _posterize_bits,
    "PosterizeIncreasing": lambda level, rng: 4 - _posterize_bits(level, rng),
    "Solarize": _solarize_threshold,
    "SolarizeIncreasing": lambda level, rng: 256 - _solarize_threshold(level, rng),
    "SolarizeAdd": lambda level, rng: int(level / MAX_LEVEL * 110),
    "Color": _enhance,
    "Contrast": _enhance,
    "Brightness": _enhance,
    "Sharpness": _enhance,
    "ColorIncreasing": _enhance_increasing,
    "ContrastIncreasing": _enhance_increasing,
    "BrightnessIncreasing": _enhance_increasing,
    "SharpnessIncreasing": _enhance_increasing,
    "ShearX": lambda level, rng: _signed(level / MAX_LEVEL * 0.3, rng),
    "ShearY": lambda level, rng: _signed(level / MAX_LEVEL * 0.3, rng),
    "TranslateXRel": lambda level, rng: _signed(level / MAX_LEVEL * 0.45, rng),
    "TranslateYRel": lambda level, rng: _signed(level / MAX_LEVEL * 0.45, rng),
}

# The two op sets timm's config string chooses between ("inc0" / "inc1"), in timm's order.
RAND_OPS = (
    "AutoContrast",
    "Equalize",
    "Invert",
    "Rotate",
    "Posterize",
    "Solarize",
    "SolarizeAdd",
    "Color",
    "Contrast",
    "Brightness",
    "Sharpness",
    "ShearX",
    "ShearY",
    "TranslateXRel",
    "TranslateYRel",
)
RAND_INCREASING_OPS = (
    "AutoContrast",
    "Equalize",
    "Invert",
    "Rotate",
    "PosterizeIncreasing",
    "SolarizeIncreasing",
    "SolarizeAdd",
    "ColorIncreasing",
    "ContrastIncreasing",
    "BrightnessIncreasing",
    "SharpnessIncreasing",
    "ShearX",
    "ShearY",
    "TranslateXRel",
    "TranslateYRel",
)


def op_argument(name: str, level: float, rng: np.random.Generator) -> float | None:
    """The argument of op ``name`` at magnitude ``level`` in [0, 10] (signed ops draw a sign)."""
    if name not in _APPLY:
        raise ValueError(f"unknown RandAugment op {name!r}; known: {', '.join(_APPLY)}")
    to_arg = _LEVEL_TO_ARG.get(name)
    return None if to_arg is None else to_arg(level, rng)


def apply_op(
    img: Image.Image,
    name: str,
    argument: float | None,
    fill: tuple[int, ...] | None = None,
) -> Image.Image:
    """One RandAugment op on an RGB (or grayscale) image with an explicit argument (degrees,
    factor, bits, ...); ``fill``: the 0-255 value per band of uncovered pixels (default: the
    ImageNet mean, or its gray average for a grayscale image)."""
    if name not in _APPLY:
        raise ValueError(f"unknown RandAugment op {name!r}; known: {', '.join(_APPLY)}")
    if fill is None:
        fill = fill_color(Normalization.for_channels(len(img.getbands())))
    return _APPLY[name](img, argument, fill)


# ----------------------------------------------------------------------------------------------
# RandAugment policy
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RandAugmentConfig:
    """A parsed RandAugment config string; the defaults are timm's for a bare ``"rand"``."""

    magnitude: float = MAX_LEVEL
    num_layers: int = 2
    magnitude_std: float = 0.0
    increasing: bool = False
    prob: float = 0.5  # each chosen op is applied with this probability

    @property
    def ops(self) -> tuple[str, ...]:
        return RAND_INCREASING_OPS if self.increasing else RAND_OPS


_SECTION = re.compile(r"([a-z]+)(\d.*)")
_SECTION_HELP = "expected sections m<int 0-10>, n<int>, mstd<float>, inc<0|1>"


@functools.lru_cache(maxsize=32)
def parse_rand_augment(config: str) -> RandAugmentConfig:
    """Parse timm's RandAugment string (``"rand-m9-mstd0.5-inc1"``); AugmentConfigError if bad."""
    parts = config.split("-")
    if parts[0] != "rand":
        raise AugmentConfigError(f"RandAugment config {config!r}: must start with 'rand'")
    values: dict[str, float] = {}
    for section in parts[1:]:
        match = _SECTION.fullmatch(section)
        if match is None:
            raise AugmentConfigError(
                f"RandAugment config {config!r}: cannot read section {section!r}; {_SECTION_HELP}"
            )
        key, text = match.groups()
        if key not in ("m", "n", "mstd", "inc"):
            raise AugmentConfigError(
                f"RandAugment config {config!r}: unknown section {section!r}; {_SECTION_HELP}"
            )
        try:
            values[key] = float(text) if key == "mstd" else int(text)
        except ValueError:
            raise AugmentConfigError(
                f"RandAugment config {config!r}: {text!r} in {section!r} is not a number of the "
                f"right kind; {_SECTION_HELP}"
            ) from None
    cfg = RandAugmentConfig(
        magnitude=float(values.get("m", MAX_LEVEL)),
        num_layers=int(values.get("n", 2)),
        magnitude_std=float(values.get("mstd", 0.0)),
        # timm 0.3.2 tests bool() of the text, so even "inc0" selected the increasing set there;
        # here inc0 means what its documentation says: the original op set.
        increasing=bool(values.get("inc", 0)),
    )
    if not 0 <= cfg.magnitude <= MAX_LEVEL:
        raise AugmentConfigError(
            f"RandAugment config {config!r}: magnitude m must be in [0, 10], got {cfg.magnitude:g}"
        )
    if values.get("inc", 0) not in (0, 1):
        raise AugmentConfigError(f"RandAugment config {config!r}: inc must be 0 or 1")
    if not math.isfinite(cfg.magnitude_std) or cfg.magnitude_std < 0:
        raise AugmentConfigError(
            f"RandAugment config {config!r}: mstd must be a finite number >= 0"
        )
    return cfg


def rand_augment(
    img: Image.Image,
    rng: np.random.Generator,
    config: str | RandAugmentConfig = DEFAULT_AUTO_AUGMENT,
    norm: Normalization = IMAGENET,
) -> Image.Image:
    """RandAugment an image (same size; RGB, or grayscale when ``norm`` has one channel) with a
    timm-style config string or a parsed one; geometric ops fill with ``norm``'s mean."""
    cfg = parse_rand_augment(config) if isinstance(config, str) else config
    img = to_channels(img, norm.channels)
    fill = fill_color(norm)
    ops = cfg.ops
    # Ops are drawn with replacement, all before any is applied, as timm does.
    for index in rng.integers(0, len(ops), size=cfg.num_layers):
        if rng.random() > cfg.prob:
            continue
        level = cfg.magnitude
        if cfg.magnitude_std > 0:
            level = rng.normal(level, cfg.magnitude_std)
        level = min(MAX_LEVEL, max(0.0, float(level)))
        name = ops[index]
        img = apply_op(img, name, op_argument(name, level, rng), fill)
    return img


# ----------------------------------------------------------------------------------------------
# Per-image transforms
# ----------------------------------------------------------------------------------------------


def _crop_resize(img: Image.Image, box: tuple[int, int, int, int], size: int) -> Image.Image:
    top, left, h, w = box
    # Crop first, then resize, so the bicubic filter never reads pixels outside the crop.
    return img.crop((left, top, left + w, top + h)).resize((size, size), Image.Resampling.BICUBIC)


def random_erasing(
    pixels: np.ndarray,
    rng: np.random.Generator,
    probability: float = 0.25,
    *,
    min_area: float = 0.02,
    max_area: float = 1.0 / 3.0,
    min_aspect: float = 0.3,
) -> tuple[np.ndarray, tuple[int, int, int, int] | None]:
    """timm's RandomErasing, mode 'pixel', one box, on normalised (H, W, C) values.

    With probability ``probability``, up to 10 tries draw an area fraction uniformly in
    [min_area, max_area] and a log-uniform aspect ratio (h/w) in [min_aspect, 1/min_aspect]; the
    first box strictly smaller than the image is placed uniformly and filled with per-pixel N(0, 1)
    values. Returns (a new array, the box (top, left, h, w) or None when nothing was erased).
    """
    pixels = np.array(pixels, dtype=np.float32)
    if rng.random() > probability:
        return pixels, None
    height, width, channels = pixels.shape
    log_aspect = (math.log(min_aspect), math.log(1.0 / min_aspect))
    for _ in range(10):
        target_area = rng.uniform(min_area, max_area) * height * width
        aspect = math.exp(rng.uniform(*log_aspect))
        h = int(round(math.sqrt(target_area * aspect)))
        w = int(round(math.sqrt(target_area / aspect)))
        if w < width and h < height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            pixels[top : top + h, left : left + w] = rng.standard_normal(
                (h, w, channels), dtype=np.float32
            )
            return pixels, (top, left, h, w)
    return pixels, None


def finetune_transform(
    img: Image.Image,
    rng: np.random.Generator,
    size: int = 224,
    *,
    auto_augment: str | None = DEFAULT_AUTO_AUGMENT,
    re_prob: float = 0.25,
    norm: Normalization = IMAGENET,
) -> np.ndarray:
    """Official fine-tuning train augmentation of an image: (size, size, C) float32 normalised.

    RandomResizedCrop (scale (0.08, 1), ratio (3/4, 4/3), bicubic), hflip p=0.5, RandAugment
    (``auto_augment``; None or "" skips it), normalise, RandomErasing ('pixel', p=``re_prob``).
    ``norm``: the channel count (RGB, or 1 for grayscale) and its statistics (ImageNet's).
    """
    img = to_channels(img, norm.channels)
    box = random_resized_crop_box(rng, img.width, img.height, FINETUNE_SCALE, CROP_RATIO)
    img = _crop_resize(img, box, size)
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if auto_augment:
        img = rand_augment(img, rng, auto_augment, norm)
    pixels, _ = random_erasing(norm.normalize(pixel_array(img)), rng, re_prob)
    return pixels


def single_draw_crop_box(
    rng: np.random.Generator,
    width: int,
    height: int,
    scale: tuple[float, float] = FINETUNE_SCALE,
    ratio: tuple[float, float] = CROP_RATIO,
) -> tuple[int, int, int, int]:
    """The linear probe's TF/BYOL-style crop box (top, left, h, w): one draw, no retries.

    The area fraction is uniform in ``scale`` and the aspect ratio (w/h) log-uniform in ``ratio``;
    a side longer than the image is clamped to it, then the box is placed uniformly.
    """
    target_area = width * height * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
    w = min(int(round(math.sqrt(target_area * aspect))), width)
    h = min(int(round(math.sqrt(target_area / aspect))), height)
    top = int(rng.integers(0, height - h + 1))
    left = int(rng.integers(0, width - w + 1))
    return top, left, h, w


def linprobe_transform(
    img: Image.Image, rng: np.random.Generator, size: int = 224, norm: Normalization = IMAGENET
) -> np.ndarray:
    """Official linear-probe train augmentation: (size, size, C) float32 normalised.

    A single-draw RandomResizedCrop (scale (0.08, 1), bicubic), hflip p=0.5, normalise; ``norm``
    as in ``finetune_transform``.
    """
    img = to_channels(img, norm.channels)
    box = single_draw_crop_box(rng, img.width, img.height)
    pixels = pixel_array(_crop_resize(img, box, size))
    if rng.random() < 0.5:
        pixels = pixels[:, ::-1]
    return norm.normalize(pixels)


# ----------------------------------------------------------------------------------------------
# Mixup / CutMix
# ----------------------------------------------------------------------------------------------


def smooth_one_hot(labels: np.ndarray, num_classes: int, smoothing: float) -> np.ndarray:
    """(N,) int labels to (N, num_classes) float32: 1 - s + s/C on the label, s/C elsewhere."""
    off_value = smoothing / num_classes
    on_value = 1.0 - smoothing + off_value
    out = np.full((len(labels), num_classes), off_value, dtype=np.float32)
    out[np.arange(len(labels)), labels] = on_value
    return out


def cutmix_box(
    rng: np.random.Generator, height: int, width: int, lam: float
) -> tuple[tuple[int, int, int, int], float]:
    """timm's CutMix box for mixing weight ``lam``: ((y0, y1, x0, x1), lam corrected to its area).

    The box has sides int(side * sqrt(1 - lam)) (halved, then doubled around the centre), a
    uniform integer centre, and is clipped to the image; the returned lam is 1 - box area / image
    area, the weight the pasted pixels really leave to the original image.
    """
    cut = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * cut), int(width * cut)
    cy = int(rng.integers(0, height))
    cx = int(rng.integers(0, width))
    y0, y1 = np.clip((cy - cut_h // 2, cy + cut_h // 2), 0, height)
    x0, x1 = np.clip((cx - cut_w // 2, cx + cut_w // 2), 0, width)
    box = (int(y0), int(y1), int(x0), int(x1))
    return box, 1.0 - (box[1] - box[0]) * (box[3] - box[2]) / float(height * width)


def mixup_cutmix(
    images_NHWC: np.ndarray,
    labels: np.ndarray,
    rng: np.random.Generator,
    *,
    num_classes: int,
    mixup_alpha: float = 0.8,
    cutmix_alpha: float = 1.0,
    prob: float = 1.0,
    switch_prob: float = 0.5,
    label_smoothing: float = 0.1,
) -> tuple[np.ndarray, np.ndarray]:
    """timm's batch-mode Mixup/CutMix: (images (N, H, W, C) float32, targets (N, num_classes)).

    With probability ``prob`` one lam ~ Beta(alpha, alpha) is drawn for the whole batch (CutMix with
    probability ``switch_prob`` when both alphas are > 0) and every image is mixed with the image at
    the mirrored batch position; targets mix the smoothed one-hot labels the same way. The input
    arrays are not modified.
    """
    images = np.array(images_NHWC, dtype=np.float32)
    labels = np.asarray(labels)
    if images.ndim != 4:
        raise ValueError(f"mixup_cutmix: images must be (N, H, W, C), got shape {images.shape}")
    if labels.shape != images.shape[:1] or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"mixup_cutmix: labels must be ({len(images)},) integers, got "
            f"{labels.dtype} {labels.shape}"
        )
    if len(images) % 2:
        raise ValueError(
            f"mixup_cutmix: batch size {len(images)} is odd; each image is paired "
            "with the one at the mirrored batch position, which needs an even batch"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"mixup_cutmix: labels must lie in [0, {num_classes}), got "
            f"[{labels.min()}, {labels.max()}]"
        )
    if mixup_alpha < 0 or cutmix_alpha < 0 or (mixup_alpha == 0 and cutmix_alpha == 0):
        raise ValueError(
            f"mixup_cutmix: need mixup_alpha >= 0, cutmix_alpha >= 0 and one of them "
            f"> 0, got {mixup_alpha} and {cutmix_alpha}"
        )

    lam, use_cutmix = 1.0, False
    if rng.random() < prob:
        if mixup_alpha > 0 and cutmix_alpha > 0:
            use_cutmix = bool(rng.random() < switch_prob)
            alpha = cutmix_alpha if use_cutmix else mixup_alpha
        else:
            use_cutmix = cutmix_alpha > 0
            alpha = cutmix_alpha if use_cutmix else mixup_alpha
        lam = float(rng.beta(alpha, alpha))
    if lam != 1.0:
        mirrored = images[::-1]
        if use_cutmix:
            (y0, y1, x0, x1), lam = cutmix_box(rng, images.shape[1], images.shape[2], lam)
            images[:, y0:y1, x0:x1] = mirrored[:, y0:y1, x0:x1].copy()
        else:
            images = images * np.float32(lam) + mirrored * np.float32(1.0 - lam)
    onehot = smooth_one_hot(labels, num_classes, label_smoothing)
    targets = onehot * np.float32(lam) + onehot[::-1] * np.float32(1.0 - lam)
    return images, targets


# ----------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------


def soft_target_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean over the batch of sum(-targets * log_softmax(logits)); logits, targets (N, C) -> ()."""
    logits = jnp.asarray(logits, jnp.float32)
    return jnp.mean(optax.softmax_cross_entropy(logits, jnp.asarray(targets, jnp.float32)))


def smoothed_cross_entropy(
    logits: jax.Array, labels: jax.Array, smoothing: float = 0.1
) -> jax.Array:
    """Label-smoothed cross-entropy, (1 - s) * nll + s * mean(-log p), batch mean: (N, C) -> ().

    The same as the cross-entropy against the one-hot labels smoothed to (1 - s) * one_hot + s / C
    (torch's ``label_smoothing``, timm's ``LabelSmoothingCrossEntropy``)."""
    logits = jnp.asarray(logits, jnp.float32)
    one_hot = jax.nn.one_hot(jnp.asarray(labels), logits.shape[-1], dtype=jnp.float32)
    targets = optax.smooth_labels(one_hot, smoothing)
    return jnp.mean(optax.softmax_cross_entropy(logits, targets))
