"""The demo panels against per-patch NumPy references, and the drawn figure's layout and PNG file."""

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from mae_jax import visualize

P = 4  # patch size
SIZE = 32  # image side
G = SIZE // P  # patches per side
MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])


def _inputs(n=2, seed=0):
    """Normalized images, a pred in the same space, and masks with exactly 75% of patches removed."""
    rng = np.random.default_rng(seed)
    imgs = rng.normal(size=(n, SIZE, SIZE, 3)) * 0.8
    pred = rng.normal(size=(n, G * G, P * P * 3)) * 0.8
    mask = np.zeros((n, G * G), np.float32)
    for i in range(n):
        mask[i, rng.permutation(G * G)[: G * G * 3 // 4]] = 1.0
    return imgs, pred, mask


def _patch(img_HxWxC, index):
    """The pixels [p, p, 3] of patch ``index`` (row-major over the patch grid)."""
    r, c = divmod(index, G)
    return img_HxWxC[r * P : (r + 1) * P, c * P : (c + 1) * P]


def _display(x):
    return np.clip(x * STD + MEAN, 0.0, 1.0)


def test_original_denormalizes_by_hand():
    imgs, pred, mask = _inputs()
    imgs[1, 0, 0] = [10.0, -10.0, 0.0]  # far outside the display range: clipped
    panels = visualize.compute_panels(imgs, pred, mask, patch_size=P, norm_pix_loss=False)
    assert panels.original.shape == (2, SIZE, SIZE, 3)
    assert panels.original[0, 3, 5, 1] == pytest.approx(imgs[0, 3, 5, 1] * 0.224 + 0.456, abs=1e-12)
    assert panels.original[1, 0, 0].tolist() == [1.0, 0.0, 0.406]


def test_pasted_masked_and_reconstruction_per_patch():
    imgs, pred, mask = _inputs()
    panels = visualize.compute_panels(imgs, pred, mask, patch_size=P, norm_pix_loss=False)
    for name in panels._fields:
        arr = getattr(panels, name)
        assert arr.shape == (2, SIZE, SIZE, 3) and arr.min() >= 0.0 and arr.max() <= 1.0, name
    gray_patches = 0
    for i in range(2):
        for index in range(G * G):
            orig = _patch(panels.original[i], index)
            recon_ref = _display(pred[i, index].reshape(P, P, 3))  # (row, col, channel) order
            np.testing.assert_allclose(
                _patch(panels.reconstruction[i], index), recon_ref, rtol=0, atol=1e-12
            )
            masked = _patch(panels.masked[i], index)
            pasted = _patch(panels.pasted[i], index)
            removed = mask[i, index] == 1
            # the masked panel is gray on exactly the removed patches (no visible patch is all gray)
            assert np.all(masked == visualize.MASK_GRAY) == removed, (i, index)
            if removed:
                gray_patches += 1
                np.testing.assert_array_equal(pasted, _patch(panels.reconstruction[i], index))
            else:
                np.testing.assert_array_equal(masked, orig)
                np.testing.assert_array_equal(pasted, orig)
    assert gray_patches == 2 * 48


def test_norm_pix_unnormalizes_with_true_patch_statistics():
    imgs, pred, mask = _inputs(seed=1)
    panels = visualize.compute_panels(imgs, pred, mask, patch_size=P, norm_pix_loss=True)
    plain = visualize.compute_panels(imgs, pred, mask, patch_size=P, norm_pix_loss=False)
    for i in range(2):
        for index in range(G * G):
            true = _patch(imgs[i], index).reshape(-1)
            mean = true.sum() / true.size
            var = ((true - mean) ** 2).sum() / (true.size - 1)  # unbiased
            expected = pred[i, index] * np.sqrt(var + 1e-6) + mean
            np.testing.assert_allclose(
                _patch(panels.reconstruction[i], index),
                _display(expected.reshape(P, P, 3)),
                rtol=0,
                atol=1e-12,
            )
    assert np.abs(panels.reconstruction - plain.reconstruction).max() > 0.05
    np.testing.assert_array_equal(panels.original, plain.original)


def test_accepts_jax_arrays_and_boolean_masks():
    imgs, pred, mask = _inputs(seed=3)
    expected = visualize.compute_panels(imgs, pred, mask, patch_size=P, norm_pix_loss=True)
    panels = visualize.compute_panels(
        jnp.asarray(imgs),
        jnp.asarray(pred),
        jnp.asarray(mask == 1),
        patch_size=P,
        norm_pix_loss=True,
    )
    for got, want in zip(panels, expected, strict=True):
        assert isinstance(got, np.ndarray)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)  # jax arrays are float32
    gray = np.all(panels.masked.reshape(2, G, P, G, P, 3) == visualize.MASK_GRAY, axis=(2, 4, 5))
    np.testing.assert_array_equal(gray.reshape(2, -1), mask == 1)


def test_bad_shapes_are_refused():
    imgs, pred, mask = _inputs()
    with pytest.raises(visualize.PanelInputError, match=r"pred must be \[N, L, p\*p\*3\]"):
        visualize.compute_panels(imgs, pred[:, :10], mask, patch_size=P, norm_pix_loss=False)
    with pytest.raises(visualize.PanelInputError, match="mask must be"):
        visualize.compute_panels(imgs, pred, mask[:1], patch_size=P, norm_pix_loss=False)
    with pytest.raises(visualize.PanelInputError, match="multiple of the patch size 5"):
        visualize.compute_panels(imgs, pred, mask, patch_size=5, norm_pix_loss=False)


def _find(figure_HxWx3, tile_HxWx3):
    """Every (y, x) where ``tile`` appears exactly in ``figure``."""
    th, tw, _ = tile_HxWx3.shape
    hits = []
    for y, x in np.argwhere(np.all(figure_HxWx3 == tile_HxWx3[0, 0], axis=-1)):
        block = figure_HxWx3[y : y + th, x : x + tw]
        if block.shape == tile_HxWx3.shape and np.array_equal(block, tile_HxWx3):
            hits.append((int(y), int(x)))
    return hits


def test_figure_grid_layout_and_note():
    n, scale = 3, 4
    imgs, pred, mask = _inputs(n=n, seed=2)
    panels = visualize.compute_panels(imgs, pred, mask, patch_size=P, norm_pix_loss=False)
    figure = visualize.draw_figure(panels, scale=scale)
    assert figure.mode == "RGB"
    pixels = np.asarray(figure)
    side = SIZE * scale
    origins = np.zeros((n, 4, 2), int)
    for row in range(n):
        for col, panel in enumerate(panels):
            tile = np.round(panel[row] * 255).astype(np.uint8)
            tile = np.repeat(np.repeat(tile, scale, axis=0), scale, axis=1)  # nearest upscaling
            hits = _find(pixels, tile)
            assert len(hits) == 1, (row, col, hits)
            origins[row, col] = hits[0]
    ys, xs = origins[..., 0], origins[..., 1]
    # a grid: one y per row, one x per column, in order, panels not overlapping
    assert (ys == ys[:, :1]).all() and (xs == xs[:1, :]).all()
    assert (np.diff(ys[:, 0]) >= side).all() and (np.diff(xs[0]) >= side).all()
    assert figure.width >= 4 * side and figure.height >= n * side
    # the titles are drawn above the first row
    assert ys[0, 0] > 0 and (pixels[: ys[0, 0]] < 128).any()

    # one more image adds exactly one row pitch; a note adds a line at the bottom
    row_pitch = ys[1, 0] - ys[0, 0]
    imgs4, pred4, mask4 = _inputs(n=n + 1, seed=2)
    bigger = visualize.compute_panels(imgs4, pred4, mask4, patch_size=P, norm_pix_loss=False)
    assert visualize.draw_figure(bigger, scale=scale).size == (
        figure.width,
        figure.height + row_pitch,
    )
    noted = visualize.draw_figure(panels, scale=scale, note="norm-pix model: patches un-normalized")
    assert noted.width >= figure.width and noted.height > figure.height
    assert (np.asarray(noted)[figure.height - 4 :] < 128).any()  # the note has ink
    assert not (pixels[ys[-1, 0] + side :] < 128).any()  # no note, nothing drawn under the grid


def test_small_images_are_enlarged_by_default():
    imgs, pred, mask = _inputs(n=1)
    panels = visualize.compute_panels(imgs, pred, mask, patch_size=P, norm_pix_loss=False)
    figure = visualize.draw_figure(panels)
    factor = -(-visualize.MIN_PANEL_PX // SIZE)
    assert factor > 1 and figure.width >= 4 * SIZE * factor and figure.height >= SIZE * factor
    with pytest.raises(visualize.PanelInputError, match="titles"):
        visualize.draw_figure(panels, titles=("a", "b"))


def test_save_png_round_trip(tmp_path):
    imgs, pred, mask = _inputs()
    figure = visualize.draw_figure(
        visualize.compute_panels(imgs, pred, mask, patch_size=P, norm_pix_loss=True), scale=2
    )
    path = tmp_path / "new" / "dir" / "figure.png"
    visualize.save_png(figure, path)
    with Image.open(path) as reread:
        assert reread.format == "PNG" and reread.mode == "RGB" and reread.size == figure.size
        np.testing.assert_array_equal(np.asarray(reread), np.asarray(figure))
    assert sorted(p.name for p in path.parent.iterdir()) == ["figure.png"]  # no temporary left
