"""Tests of mae_jax.data.augment: RandAugment ops and policy, the fine-tune and linear-probe transforms,
random erasing, Mixup/CutMix and the two losses (against torch)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from mae_jax import data
from mae_jax.data import augment

ALL_OPS = sorted(set(augment.RAND_OPS) | set(augment.RAND_INCREASING_OPS))
GEOMETRIC_OPS = ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")


def _random_image(h: int = 12, w: int = 16, seed: int = 0) -> tuple[np.ndarray, Image.Image]:
    pixels = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    return pixels, Image.fromarray(pixels)


def _smooth_one_hot_reference(labels: np.ndarray, num_classes: int, s: float) -> np.ndarray:
    return np.eye(num_classes)[labels] * (1.0 - s) + s / num_classes


# ----------------------------------------------------------------------------------------------
# Config string
# ----------------------------------------------------------------------------------------------


def test_fill_color_is_the_imagenet_mean_in_0_255():
    assert augment.FILL_COLOR == (124, 116, 104)


def test_parse_official_config_string():
    cfg = augment.parse_rand_augment("rand-m9-mstd0.5-inc1")
    assert (cfg.magnitude, cfg.num_layers, cfg.magnitude_std, cfg.increasing, cfg.prob) == (
        9.0,
        2,
        0.5,
        True,
        0.5,
    )
    assert cfg.ops == augment.RAND_INCREASING_OPS and len(cfg.ops) == 15
    bare = augment.parse_rand_augment("rand")
    assert (bare.magnitude, bare.num_layers, bare.magnitude_std, bare.increasing) == (
        10.0,
        2,
        0.0,
        False,
    )
    assert bare.ops == augment.RAND_OPS
    other = augment.parse_rand_augment("rand-n3-m5-inc0-mstd1.25")
    assert (other.magnitude, other.num_layers, other.magnitude_std, other.increasing) == (
        5.0,
        3,
        1.25,
        False,
    )


@pytest.mark.parametrize(
    "config, complaint",
    [
        ("rund-m9", "must start with 'rand'"),
        ("rand-x9", "unknown section 'x9'"),
        ("rand-w0", "unknown section 'w0'"),
        ("rand-m9x", "'9x' in 'm9x' is not a number"),
        ("rand-n2.5", "'2.5' in 'n2.5' is not a number"),
        ("rand--m9", "cannot read section ''"),
        ("rand-mstd", "cannot read section 'mstd'"),
        ("rand-m11", "magnitude m must be in [0, 10], got 11"),
        ("rand-inc2", "inc must be 0 or 1"),
    ],
)
def test_bad_config_string_gives_one_line_error(config, complaint):
    with pytest.raises(augment.AugmentConfigError) as err:
        augment.parse_rand_augment(config)
    message = str(err.value)
    assert complaint in message and repr(config) in message and "\n" not in message


# ----------------------------------------------------------------------------------------------
# Single ops
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL_OPS)
def test_every_op_gives_rgb_of_same_size(name):
    _, img = _random_image(11, 17)
    rng = np.random.default_rng(1)
    for level in (0.0, 3.3, 9.0, 10.0):
        out = augment.apply_op(img, name, augment.op_argument(name, level, rng))
        assert out.mode == "RGB" and out.size == (17, 11)


@pytest.mark.parametrize(
    "name",
    GEOMETRIC_OPS
    + (
        "SolarizeIncreasing",
        "SolarizeAdd",
        "ColorIncreasing",
        "ContrastIncreasing",
        "BrightnessIncreasing",
        "SharpnessIncreasing",
    ),
)
def test_level_zero_is_identity(name):
    pixels, img = _random_image()
    for seed in range(4):  # both signs of the signed ops
        arg = augment.op_argument(name, 0.0, np.random.default_rng(seed))
        np.testing.assert_array_equal(np.asarray(augment.apply_op(img, name, arg)), pixels)


def test_level_to_argument_ranges():
    def args(name: str, level: float) -> set[float]:
        return {augment.op_argument(name, level, np.random.default_rng(s)) for s in range(20)}

    assert args("Rotate", 10.0) == {30.0, -30.0}
    assert args("Rotate", 5.0) == {15.0, -15.0}
    assert args("ShearX", 10.0) == {0.3, -0.3}
    assert args("TranslateYRel", 10.0) == {0.45, -0.45}
    assert {round(a, 12) for a in args("ColorIncreasing", 9.0)} == {1.81, 0.19}
    assert args("Contrast", 9.0) == {9.0 / 10.0 * 1.8 + 0.1}
    assert [augment.op_argument("PosterizeIncreasing", lv, None) for lv in (0, 2.5, 9, 10)] == [
        4,
        3,
        1,
        0,
    ]
    assert [augment.op_argument("Posterize", lv, None) for lv in (0, 5, 10)] == [0, 2, 4]
    assert [augment.op_argument("SolarizeIncreasing", lv, None) for lv in (0, 9, 10)] == [
        256,
        26,
        0,
    ]
    assert [augment.op_argument("Solarize", lv, None) for lv in (0, 9)] == [0, 230]
    assert [augment.op_argument("SolarizeAdd", lv, None) for lv in (0, 9, 10)] == [0, 99, 110]
    assert augment.op_argument("Invert", 7.0, None) is None
    with pytest.raises(ValueError, match="unknown RandAugment op 'Blur'"):
        augment.op_argument("Blur", 1.0, None)


def test_invert_solarize_posterize_solarize_add_are_exact():
    pixels, img = _random_image()
    p = pixels.astype(int)
    np.testing.assert_array_equal(np.asarray(augment.apply_op(img, "Invert", None)), 255 - p)
    for threshold in (0, 26, 128, 255, 256):
        out = np.asarray(augment.apply_op(img, "SolarizeIncreasing", threshold))
        np.testing.assert_array_equal(out, np.where(p >= threshold, 255 - p, p))
    for bits in (0, 1, 3, 4, 8):
        out = np.asarray(augment.apply_op(img, "PosterizeIncreasing", bits))
        np.testing.assert_array_equal(out, p // 2 ** (8 - bits) * 2 ** (8 - bits))
    for add in (0, 99, 110):
        out = np.asarray(augment.apply_op(img, "SolarizeAdd", add))
        np.testing.assert_array_equal(out, np.where(p < 128, np.minimum(p + add, 255), p))


def test_enhance_ops_change_the_image_the_expected_way():
    pixels, img = _random_image()
    p = pixels.astype(float)
    for factor in (0.19, 1.81):
        out = np.asarray(augment.apply_op(img, "BrightnessIncreasing", factor)).astype(float)
        assert np.abs(out - np.clip(p * factor, 0, 255)).max() <= 1.0
    gray = np.asarray(augment.apply_op(img, "ColorIncreasing", 0.0)).astype(int)
    luma = (p[..., 0] * 299 + p[..., 1] * 587 + p[..., 2] * 114) / 1000
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
    assert np.abs(gray[..., 0] - luma).max() <= 1.0
    flat = np.asarray(augment.apply_op(img, "ContrastIncreasing", 0.0)).astype(int)
    assert (flat == int(luma.mean() + 0.5)).all()
    # Sharpness 1.9 moves values away from their 3x3 smoothed neighbourhood: more high frequency.
    sharp = np.asarray(augment.apply_op(img, "SharpnessIncreasing", 1.9)).astype(float)
    assert np.abs(np.diff(sharp, axis=1)).mean() > np.abs(np.diff(p, axis=1)).mean()


def test_autocontrast_and_equalize():
    ramp = np.tile(np.linspace(50, 150, 16).round().astype(np.uint8)[None, :, None], (4, 1, 3))
    out = np.asarray(augment.apply_op(Image.fromarray(ramp), "AutoContrast", None)).astype(float)
    expected = (ramp.astype(float) - 50) * 255 / 100
    assert out.min() == 0 and out.max() == 255 and np.abs(out - expected).max() <= 1.0
    two = np.full((32, 32, 3), 50, np.uint8)
    two[:, 16:] = 200
    eq = np.asarray(augment.apply_op(Image.fromarray(two), "Equalize", None))
    assert (eq[:, :16] == 0).all() and (eq[:, 16:] == 255).all()
    # Equalize maps each level to 255 x the fraction of pixels below it (the histogram's last
    # level left out of the count, as Pillow does), so the output histogram is roughly flat.
    skewed = (np.random.default_rng(0).random((64, 64, 3)) ** 3 * 255).astype(np.uint8)
    flat = np.asarray(augment.apply_op(Image.fromarray(skewed), "Equalize", None)).astype(float)
    for c in range(3):
        counts = np.bincount(skewed[..., c].ravel(), minlength=256)
        below = np.cumsum(counts) - counts
        top_count = counts[np.flatnonzero(counts)[-1]]
        expected = 255 * below[skewed[..., c]] / (counts.sum() - top_count)
        assert np.abs(flat[..., c] - expected).max() <= 1.5  # Pillow rounds its step down
        assert np.abs(flat[..., c] - skewed[..., c]).max() > 60


def test_rotate_moves_pixels_counterclockwise_about_the_centre():
    square = np.zeros((9, 9, 3), np.uint8)
    square[1, 6] = 255
    out = np.asarray(augment.apply_op(Image.fromarray(square), "Rotate", 90.0))
    # Centre (4.5, 4.5); pixel centre (x 6.5, y 1.5) is at (+2, -3); a quarter turn to the left
    # (y pointing down) sends it to (-3, -2): column 1, row 2.
    assert out[2, 1].tolist() == [255, 255, 255]
    assert out[4, 4].tolist() == [0, 0, 0]
    # 30 degrees: follow the centroid of a blob, relative to a rotated empty image (whose corners
    # are filled with the mean colour).
    blob = np.zeros((31, 31, 3), np.uint8)
    blob[8:11, 20:23] = 200  # centre at x 21.5, y 9.5, i.e. (+6, -6) from (15.5, 15.5)
    rotated = np.asarray(augment.apply_op(Image.fromarray(blob), "Rotate", 30.0)).astype(float)
    empty = np.asarray(augment.apply_op(Image.fromarray(np.zeros_like(blob)), "Rotate", 30.0))
    weight = (rotated - empty)[..., 0]
    assert empty[0, 0].tolist() == list(augment.FILL_COLOR)
    ys, xs = np.mgrid[0:31, 0:31] + 0.5
    cx, cy = (weight * xs).sum() / weight.sum(), (weight * ys).sum() / weight.sum()
    t = math.radians(30.0)
    expected_x = 15.5 + 6 * math.cos(t) + (-6) * math.sin(t)
    expected_y = 15.5 - 6 * math.sin(t) + (-6) * math.cos(t)
    assert abs(cx - expected_x) < 0.1 and abs(cy - expected_y) < 0.1


def test_shear_and_translate_move_pixels_where_expected():
    lines = np.zeros((20, 20, 3), np.uint8)
    lines[:, 7] = 200
    img = Image.fromarray(lines)
    sheared = np.asarray(augment.apply_op(img, "ShearX", 0.4))
    # Output column x samples input x + 0.4 * (y + 0.5): the line moves left by 1 at row 2 ...
    for row, shift in ((2, 1), (7, 3), (12, 5)):
        assert np.flatnonzero(sheared[row, :, 0] == 200).tolist() == [7 - shift]
    sheared_y = np.asarray(
        augment.apply_op(Image.fromarray(lines.transpose(1, 0, 2)), "ShearY", 0.4)
    )
    for col, shift in ((2, 1), (7, 3)):
        assert np.flatnonzero(sheared_y[:, col, 0] == 200).tolist() == [7 - shift]

    pixels, img = _random_image(20, 20)
    moved = np.asarray(augment.apply_op(img, "TranslateXRel", 0.25))  # 5 of 20 columns
    np.testing.assert_array_equal(moved[:, :15], pixels[:, 5:])
    assert (moved[:, 15:] == augment.FILL_COLOR).all()
    moved = np.asarray(augment.apply_op(img, "TranslateYRel", -0.25))
    np.testing.assert_array_equal(moved[5:], pixels[:15])
    assert (moved[:5] == augment.FILL_COLOR).all()


# ----------------------------------------------------------------------------------------------
# RandAugment policy
# ----------------------------------------------------------------------------------------------


def test_rand_augment_policy_statistics(monkeypatch):
    """Ops drawn uniformly, applied with p=0.5, magnitudes ~ N(9, 0.5) clipped to [0, 10]."""
    calls: list[tuple[str, float]] = []
    for name in ALL_OPS:
        monkeypatch.setitem(
            augment._APPLY,
            name,
            lambda img, arg, fill, name=name: (calls.append((name, arg)), img)[1],
        )
    _, img = _random_image(4, 4)
    rng = np.random.default_rng(0)
    runs = 6000
    for _ in range(runs):
        augment.rand_augment(img, rng, "rand-m9-mstd0.5-inc1")
    names = [name for name, _ in calls]
    assert set(names) == set(augment.RAND_INCREASING_OPS)
    expected_applied = runs * 2 * 0.5
    assert abs(len(calls) - expected_applied) < 4 * math.sqrt(expected_applied * 0.5)
    counts = np.array([names.count(n) for n in augment.RAND_INCREASING_OPS])
    per_op = len(calls) / 15
    assert np.abs(counts - per_op).max() < 5 * math.sqrt(per_op)
    levels = np.array(
        [abs(a) / 30 * 10 for n, a in calls if n == "Rotate"]
        + [abs(a) / 0.3 * 10 for n, a in calls if n in ("ShearX", "ShearY")]
    )
    clipped = np.minimum(np.random.default_rng(1).normal(9, 0.5, 200_000), 10)
    assert levels.max() <= 10 + 1e-9 and (levels == 10).mean() > 0.005
    assert abs(levels.mean() - clipped.mean()) < 0.05 and abs(levels.std() - clipped.std()) < 0.05
    signs = np.array([a > 0 for n, a in calls if n == "Rotate"])
    assert 0.4 < signs.mean() < 0.6


def test_rand_augment_is_deterministic_and_n0_is_identity():
    pixels, img = _random_image(24, 24)
    a = np.asarray(augment.rand_augment(img, np.random.default_rng(5)))
    b = np.asarray(augment.rand_augment(img, np.random.default_rng(5)))
    np.testing.assert_array_equal(a, b)
    changed = sum(
        not np.array_equal(np.asarray(augment.rand_augment(img, np.random.default_rng(s))), pixels)
        for s in range(40)
    )
    assert changed > 20  # about 3/4 of the images get at least one op
    np.testing.assert_array_equal(
        np.asarray(augment.rand_augment(img, np.random.default_rng(0), "rand-n0")), pixels
    )


# ----------------------------------------------------------------------------------------------
# Transforms and random erasing
# ----------------------------------------------------------------------------------------------


def test_finetune_transform_shape_dtype_and_determinism():
    _, img = _random_image(40, 50)
    out = augment.finetune_transform(img, np.random.default_rng(3), 32)
    assert out.shape == (32, 32, 3) and out.dtype == np.float32 and np.isfinite(out).all()
    again = augment.finetune_transform(img, np.random.default_rng(3), 32)
    np.testing.assert_array_equal(out, again)
    gray = augment.finetune_transform(img.convert("L"), np.random.default_rng(3), 16)
    assert gray.shape == (16, 16, 3)


def test_finetune_transform_without_aa_or_erasing_is_crop_flip_normalise():
    solid = Image.new("RGB", (30, 20), (200, 40, 90))
    out = augment.finetune_transform(
        solid, np.random.default_rng(0), 16, auto_augment=None, re_prob=0.0
    )
    expected = (np.array([200, 40, 90]) / 255 - data.IMAGENET_MEAN) / data.IMAGENET_STD
    assert np.abs(out - expected).max() < 1e-6


def _erased_box(changed: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.flatnonzero(changed.any(1)), np.flatnonzero(changed.any(0))
    top, left = rows[0], cols[0]
    h, w = rows[-1] - top + 1, cols[-1] - left + 1
    assert changed[top : top + h, left : left + w].all() and changed.sum() == h * w
    return int(top), int(left), int(h), int(w)


def test_finetune_transform_erases_one_box_with_p1_and_nothing_with_p0():
    solid = Image.new("RGB", (40, 40), (90, 120, 30))
    size = 40
    plain = augment.finetune_transform(
        solid, np.random.default_rng(0), size, auto_augment=None, re_prob=0.0
    )
    for seed in range(30):
        kept = augment.finetune_transform(
            solid, np.random.default_rng(seed), size, auto_augment=None, re_prob=0.0
        )
        np.testing.assert_array_equal(kept, plain)
        erased = augment.finetune_transform(
            solid, np.random.default_rng(seed), size, auto_augment=None, re_prob=1.0
        )
        top, left, h, w = _erased_box((erased != plain).any(-1))
        # h and w are rounded from sqrt(area * aspect), sqrt(area / aspect).
        area_hi = (math.sqrt(size * size / 3 * 1 / 0.3) + 0.5) * (
            math.sqrt(size * size / 3 * 0.3) + 0.5
        )
        assert 0.02 * size * size * 0.6 <= h * w <= area_hi
        assert h < size and w < size


def test_random_erasing_box_statistics_and_values():
    pixels = np.zeros((64, 48, 3), np.float32)
    areas, aspects, inside = [], [], []
    for seed in range(300):
        out, box = augment.random_erasing(pixels, np.random.default_rng(seed), 1.0)
        assert box is not None
        assert _erased_box((out != 0).any(-1)) == box
        top, left, h, w = box
        areas.append(h * w / (64 * 48))
        aspects.append(h / w)
        inside.append(out[top : top + h, left : left + w].ravel())
    areas, aspects = np.array(areas), np.array(aspects)
    assert 0.015 < areas.min() and areas.max() < 0.36
    assert abs(areas.mean() - (0.02 + 1 / 3) / 2) < 0.02
    assert 0.25 < aspects.min() and aspects.max() < 1 / 0.25
    assert abs(np.log(aspects).mean()) < 0.1  # log-uniform, symmetric about 1
    values = np.concatenate(inside)
    assert abs(values.mean()) < 0.01 and abs(values.std() - 1) < 0.01
    untouched, none = augment.random_erasing(pixels, np.random.default_rng(0), 0.0)
    assert none is None and (untouched == 0).all()
    assert (pixels == 0).all()  # the input is never modified


def test_single_draw_crop_box_matches_the_recipe():
    for seed in range(50):
        width, height = 37, 23
        got = augment.single_draw_crop_box(np.random.default_rng(seed), width, height)
        g = np.random.default_rng(seed)
        area = width * height * g.uniform(0.08, 1.0)
        aspect = math.exp(g.uniform(math.log(3 / 4), math.log(4 / 3)))
        w = min(int(round(math.sqrt(area * aspect))), width)
        h = min(int(round(math.sqrt(area / aspect))), height)
        assert got == (int(g.integers(0, height - h + 1)), int(g.integers(0, width - w + 1)), h, w)
    # A long thin image: the width is clamped to the image instead of drawing again.
    boxes = [augment.single_draw_crop_box(np.random.default_rng(s), 4, 200) for s in range(50)]
    assert any(w == 4 for _, _, _, w in boxes)
    assert all(0 <= t and t + h <= 200 and 0 <= left and left + w <= 4 for t, left, h, w in boxes)


def test_linprobe_transform_is_crop_resize_and_maybe_flip():
    pixels, img = _random_image(30, 40)
    flips = 0
    for seed in range(20):
        out = augment.linprobe_transform(img, np.random.default_rng(seed), 16)
        assert out.shape == (16, 16, 3) and out.dtype == np.float32
        top, left, h, w = augment.single_draw_crop_box(np.random.default_rng(seed), 40, 30)
        crop = np.asarray(
            img.crop((left, top, left + w, top + h)).resize((16, 16), Image.Resampling.BICUBIC)
        )
        if np.array_equal(out, data.normalize(crop)):
            continue
        np.testing.assert_array_equal(out, data.normalize(crop[:, ::-1]))
        flips += 1
    assert 3 <= flips <= 17


# ----------------------------------------------------------------------------------------------
# Mixup / CutMix
# ----------------------------------------------------------------------------------------------


def _batch(n: int = 6, h: int = 8, w: int = 10, seed: int = 0):
    g = np.random.default_rng(seed)
    return g.standard_normal((n, h, w, 3)).astype(np.float32), g.integers(0, 5, n)


def test_smooth_one_hot_values_are_exact():
    out = augment.smooth_one_hot(np.array([2, 0]), 10, 0.1)
    assert out.dtype == np.float32
    assert out[0, 2] == np.float32(1 - 0.1 + 0.01) and out[0, 0] == np.float32(0.01)
    np.testing.assert_array_equal(
        out, _smooth_one_hot_reference(np.array([2, 0]), 10, 0.1).astype(np.float32)
    )
    assert (augment.smooth_one_hot(np.array([1]), 3, 0.0) == [[0, 1, 0]]).all()


def test_mixup_blends_with_the_reversed_batch():
    images, labels = _batch()
    before = images.copy()
    out, targets = augment.mixup_cutmix(
        images, labels, np.random.default_rng(7), num_classes=5, cutmix_alpha=0.0
    )
    g = np.random.default_rng(7)
    assert g.random() < 1.0
    lam = g.beta(0.8, 0.8)
    np.testing.assert_allclose(out, lam * before + (1 - lam) * before[::-1], atol=1e-6)
    smooth = _smooth_one_hot_reference(labels, 5, 0.1)
    np.testing.assert_allclose(targets, lam * smooth + (1 - lam) * smooth[::-1], atol=1e-7)
    np.testing.assert_allclose(targets.sum(1), 1.0, atol=1e-6)
    np.testing.assert_array_equal(images, before)


def test_cutmix_box_area_matches_corrected_lambda():
    images, labels = _batch(4, 16, 12, seed=1)
    for seed in range(20):
        out, targets = augment.mixup_cutmix(
            images,
            labels,
            np.random.default_rng(seed),
            num_classes=5,
            mixup_alpha=0.0,
            label_smoothing=0.0,
        )
        g = np.random.default_rng(seed)
        g.random()
        raw_lam = g.beta(1.0, 1.0)
        changed = (out != images).any(-1)
        assert (changed == changed[0]).all()  # one box for the whole batch
        area = changed[0].sum()
        if area:
            top, left, h, w = _erased_box(changed[0])
            np.testing.assert_array_equal(
                out[:, top : top + h, left : left + w], images[::-1, top : top + h, left : left + w]
            )
            # The box side is twice half of int(side * sqrt(1 - lam)) before clipping.
            assert h <= 2 * (int(16 * math.sqrt(1 - raw_lam)) // 2)
            assert w <= 2 * (int(12 * math.sqrt(1 - raw_lam)) // 2)
        lam = 1 - area / (16 * 12)
        onehot = np.eye(5)[labels]
        np.testing.assert_allclose(targets, lam * onehot + (1 - lam) * onehot[::-1], atol=1e-7)
        np.testing.assert_allclose(targets.sum(1), 1.0, atol=1e-6)


def test_switch_probability_and_prob_zero():
    images, labels = _batch()
    cutmix = 0
    for seed in range(200):
        out, _ = augment.mixup_cutmix(images, labels, np.random.default_rng(seed), num_classes=5)
        changed = (out != images).any(-1)
        cutmix += not changed.all()  # mixup changes every pixel, CutMix only a box
    assert 70 < cutmix < 130
    out, targets = augment.mixup_cutmix(
        images, labels, np.random.default_rng(0), num_classes=5, prob=0.0
    )
    np.testing.assert_array_equal(out, images)
    np.testing.assert_allclose(targets, _smooth_one_hot_reference(labels, 5, 0.1), atol=1e-7)


def test_mixup_rejects_bad_batches():
    images, labels = _batch()
    with pytest.raises(ValueError, match="batch size 5 is odd"):
        augment.mixup_cutmix(images[:5], labels[:5], np.random.default_rng(0), num_classes=5)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        augment.mixup_cutmix(images, labels, np.random.default_rng(0), num_classes=3)
    with pytest.raises(ValueError, match="one of them > 0"):
        augment.mixup_cutmix(
            images,
            labels,
            np.random.default_rng(0),
            num_classes=5,
            mixup_alpha=0.0,
            cutmix_alpha=0.0,
        )
    with pytest.raises(ValueError, match=r"images must be \(N, H, W, C\)"):
        augment.mixup_cutmix(images[0], labels, np.random.default_rng(0), num_classes=5)


# ----------------------------------------------------------------------------------------------
# Losses against torch
# ----------------------------------------------------------------------------------------------


def test_losses_match_torch():
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    g = np.random.default_rng(0)
    logits = (g.standard_normal((16, 10)) * 2).astype(np.float32)
    labels = g.integers(0, 10, 16)
    images = np.zeros((16, 2, 2, 3), np.float32)
    _, targets = augment.mixup_cutmix(images, labels, g, num_classes=10, cutmix_alpha=0.0)
    t_logits, t_labels = torch.from_numpy(logits), torch.from_numpy(labels)

    soft_ref = F.cross_entropy(t_logits, torch.from_numpy(targets)).item()
    soft_manual = (-torch.from_numpy(targets) * F.log_softmax(t_logits, -1)).sum(-1).mean().item()
    assert abs(soft_ref - soft_manual) < 1e-6
    assert abs(float(augment.soft_target_cross_entropy(logits, targets)) - soft_ref) < 1e-6

    for s in (0.0, 0.1, 0.3):
        log_probs = F.log_softmax(t_logits, -1)
        # timm's LabelSmoothingCrossEntropy, written out: confidence * nll + s * mean(-log p).
        timm_style = (
            ((1 - s) * -log_probs.gather(-1, t_labels[:, None])[:, 0] + s * -log_probs.mean(-1))
            .mean()
            .item()
        )
        torch_ls = F.cross_entropy(t_logits, t_labels, label_smoothing=s).item()
        assert abs(timm_style - torch_ls) < 1e-6
        ours = float(augment.smoothed_cross_entropy(logits, labels, s))
        assert abs(ours - torch_ls) < 1e-6
