"""Tests of mae_jax.data: listing, decoding, the official transforms and the grain loaders."""

from __future__ import annotations

import io
import json
import math
import os

import numpy as np
import pytest
from PIL import Image

from mae_jax import data

MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])


def _save(img: Image.Image, path, **kwargs) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img.save(path, **kwargs)
    return str(path)


def _solid_colour(i: int) -> tuple[int, int, int]:
    """A colour that identifies image i after a bicubic resize (resampling keeps constants)."""
    return (10 + 17 * i, 250 - 13 * i, 40 + 5 * i)


def _solid_folder(root, n: int, classes: int = 1) -> data.ImageFolder:
    """n solid-colour PNGs; with classes > 1, spread over class folders c0, c1, ..."""
    for i in range(n):
        sub = f"c{i % classes}" if classes > 1 else ""
        size = (12 + i % 5, 9 + i % 3)
        _save(Image.new("RGB", size, _solid_colour(i)), root / sub / f"img{i:03d}.png")
    return data.ImageFolder(root)


def _image_ids(images: np.ndarray) -> list[int]:
    """Recovers the solid-colour index of each (H, W, 3) normalised image of a batch."""
    ids = []
    for img in images:
        rgb = np.round((img.astype(np.float64) * STD + MEAN) * 255).astype(int)
        assert (rgb == rgb[0, 0]).all(), "a solid-colour image did not stay solid"
        ids.append(int(round((rgb[0, 0, 0] - 10) / 17)))
        assert tuple(rgb[0, 0]) == _solid_colour(ids[-1])
    return ids


def _take(loader, k: int) -> list[tuple[int, dict[str, np.ndarray]]]:
    return [next(loader) for _ in range(k)]


# ----------------------------------------------------------------------------------------------
# Listing
# ----------------------------------------------------------------------------------------------


def test_class_folders_sorted_recursive_and_case_insensitive(tmp_path):
    red = Image.new("RGB", (4, 4), (255, 0, 0))
    _save(red, tmp_path / "zebra" / "a.png")
    _save(red, tmp_path / "ant" / "deep" / "er" / "b.JPG")
    _save(red, tmp_path / "ant" / "a.webp")
    _save(red, tmp_path / "ant" / "c.BMP")
    _save(red, tmp_path / "ant" / "notes.txt", format="PNG")  # not an image extension
    _save(red, tmp_path / ".cache" / "hidden.png")
    folder = data.ImageFolder(tmp_path)
    assert folder.classes == ("ant", "zebra")
    rel = [os.path.relpath(p, tmp_path) for p in folder.paths]
    assert rel == ["ant/a.webp", "ant/c.BMP", "ant/deep/er/b.JPG", "zebra/a.png"]
    assert folder.labels.tolist() == [0, 0, 0, 1] and folder.labels.dtype == np.int32


def test_flat_folder_has_label_zero(tmp_path):
    folder = _solid_folder(tmp_path, 3)
    assert len(folder) == 3 and folder.labels.tolist() == [0, 0, 0]


def test_empty_or_missing_folder_is_refused(tmp_path):
    (tmp_path / "readme.txt").write_text("no images here")
    with pytest.raises(data.DataError) as err:
        data.ImageFolder(tmp_path)
    assert (
        str(err.value) == f"{tmp_path}: no images found (looked for .jpg, .jpeg, .png, .webp, .bmp)"
    )
    with pytest.raises(data.DataError, match="does not exist"):
        data.ImageFolder(tmp_path / "nope")


def test_empty_class_folder_and_mixed_layout_are_refused(tmp_path):
    _save(Image.new("RGB", (4, 4)), tmp_path / "a" / "x.png")
    (tmp_path / "b").mkdir()
    with pytest.raises(data.DataError, match=r"/b: class folder has no images"):
        data.ImageFolder(tmp_path)
    _save(Image.new("RGB", (4, 4)), tmp_path / "b" / "y.png")
    _save(Image.new("RGB", (4, 4)), tmp_path / "stray.png")
    with pytest.raises(data.DataError, match="both image files and class sub-folders"):
        data.ImageFolder(tmp_path)


# ----------------------------------------------------------------------------------------------
# Decoding
# ----------------------------------------------------------------------------------------------


