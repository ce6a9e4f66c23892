"""Per-channel pixel normalisation, on the host (NumPy) and on the device (jax.numpy).

A light module (no grain, no Pillow): the train step imports it without the data pipeline.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import jax

# Grayscale default: the means of ImageNet's three channel statistics (as timm does for 1 channel).
GRAY_MEAN = (0.449,)
GRAY_STD = (0.226,)
# Channel counts the image pipeline reads: grayscale and RGB.
SUPPORTED_CHANNELS = (1, 3)


def check_channels(channels: int) -> None:
    """ValueError unless images can be decoded with ``channels`` channels (1 or 3)."""
    if channels not in SUPPORTED_CHANNELS:
        raise ValueError(
            f"images can be read with 1 (grayscale) or 3 (RGB) channels, not {channels}"
        )


@dataclasses.dataclass(frozen=True)
class Normalization:
    """Per-channel mean and std of ``(pixels / 255 - mean) / std``; one value per channel.

    ``IMAGENET`` (three channels) is the official recipe; ``for_channels`` picks the default of a
    channel count or checks the values a user gave.
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self):
        mean = tuple(float(v) for v in np.atleast_1d(self.mean))
        std = tuple(float(v) for v in np.atleast_1d(self.std))
        if len(mean) != len(std):
            raise ValueError(f"mean has {len(mean)} values but std has {len(std)}")
        if not all(v > 0 and math.isfinite(v) for v in std):
            raise ValueError(f"std values must be positive, got {std}")
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)

    @classmethod
    def for_channels(
        cls,
        channels: int,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
    ) -> Normalization:
        """The normalisation of ``channels``-channel images: ``mean`` and ``std`` where given,
        else ImageNet's for RGB and their averages (0.449, 0.226) for grayscale. ValueError
        naming the mismatch if the values do not have one entry per channel."""
        check_channels(channels)
        defaults = {3: (IMAGENET.mean, IMAGENET.std), 1: (GRAY_MEAN, GRAY_STD)}[channels]
        norm = cls(defaults[0] if mean is None else mean, defaults[1] if std is None else std)
        if norm.channels != channels:
            raise ValueError(
                f"mean and std have {norm.channels} values each but the images have "
                f"{channels} channel(s)"
            )
        return norm

    @property
    def channels(self) -> int:
        return len(self.mean)

    @functools.cached_property
    def table(self) -> np.ndarray:
        """(channels, 256) float32: row c, column v holds (v / 255 - mean[c]) / std[c], computed
        in float32 in torchvision's order (ToTensor, then Normalize), so a lookup gives its
        exact values, 2x faster than the arithmetic."""
        mean = np.asarray(self.mean, np.float32)
        std = np.asarray(self.std, np.float32)
        values = np.arange(256, dtype=np.float32)[:, None] / np.float32(255)
        return np.ascontiguousarray(((values - mean) / std).T)

    def normalize(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 (..., C) pixels to float32 normalised values, bit-equal to torchvision's."""
        pixels = np.asarray(pixels)
        if pixels.dtype != np.uint8 or pixels.shape[-1] != self.channels:
            raise ValueError(
                f"expected uint8 pixels (..., {self.channels}), got {pixels.dtype} {pixels.shape}"
            )
        out = np.empty(pixels.shape, np.float32)
        for channel in range(self.channels):
            np.take(self.table[channel], pixels[..., channel], out=out[..., channel])
        return out

    def denormalize(self, x: Any) -> np.ndarray:
        """Normalised (..., C) values back to float32 pixels in [0, 1] (clipped)."""
        mean = np.asarray(self.mean, np.float32)
        std = np.asarray(self.std, np.float32)
        return np.clip(np.asarray(x, dtype=np.float32) * std + mean, 0.0, 1.0)

    def on_device(self, imgs: jax.Array) -> jax.Array:
        """uint8 (..., C) pixels to float32 normalised values on the device, bit-equal to
        ``normalize``.

        For the train step: batches travel to the device as uint8 (a quarter of float32's
        bytes) and are normalised there. This is a gather from ``table``, not the arithmetic
        ``(x / 255 - mean) / std``: XLA rewrites a division by a constant into a multiplication
        by its reciprocal, which rounds differently (523 of ImageNet's 768 values differ by up
        to 7e-7 on CPU), and TPU's float32 division is not correctly rounded either; the gather
        copies the host's values exactly on every backend.
        """
        import jax.numpy as jnp

        if imgs.dtype != jnp.uint8 or imgs.shape[-1] != self.channels:
            raise ValueError(
                f"expected uint8 pixels (..., {self.channels}), got {imgs.dtype} {imgs.shape}"
            )
        table = jnp.asarray(self.table.reshape(-1))  # channel c's value v at 256 * c + v
        offsets = jnp.arange(0, 256 * self.channels, 256, dtype=jnp.int32)
        return table[imgs.astype(jnp.int32) + offsets]


# From the decimal constants: float32 tables as before, float64 for the figures' arithmetic.
IMAGENET = Normalization((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
IMAGENET_MEAN = np.array(IMAGENET.mean, dtype=np.float32)
IMAGENET_STD = np.array(IMAGENET.std, dtype=np.float32)


def as_metadata(norm: Normalization) -> dict[str, list[float]]:
    """``norm`` as a checkpoint's metadata records it (``checkpoint.recorded_normalization`` reads
    it)."""
    return {"mean": list(norm.mean), "std": list(norm.std)}
