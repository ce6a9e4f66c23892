"""The four panels of the official MAE demo (original, masked, reconstruction, pasted), computed and drawn.

Everything here is NumPy and Pillow on the host: the model's outputs are pulled off the device once,
then the panels are computed in float64 (as the official notebook does) and drawn into one figure.
"""

from __future__ import annotations

import io
import math
import os
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from mae_jax._files import atomic_write, naming, run_path
from mae_jax.model import patchify, unpatchify
from mae_jax.normalization import IMAGENET, Normalization

# The official demo multiplies removed patches by zero in normalized space, which renders them in the
# ImageNet mean colour (a dull brown that is easy to mistake for image content). A flat mid gray is
# unmistakable, so removed patches are shown as MASK_GRAY in every channel.
MASK_GRAY = 0.5

# The official loss adds this eps to the unbiased per-patch variance before the square root.
NORM_PIX_EPS = 1e-6

DEFAULT_TITLES = ("original", "masked 75%", "reconstruction", "reconstruction + visible")

# Panels smaller than this (in pixels, per side) are enlarged by an integer nearest-neighbour factor.
MIN_PANEL_PX = 128
_PAD = 8  # space between panels and around the figure
_BACKGROUND = (255, 255, 255)
_INK = (0, 0, 0)


class PanelInputError(ValueError):
    """The arrays given to ``compute_panels`` or ``draw_figure`` do not fit together."""


class Panels(NamedTuple):
    """Four display images, each [N, H, W, C] float64 in [0, 1] (C: 3 for RGB, 1 for gray)."""

    original: np.ndarray
    masked: np.ndarray
    reconstruction: np.ndarray
    pasted: np.ndarray


def denormalize(imgs_norm_NxHxWxC: np.ndarray, norm: Normalization = IMAGENET) -> np.ndarray:
    """Normalized [N, H, W, C] (ImageNet's statistics by default) -> display space [N, H, W, C]
    clipped to [0, 1], in float64."""
    mean, std = np.array(norm.mean, np.float64), np.array(norm.std, np.float64)
    return np.clip(np.asarray(imgs_norm_NxHxWxC, np.float64) * std + mean, 0, 1)


def unnormalize_patches(
    pred_NxLxP: np.ndarray, imgs_norm_NxHxWx3: np.ndarray, patch_size: int
) -> np.ndarray:
    """Per-patch-normalized predictions [N, L, P] -> normalized-image space, using the TRUE patch stats.

    This is the official demo's trick for norm_pix_loss (``*_full``) models: each predicted patch is
    scaled by the unbiased std and shifted by the mean of the corresponding input patch. It leaks
    the true patch statistics into the picture, so the result looks better than the model alone.
    """
    target = np.asarray(patchify(np.asarray(imgs_norm_NxHxWx3, np.float64), patch_size))
    mean = target.mean(axis=-1, keepdims=True)
    var = target.var(axis=-1, keepdims=True, ddof=1)  # unbiased, as torch's .var() in the loss
    return np.asarray(pred_NxLxP, np.float64) * np.sqrt(var + NORM_PIX_EPS) + mean