def test_modes_are_converted_to_rgb(tmp_path):
    gray = Image.new("L", (5, 4), 77)
    rgba = Image.new("RGBA", (5, 4), (10, 20, 30, 40))
    palette = Image.new("P", (5, 4), 1)
    palette.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    transparent = palette.copy()
    transparent.info["transparency"] = 1
    sixteen = Image.fromarray(np.array([[0, 32768, 65535, 257]], dtype=np.uint16))
    assert sixteen.mode == "I;16"
    cases = {
        "gray.png": (gray, (77, 77, 77)),
        "rgba.png": (rgba, (10, 20, 30)),
        "palette.png": (palette, (200, 100, 50)),
        "transparent.png": (transparent, (200, 100, 50)),
        "la.png": (Image.new("LA", (5, 4), (90, 3)), (90, 90, 90)),
        # Pure cyan ink with no black is RGB (0, 255, 255) under any CMYK formula.
        "cmyk.jpg": (Image.new("CMYK", (16, 16), (255, 0, 0, 0)), (0, 255, 255)),
    }
    for name, (img, rgb) in cases.items():
        path = _save(img, tmp_path / name)
        with Image.open(path) as check:
            assert check.mode == img.mode, name  # the file really holds that mode
        out = data.decode_rgb(path)
        assert out.mode == "RGB", name
        tol = 2 if name.endswith(".jpg") else 0
        np.testing.assert_allclose(np.asarray(out)[1, 1], rgb, atol=tol, err_msg=name)
    out = np.asarray(data.decode_rgb(_save(sixteen, tmp_path / "sixteen.png")))
    # 16-bit values scaled to 8 bits (v * 255 / 65535), not clipped at 255 like Pillow's convert.
    assert out[0, :, 0].tolist() == [0, 128, 255, 1] and (out[..., 0] == out[..., 2]).all()


def _corrupt_files(root) -> list[str]:
    rng = np.random.default_rng(0)
    noise = _save(
        Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)), root / "full.png"
    )
    with open(noise, "rb") as f:
        png = f.read()
    truncated = root / "truncated.png"
    truncated.write_bytes(png[: len(png) // 2])
    garbage = root / "garbage.jpg"
    garbage.write_bytes(rng.integers(0, 256, 1000, dtype=np.uint8).tobytes())
    os.remove(noise)
    return [str(truncated), str(garbage)]


def test_corrupt_file_raises_data_error_naming_it(tmp_path):
    for path in _corrupt_files(tmp_path):
        with pytest.raises(data.DataError, match=f"^{path}: cannot decode image"):
            data.decode_rgb(path)


def test_loader_skips_and_counts_corrupt_files(tmp_path):
    good = tmp_path / "good"
    for i in range(4):
        _save(Image.new("RGB", (10, 8), _solid_colour(i)), good / f"g{i}.png")
    bad = _corrupt_files(tmp_path / "bad")
    folder = data.ImageFolder(tmp_path)
    assert folder.classes == ("bad", "good") and len(folder) == 6
    with data.pretrain_batches(
        folder, batch_size=3, img_size=8, seed=5, end_epoch=2, read_threads=2, worker_count=0
    ) as loader:
        batches = list(loader)
        skipped = loader.num_skipped
    assert len(batches) == 4
    labels = np.concatenate([b["label"] for _, b in batches])
    assert (labels == 1).all()  # only the good class ever comes out
    # Independent count: a slot whose file is bad moves on along the epoch's order until a good
    # file, so it adds the length of the run of bad files that starts at it.
    expected = 0
    for epoch in range(2):
        order = [folder.paths[i] for i in data.epoch_order(6, 5, epoch)]
        for slot in range(6):
            run = 0
            while order[(slot + run) % 6] in bad:
                run += 1
            expected += run
    assert skipped == expected >= 4


def test_all_files_unreadable_is_an_error(tmp_path):
    _corrupt_files(tmp_path)
    folder = data.ImageFolder(tmp_path)
    with data.pretrain_batches(
        folder, batch_size=1, img_size=8, seed=0, read_threads=1, worker_count=0
    ) as it:
        with pytest.raises(data.DataError, match="none of the 2 images"):
            next(it)


# ----------------------------------------------------------------------------------------------
# Transforms
# ----------------------------------------------------------------------------------------------


def test_random_resized_crop_box_ranges():
    width, height = 500, 375
    rng = np.random.default_rng(0)
    fractions, aspects = [], []
    for _ in range(3000):
        top, left, h, w = data.random_resized_crop_box(rng, width, height)
        assert 0 <= top and top + h <= height and 0 <= left and left + w <= width
        fractions.append(w * h / (width * height))
        aspects.append(w / h)
    fractions, aspects = np.array(fractions), np.array(aspects)
    # w and h are rounded to integers, which moves the fraction and the ratio by under 1%.
    assert fractions.min() > 0.2 * 0.99 and fractions.max() <= 1.0
    assert aspects.min() > 0.75 * 0.99 and aspects.max() < 4 / 3 * 1.01
    assert fractions.min() < 0.21 and fractions.max() > 0.95  # the whole range is used
    assert aspects.min() < 0.76 and aspects.max() > 1.32
    assert np.median(aspects) > 1  # wide boxes fit a landscape image more often than tall ones


def test_random_resized_crop_box_distribution_on_a_square():
    # On a square every draw with area fraction s <= 3/4 fits (s * ratio <= 1), so there the
    # fraction must be uniform and the log-ratio symmetric.
    rng = np.random.default_rng(1)
    boxes = np.array([data.random_resized_crop_box(rng, 400, 400) for _ in range(4000)])
    fractions = boxes[:, 2] * boxes[:, 3] / 400**2
    low = np.sum((fractions >= 0.2) & (fractions < 0.475))
    high = np.sum((fractions >= 0.475) & (fractions < 0.75))
    assert abs(low - high) < 0.1 * (low + high) / 2
    assert abs(np.median(np.log(boxes[:, 3] / boxes[:, 2]))) < 0.02


def test_random_resized_crop_fallback_clamps_ratio():
    # A 1000x10 strip: no box of area >= 20% fits within ratio 4/3, so the fallback is used.
    box = data.random_resized_crop_box(np.random.default_rng(0), 1000, 10)
    assert box == (0, (1000 - 13) // 2, 10, 13)  # h = 10, w = round(10 * 4/3)
    box = data.random_resized_crop_box(np.random.default_rng(0), 10, 1000)
    assert box == ((1000 - 13) // 2, 0, 13, 10)  # w = 10, h = round(10 / (3/4))


def test_pretrain_transform_matches_hand_computation():
    rng = np.random.default_rng(3)
    img = Image.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8))
    out, (top, left, h, w), flipped = data.pretrain_transform(img, np.random.default_rng(7), 32)
    assert out.shape == (32, 32, 3) and out.dtype == np.float32
    assert (out >= (0 - MEAN) / STD - 1e-6).all() and (out <= (1 - MEAN) / STD + 1e-6).all()
    crop = img.crop((left, top, left + w, top + h)).resize((32, 32), Image.Resampling.BICUBIC)
    pixels = np.asarray(crop, dtype=np.float64)
    if flipped:
        pixels = pixels[:, ::-1]
    np.testing.assert_allclose(out, (pixels / 255 - MEAN) / STD, atol=2e-6)


def test_flip_happens_about_half_the_time_and_mirrors():
    img = Image.fromarray(np.tile(np.arange(0, 240, 8, dtype=np.uint8)[None, :, None], (20, 1, 3)))
    flips = [data.pretrain_transform(img, np.random.default_rng(s), 8)[2] for s in range(1000)]
    assert 0.45 < np.mean(flips) < 0.55
    flipped_seed = flips.index(True)
    out, box, _ = data.pretrain_transform(img, np.random.default_rng(flipped_seed), 8)
    top, left, h, w = box
    plain = img.crop((left, top, left + w, top + h)).resize((8, 8), Image.Resampling.BICUBIC)
    np.testing.assert_array_equal(out, data.normalize(np.asarray(plain))[:, ::-1])
    assert (np.diff(out[0, :, 0]) <= 0).all()  # an increasing gradient now decreases


def test_normalize_and_denormalize_against_hand_computation():
    pixels = np.random.default_rng(1).integers(0, 256, (4, 5, 3), dtype=np.uint8)
    out = data.normalize(pixels)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, (pixels / 255.0 - MEAN) / STD, atol=1e-6)
    assert out[..., 0].max() <= (1 - 0.485) / 0.229 + 1e-6
    np.testing.assert_allclose(data.denormalize(out), pixels / 255.0, atol=1e-6)
    assert data.denormalize(np.full((1, 3), 50.0)).tolist() == [[1.0, 1.0, 1.0]]  # clipped


def test_normalize_is_bit_equal_to_torchvision_order():
    # torchvision: ToTensor = float32 division by 255, Normalize = in-place sub_(mean).div_(std).
    torch = pytest.importorskip("torch")
    pixels = np.random.default_rng(2).integers(0, 256, (6, 7, 3), dtype=np.uint8)
    pixels[0, :3] = [[0, 0, 0], [255, 255, 255], [128, 1, 254]]
    x = torch.from_numpy(pixels).permute(2, 0, 1).float().div(255)
    x.sub_(torch.tensor(MEAN, dtype=torch.float32)[:, None, None])
    x.div_(torch.tensor(STD, dtype=torch.float32)[:, None, None])
    np.testing.assert_array_equal(data.normalize(pixels), x.permute(1, 2, 0).numpy())
    np.testing.assert_array_equal(data.normalize(pixels[:, ::-1]), data.normalize(pixels)[:, ::-1])


def test_normalize_on_device_is_bit_equal_to_the_host_table():
    import jax
    import jax.numpy as jnp

    every_value = np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, axis=1)  # (256, 3)
    batch = np.random.default_rng(5).integers(0, 256, (2, 9, 7, 3), dtype=np.uint8)
    for pixels in (every_value, batch):
        eager = data.normalize_on_device(jnp.asarray(pixels))
        jitted = jax.jit(data.normalize_on_device)(jnp.asarray(pixels))
        assert eager.dtype == jitted.dtype == jnp.float32 and eager.shape == pixels.shape
        np.testing.assert_array_equal(np.asarray(eager), data.normalize(pixels))
        np.testing.assert_array_equal(np.asarray(jitted), data.normalize(pixels))
    # The host table itself against float64 arithmetic (within float32 rounding).
    np.testing.assert_allclose(
        data.normalize(every_value), (every_value / 255.0 - MEAN) / STD, rtol=0, atol=1e-6
    )
    with pytest.raises(ValueError, match="expected uint8 pixels"):
        data.normalize_on_device(jnp.zeros((2, 3), jnp.float32))