def _check_inputs(
    imgs: np.ndarray, pred: np.ndarray, mask: np.ndarray, patch_size: int, channels: int
) -> None:
    if imgs.ndim != 4 or imgs.shape[-1] != channels:
        raise PanelInputError(f"images must be [N, H, W, {channels}], got shape {imgs.shape}")
    n, h, w, _ = imgs.shape
    if h != w or h % patch_size:
        raise PanelInputError(
            f"images must be square with a side that is a multiple of the patch size {patch_size}, "
            f"got {h}x{w}"
        )
    length = (h // patch_size) ** 2
    expected_pred = (n, length, patch_size * patch_size * channels)
    if pred.shape != expected_pred:
        raise PanelInputError(
            f"pred must be [N, L, p*p*{channels}] = {list(expected_pred)} for {n} images of {h}x{w} "
            f"and patch {patch_size}, got {list(pred.shape)}"
        )
    if mask.shape != (n, length):
        raise PanelInputError(f"mask must be [N, L] = [{n}, {length}], got {list(mask.shape)}")


def compute_panels(
    imgs_norm_NxHxWx3: np.ndarray,
    pred_NxLxP: np.ndarray,
    mask_NxL: np.ndarray,
    *,
    patch_size: int,
    norm_pix_loss: bool,
    norm: Normalization = IMAGENET,
) -> Panels:
    """Model inputs [N, H, W, C] (normalized with ``norm``, default ImageNet's RGB statistics),
    pred [N, L, p*p*C], mask [N, L] (1 = removed) -> Panels.

    ``original`` is the denormalized input; ``masked`` shows removed patches as flat gray
    (``MASK_GRAY`` = 0.5 in every channel, where the official demo shows the ImageNet mean colour);
    ``reconstruction`` is the unpatchified prediction, first un-normalized with each true patch's
    mean and unbiased std when ``norm_pix_loss`` is set; ``pasted`` is the original on visible
    patches and the reconstruction on removed ones. All panels are float64, clipped to [0, 1].
    """
    imgs = np.asarray(imgs_norm_NxHxWx3, np.float64)
    pred = np.asarray(pred_NxLxP, np.float64)
    mask = np.asarray(mask_NxL)
    _check_inputs(imgs, pred, mask, patch_size, norm.channels)

    if norm_pix_loss:
        pred = unnormalize_patches(pred, imgs, patch_size)
    original = denormalize(imgs, norm)
    reconstruction = denormalize(np.asarray(unpatchify(pred, patch_size, norm.channels)), norm)

    # One value per pixel: spread each patch's mask entry over its p*p pixels.
    removed_NxL = mask.astype(np.float64) > 0.5
    removed_patches = np.broadcast_to(removed_NxL[..., None], pred.shape).astype(np.float64)
    removed = np.asarray(unpatchify(removed_patches, patch_size, norm.channels)) > 0.5

    masked = np.where(removed, MASK_GRAY, original)
    pasted = np.where(removed, reconstruction, original)
    return Panels(original, masked, reconstruction, pasted)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


def _text_size(draw: ImageDraw.ImageDraw, text: str, font) -> tuple[int, int]:
    """Width and height of ``text`` drawn at (0, 0) with a left-ascender anchor, ink included."""
    _, _, right, bottom = draw.textbbox((0, 0), text, font=font, anchor="la")
    return right, bottom


def _to_uint8(panel_HxWx3: np.ndarray) -> np.ndarray:
    return np.round(np.clip(panel_HxWx3, 0, 1) * 255).astype(np.uint8)


def draw_figure(
    panels: Panels,
    *,
    titles: tuple[str, str, str, str] = DEFAULT_TITLES,
    note: str | None = None,
    scale: int | None = None,
) -> Image.Image:
    """Panels of N images [N, H, W, 3] (or [N, H, W, 1], drawn in gray) -> an RGB figure: one row
    per image, one column per panel.

    Column titles go above the first row and ``note`` (if given) on a line under the grid. Each
    panel is enlarged by ``scale`` (nearest neighbour); by default, the smallest integer factor
    that makes it at least ``MIN_PANEL_PX`` on its shorter side (1 for 224-pixel images).
    """
    arrays = [np.asarray(p) for p in panels]
    shape = arrays[0].shape
    if len(shape) != 4 or shape[-1] not in (1, 3) or any(a.shape != shape for a in arrays):
        raise PanelInputError(
            "all four panels must share one [N, H, W, 3] or [N, H, W, 1] shape, got "
            f"{[list(a.shape) for a in arrays]}"
        )
    if shape[-1] == 1:
        arrays = [np.repeat(a, 3, axis=-1) for a in arrays]
    if len(titles) != len(arrays):
        raise PanelInputError(f"need {len(arrays)} titles, got {len(titles)}")
    n, h, w, _ = shape
    if scale is None:
        scale = max(1, math.ceil(MIN_PANEL_PX / min(h, w)))
    if not isinstance(scale, int) or scale < 1:
        raise PanelInputError(f"scale must be a positive integer, got {scale!r}")
    panel_w, panel_h = w * scale, h * scale

    font = _font(max(10, panel_w // 14))
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    title_sizes = [_text_size(measure, t, font) for t in titles]
    col_w = max(panel_w, *(tw for tw, _ in title_sizes))
    title_h = max(th for _, th in title_sizes)
    note_w, note_h = _text_size(measure, note, font) if note else (0, 0)

    grid_w = 4 * col_w + 5 * _PAD
    fig_w = max(grid_w, note_w + 2 * _PAD)
    grid_top = _PAD + title_h + _PAD
    fig_h = grid_top + n * (panel_h + _PAD) + (note_h + _PAD if note else 0)

    figure = Image.new("RGB", (fig_w, fig_h), _BACKGROUND)
    draw = ImageDraw.Draw(figure)
    for col, (title, (tw, _)) in enumerate(zip(titles, title_sizes, strict=True)):
        col_left = _PAD + col * (col_w + _PAD)
        draw.text((col_left + (col_w - tw) // 2, _PAD), title, fill=_INK, font=font, anchor="la")
        for row in range(n):
            tile = Image.fromarray(_to_uint8(arrays[col][row]), "RGB")
            if scale != 1:
                tile = tile.resize((panel_w, panel_h), Image.Resampling.NEAREST)
            figure.paste(
                tile, (col_left + (col_w - panel_w) // 2, grid_top + row * (panel_h + _PAD))
            )
    if note:
        draw.text((_PAD, grid_top + n * (panel_h + _PAD)), note, fill=_INK, font=font, anchor="la")
    return figure


def reconstruction_figure(
    model,
    imgs_norm_NxHxWx3: np.ndarray,
    *,
    seed: int,
    mask_ratio: float,
    note: str | None = None,
    scale: int | None = None,
    norm: Normalization = IMAGENET,
) -> Image.Image:
    """Mask, reconstruct and draw: the four-panel figure of an MAE on images normalized with
    ``norm`` (ImageNet's RGB statistics by default; grayscale models draw gray panels).

    Masks come from ``jax.random.key(seed)``; a norm-pix model's patches are un-normalized with
    the true patch statistics, and the figure's note says so.
    """
    import jax
    import jax.numpy as jnp

    from mae_jax.masking import num_kept

    num_kept(model.config.num_patches, mask_ratio)  # validates the ratio with a clear message
    imgs = np.asarray(imgs_norm_NxHxWx3, np.float32)
    out = model.forward_full(jnp.asarray(imgs), key=jax.random.key(seed), mask_ratio=mask_ratio)
    panels = compute_panels(
        imgs,
        np.asarray(out.pred),
        np.asarray(out.mask),
        patch_size=model.config.patch_size,
        norm_pix_loss=model.config.norm_pix_loss,
        norm=norm,
    )
    notes = [note] if note else []
    if model.config.norm_pix_loss:
        notes.append(
            "norm-pix model: each predicted patch is un-normalized with the true patch's mean and std"
        )
    titles = ("original", f"masked {mask_ratio:.0%}", "reconstruction", "reconstruction + visible")
    return draw_figure(panels, titles=titles, note="; ".join(notes) or None, scale=scale)


def save_png(image: Image.Image, path: str | os.PathLike) -> None:
    """Write ``image`` as a PNG at ``path`` (local or a bucket URL) atomically; makes parent
    folders."""
    path = run_path(path)
    encoded = io.BytesIO()
    image.save(encoded, format="PNG")
    with naming(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, encoded.getvalue())