def _smooth_noisy(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A photograph-like (height, width, 3) uint8 image: smooth colour waves plus mild noise."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    waves = np.stack([np.sin(xs * 0.011 + ys * 0.004), np.cos(ys * 0.009), np.sin(xs * 0.006)], -1)
    return np.clip(127.5 + 90 * waves + rng.normal(0, 6, waves.shape), 0, 255).astype(np.uint8)


def _encoded(pixels: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def _by_hand(img: Image.Image, box, flipped: bool, size: int) -> np.ndarray:
    """Today's reference: full decode, crop, bicubic resize, NumPy mirror."""
    top, left, h, w = box
    crop = img.convert("RGB").crop((left, top, left + w, top + h))
    pixels = np.asarray(crop.resize((size, size), Image.Resampling.BICUBIC))
    return pixels[:, ::-1] if flipped else pixels


def test_draft_scale_rule():
    jpeg = data.open_image(_encoded(np.zeros((64, 96, 3), np.uint8), "JPEG"), "x.jpg")
    assert data.draft_scale(jpeg, 64, 64, 8) == 8  # 64 >= 8 * 8 on both sides
    assert data.draft_scale(jpeg, 63, 96, 8) == 4  # 63 < 64: one side too short for 1/8
    assert data.draft_scale(jpeg, 40, 40, 8) == 4 and data.draft_scale(jpeg, 31, 40, 8) == 2
    assert data.draft_scale(jpeg, 15, 96, 8) == 1
    png = data.open_image(_encoded(np.zeros((64, 96, 3), np.uint8), "PNG"), "x.png")
    assert data.draft_scale(png, 64, 64, 8) == 1
    jpeg.load()  # already decoded: nothing left to save
    assert data.draft_scale(jpeg, 64, 64, 8) == 1


def test_draft_decodes_a_large_jpeg_smaller_and_close_to_full_decode():
    rng = np.random.default_rng(0)
    encoded = _encoded(_smooth_noisy(rng, 768, 1024), "JPEG")
    full = data.decode_bytes(encoded, "big.jpg")
    diffs, scales = [], []
    for seed in range(12):
        lazy = data.open_image(encoded, "big.jpg")
        out, box, flipped = data.pretrain_crop(lazy, np.random.default_rng(seed), 32)
        # The same draws as a full decode: the box comes from the header's size.
        ref, ref_box, ref_flip = data.pretrain_crop(full, np.random.default_rng(seed), 32)
        assert (box, flipped) == (ref_box, ref_flip) and out.dtype == np.uint8
        np.testing.assert_array_equal(ref, _by_hand(full, box, flipped, 32))
        decoded, scale = data.decode_for_crop(data.open_image(encoded, "big.jpg"), box, 32)
        expected = max(s for s in (1, 2, 4, 8) if min(box[2], box[3]) >= 32 * s)
        assert scale == expected >= 4  # every box of a 1024x768 image is >= 154 px on a side
        assert decoded.size == (-(-1024 // scale), -(-768 // scale))
        scales.append(scale)
        diffs.append(np.abs(out.astype(np.int64) - ref.astype(np.int64)))
    assert 8 in scales
    # DCT-domain downscaling is a slightly different low-pass filter than a bicubic shrink.
    # Measured here: mean 0.24 levels, max 2 (on busier content up to mean 0.7, max 9); a box
    # misplaced by a quarter of a reduced pixel gives a mean of 6 on such content.
    assert np.mean(diffs) < 0.5 and max(d.max() for d in diffs) <= 4


def test_without_draft_pixels_are_bit_identical_to_full_decode():
    rng = np.random.default_rng(1)
    small_jpeg = _encoded(_smooth_noisy(rng, 90, 120), "JPEG")  # every box < 2 * 64: no draft
    big_png = _encoded(_smooth_noisy(rng, 600, 800), "PNG")  # draft is for JPEG only
    for encoded, size in ((small_jpeg, 64), (big_png, 32)):
        for seed in range(6):
            lazy = data.open_image(encoded, "img")
            out, box, flipped = data.pretrain_crop(lazy, np.random.default_rng(seed), size)
            full = data.decode_bytes(encoded, "img")
            np.testing.assert_array_equal(out, _by_hand(full, box, flipped, size))


def _horizontal_gradient(width: int, height: int) -> Image.Image:
    """R = x * 255 / (width - 1): linear, so bicubic resampling keeps it linear away from edges."""
    ramp = np.linspace(0, 255, width)[None, :].repeat(height, 0)
    return Image.fromarray(np.stack([ramp, ramp, ramp], -1).round().astype(np.uint8))


def test_eval_transform_center_crop_on_gradient():
    assert [data.eval_resize_size(s) for s in (224, 192, 384)] == [256, 219, 384]
    img = _horizontal_gradient(320, 240)
    out = data.eval_transform(img, 224)
    assert out.shape == (224, 224, 3)
    # 320x240 -> 341x256 (shorter side 256), crop left = round(117 / 2) = 58 (half to even).
    # Output column c samples source x = (58 + c + 0.5) * 320 / 341 - 0.5.
    for col in (0, 111, 223):
        source_x = (58 + col + 0.5) * 320 / 341 - 0.5
        expected = (source_x * 255 / 319 / 255 - MEAN[0]) / STD[0]
        assert abs(out[100, col, 0] - expected) < 1.5 / 255 / STD[0], col


def test_crop_center_offsets_round_like_torchvision():
    # Pixel value = 16 * row + col. 9x7 -> 4x4: offsets round(2.5) = 2 and round(1.5) = 2.
    index = (16 * np.arange(7)[:, None] + np.arange(9)[None, :]).astype(np.uint8)
    crop = np.asarray(data.crop_center(Image.fromarray(index), 4))
    np.testing.assert_array_equal(crop, index[2:6, 2:6])
    crop = np.asarray(data.crop_center(Image.fromarray(index[:, :8]), 4))  # (8 - 4) / 2 = 2
    np.testing.assert_array_equal(crop, index[2:6, 2:6])
    with pytest.raises(ValueError, match="cannot centre-crop 8x8 from a 9x7 image"):
        data.crop_center(Image.fromarray(index), 8)


def test_load_image_squash_and_center_crop(tmp_path):
    path = _save(_horizontal_gradient(200, 100), tmp_path / "grad.png")
    squashed = data.load_image(path, 50)
    cropped = data.load_image(path, 50, center_crop=True)
    assert squashed.shape == cropped.shape == (50, 50, 3) and squashed.dtype == np.float32
    red = data.denormalize(squashed)[25, :, 0] * 255
    # Squash keeps the full ramp; the crop keeps the middle half of it (x in [50, 150)).
    assert red[0] < 5 and red[-1] > 250
    red = data.denormalize(cropped)[25, :, 0] * 255
    assert abs(red[0] - 51 * 255 / 199) < 2 and abs(red[-1] - 149 * 255 / 199) < 2
    with pytest.raises(data.DataError, match="missing.png: cannot decode"):
        data.load_image(tmp_path / "missing.png", 50)


# ----------------------------------------------------------------------------------------------
# Pretraining loader
# ----------------------------------------------------------------------------------------------


def _loader(folder, **kwargs):
    kwargs = dict(dict(batch_size=3, img_size=8, seed=11, read_threads=2, worker_count=0), **kwargs)
    return data.pretrain_batches(folder, **kwargs)


def test_batches_shapes_and_labels(tmp_path):
    folder = _solid_folder(tmp_path, 7, classes=3)
    with _loader(folder, batch_size=2) as loader:
        assert loader.steps_per_epoch == data.steps_per_epoch(7, 2) == 3
        epoch, batch = next(loader)
    assert epoch == 0 and set(batch) == {"image", "label"}
    assert batch["image"].shape == (2, 8, 8, 3) and batch["image"].dtype == np.float32
    assert batch["label"].dtype == np.int32
    ids = _image_ids(batch["image"])
    assert batch["label"].tolist() == [
        folder.labels[folder.paths.index(str(tmp_path / f"c{i % 3}" / f"img{i:03d}.png"))]
        for i in ids
    ]


def test_shards_are_disjoint_and_cover_the_epoch(tmp_path):
    folder = _solid_folder(tmp_path, 12)
    seen = []
    for shard in range(2):
        with _loader(folder, shard_index=shard, shard_count=2, end_epoch=1) as loader:
            batches = list(loader)
        assert len(batches) == 2 and all(e == 0 for e, _ in batches)
        seen.append({i for _, b in batches for i in _image_ids(b["image"])})
    assert len(seen[0]) == len(seen[1]) == 6
    assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(12))


def test_drop_last_and_epochs_have_their_own_order(tmp_path):
    folder = _solid_folder(tmp_path, 13)
    with _loader(folder, batch_size=4, end_epoch=3) as loader:
        batches = list(loader)
    assert [e for e, _ in batches] == [0] * 3 + [1] * 3 + [2] * 3
    assert all(b["image"].shape[0] == 4 for _, b in batches)
    orders = [sum((_image_ids(b["image"]) for e, b in batches if e == k), []) for k in range(3)]
    for order in orders:
        assert len(set(order)) == 12  # one image of 13 is dropped, none repeats
    assert orders[0] != orders[1] and orders[1] != orders[2]


def test_same_seed_reproduces_and_other_seed_differs(tmp_path):
    folder = _solid_folder(tmp_path, 9)
    with _loader(folder) as a, _loader(folder, read_threads=1) as b, _loader(folder, seed=12) as c:
        first, second, other = _take(a, 4), _take(b, 4), _take(c, 4)
    for (ea, ba), (eb, bb) in zip(first, second, strict=True):
        assert ea == eb
        np.testing.assert_array_equal(ba["image"], bb["image"])
        np.testing.assert_array_equal(ba["label"], bb["label"])
    pairs = zip(first, other, strict=True)
    assert any(not np.array_equal(x["image"], y["image"]) for (_, x), (_, y) in pairs)


def test_resume_from_state_gives_the_same_batches(tmp_path):
    # Random-content images so that crops and flips show up in the pixels, not only the order.
    rng = np.random.default_rng(0)
    for i in range(8):
        pixels = rng.integers(0, 256, (20 + i, 16, 3), dtype=np.uint8)
        _save(Image.fromarray(pixels), tmp_path / f"r{i}.png")
    folder = data.ImageFolder(tmp_path)
    with _loader(folder) as straight:  # 2 steps per epoch
        reference = _take(straight, 7)
    with _loader(folder) as first_run:
        _take(first_run, 3)
        state = json.loads(json.dumps(first_run.get_state()))
    assert state["epoch"] == 1 and state["step"] == 1
    with _loader(folder) as resumed:
        resumed.set_state(state)
        rest = _take(resumed, 4)
    for (e_ref, b_ref), (e, b) in zip(reference[3:], rest, strict=True):
        assert e == e_ref
        np.testing.assert_array_equal(b["image"], b_ref["image"])
        np.testing.assert_array_equal(b["label"], b_ref["label"])
    with _loader(folder, start_epoch=2) as from_epoch:
        epoch, batch = next(from_epoch)
    assert epoch == 2 and np.array_equal(batch["image"], reference[4][1]["image"])
    with _loader(folder, batch_size=2) as other, pytest.raises(data.DataError, match="batch_size"):
        other.set_state(state)


def test_worker_processes_give_the_same_batches_and_resume(tmp_path):
    folder = _solid_folder(tmp_path, 8)  # 2 steps per epoch
    with _loader(folder, end_epoch=3) as threads:
        expected = _take(threads, 3)
        state = threads.get_state()
        expected += list(threads)
    assert len(expected) == 6 and state["epoch"] == 1 and state["step"] == 1
    # Resumed mid-epoch in two worker processes (one start-up, 2-5 s): each builds every other
    # batch, and neither the order nor the content may change.
    with _loader(folder, end_epoch=3, worker_count=2, prefetch_batches=3) as workers:
        workers.set_state(state)
        got = list(workers)
        assert workers.get_state()["epoch"] == 3 and workers.num_skipped == 0
    assert len(got) == 3
    for (e_ref, b_ref), (e, b) in zip(expected[3:], got, strict=True):
        assert e == e_ref and np.array_equal(b["image"], b_ref["image"])
        assert np.array_equal(b["label"], b_ref["label"])


def test_uint8_pixels_are_the_float_batches_before_normalize(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(6):
        _save(Image.fromarray(_smooth_noisy(rng, 40 + i, 50)), tmp_path / f"p{i}.jpg", quality=90)
    folder = data.ImageFolder(tmp_path)
    with _loader(folder, end_epoch=2) as floats, _loader(folder, end_epoch=2, pixels="uint8") as u8:
        pairs = list(zip(floats, u8, strict=True))
    assert len(pairs) == 4
    for (e_f, b_f), (e_u, b_u) in pairs:
        assert e_f == e_u and b_u["image"].dtype == np.uint8 and b_f["image"].dtype == np.float32
        np.testing.assert_array_equal(data.normalize(b_u["image"]), b_f["image"])
    with pytest.raises(ValueError, match="pixels='uint8' is for the default"):
        _loader(folder, pixels="uint8", transform=data.pretrain_pixels)
    with pytest.raises(ValueError, match="prefetch_batches 0 must be >= 1"):
        _loader(folder, prefetch_batches=0)


def test_auto_worker_count_follows_the_affinity_mask(monkeypatch, tmp_path):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    assert data.auto_worker_count() == 7
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3}, raising=False)
    assert data.auto_worker_count() == 1  # never 0: -1 always means worker processes
    folder = _solid_folder(tmp_path, 3)
    with data.pretrain_batches(folder, batch_size=1, img_size=8, seed=0) as loader:
        assert loader.worker_count == 1  # the default is -1: automatic


def test_too_few_images_for_a_batch_is_refused(tmp_path):
    folder = _solid_folder(tmp_path, 5)
    with pytest.raises(data.DataError, match="fewer than one batch of 3 per host"):
        _loader(folder, shard_count=2)
    with pytest.raises(ValueError, match="shard_index 2"):
        _loader(folder, shard_index=2, shard_count=2)


# ----------------------------------------------------------------------------------------------
# Evaluation loader
# ----------------------------------------------------------------------------------------------


def test_eval_batches_cover_every_image_once_with_padding(tmp_path):
    folder = _solid_folder(tmp_path, 5, classes=2)
    (tmp_path / "c0" / "broken.png").write_bytes(b"not a png")
    folder = data.ImageFolder(tmp_path)  # 6 files, one unreadable
    seen, valid_per_host = [], []
    for shard in range(2):
        batches = list(
            data.eval_batches(
                folder, batch_size=2, img_size=8, shard_index=shard, shard_count=2, read_threads=2
            )
        )
        assert len(batches) == math.ceil(3 / 2)  # both hosts: 3 images -> 2 batches
        valid = np.concatenate([b["valid"] for b in batches])
        images = np.concatenate([b["image"] for b in batches])[valid]
        labels = np.concatenate([b["label"] for b in batches])[valid]
        valid_per_host.append(int(valid.sum()))
        for i, label in zip(_image_ids(images), labels, strict=True):
            assert label == i % 2
            seen.append(i)
    assert sorted(seen) == list(range(5)) and sum(valid_per_host) == 5
