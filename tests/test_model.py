"""Properties of the model, masking, patch layout, position tables and initialization."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mae_jax
from mae_jax import masking
from mae_jax import model as model_lib
from mae_jax.pos_embed import sincos_2d

TINY = "mae_vit_tiny_patch4"


@pytest.fixture(scope="module")
def tiny():
    return mae_jax.create_model(TINY, rngs=nnx.Rngs(3))


def _images(n=2, size=32, seed=0):
    return jax.random.normal(jax.random.key(seed), (n, size, size, 3), jnp.float32)


# ------------------------------------------------------------------ masking


def test_mask_rows_and_restore_inverse():
    noise = jax.random.uniform(jax.random.key(1), (4, 196))
    m = masking.masking_from_noise(noise, 0.75)
    assert m.ids_keep.shape == (4, 49)
    np.testing.assert_array_equal(np.asarray(m.mask).sum(1), [147] * 4)
    ids_shuffle = np.argsort(np.asarray(noise), axis=1)
    # ids_restore undoes the shuffle, and the kept ids are the smallest-noise ones, in noise order
    np.testing.assert_array_equal(
        np.take_along_axis(ids_shuffle, np.asarray(m.ids_restore), 1),
        np.tile(np.arange(196), (4, 1)),
    )
    np.testing.assert_array_equal(np.asarray(m.ids_keep), ids_shuffle[:, :49])
    kept = np.take_along_axis(np.asarray(m.mask), np.asarray(m.ids_keep), 1)
    assert kept.max() == 0


def test_len_keep_truncation_rule():
    # int(L * (1 - r)) in float arithmetic: 196 * 0.1 = 19.6000...4 -> 19; 256 * 0.25 = 64
    assert masking.num_kept(196, 0.9) == 19
    assert masking.num_kept(196, 0.75) == 49
    assert masking.num_kept(256, 0.75) == 64
    m = masking.masking_from_noise(jax.random.uniform(jax.random.key(0), (2, 196)), 0.9)
    np.testing.assert_array_equal(np.asarray(m.mask).sum(1), [177, 177])
    with pytest.raises(ValueError, match="mask_ratio"):
        masking.num_kept(196, 1.0)


def test_key_masks_reproducible_and_distinct():
    a = masking.random_masking(jax.random.key(5), 3, 64, 0.75)
    b = masking.random_masking(jax.random.key(5), 3, 64, 0.75)
    c = masking.random_masking(jax.random.key(6), 3, 64, 0.75)
    np.testing.assert_array_equal(a.mask, b.mask)
    assert not np.array_equal(a.mask, c.mask)
    assert not np.array_equal(a.mask[0], a.mask[1])  # per-sample masks


def test_step_device_keys_differ_across_devices_and_steps():
    n = jax.local_device_count()
    assert n == 8, "conftest should give 8 fake CPU devices"

    def draw(step, key, _per_device):
        k = masking.step_device_key(key, step, axis_name="d")
        return masking.random_masking(k, 1, 64, 0.75).mask[0]

    f = jax.pmap(draw, axis_name="d", in_axes=(None, None, 0))
    m0 = np.asarray(f(0, jax.random.key(0), jnp.zeros(n)))
    m1 = np.asarray(f(1, jax.random.key(0), jnp.zeros(n)))
    assert len({row.tobytes() for row in m0}) == n
    assert not any(np.array_equal(m0[i], m1[i]) for i in range(n))


# ------------------------------------------------------------------ patches and position tables


def test_patchify_order_and_round_trip():
    x = np.random.default_rng(0).normal(size=(2, 32, 48 - 16, 3)).astype(np.float32)
    p = np.asarray(mae_jax.patchify(jnp.asarray(x), 4))
    assert p.shape == (2, 64, 48)
    # patch 1 is row 0, columns 4..7; its vector runs (row, col, channel) with channel fastest
    np.testing.assert_array_equal(
        p[0, 1, :6],
        [x[0, 0, 4, 0], x[0, 0, 4, 1], x[0, 0, 4, 2], x[0, 0, 5, 0], x[0, 0, 5, 1], x[0, 0, 5, 2]],
    )
    # patch 8 starts the second patch row; its element 12 is (row 1 in patch, col 0, channel 0)
    assert p[0, 8, 12] == x[0, 5, 0, 0]
    np.testing.assert_array_equal(np.asarray(mae_jax.unpatchify(jnp.asarray(p), 4)), x)


def test_sincos_table_hand_values():
    t = sincos_2d(8, 2)  # 4 patches + cls, width 8: [sin_col(2) cos_col(2) | sin_row(2) cos_row(2)]
    assert t.shape == (5, 8) and t.dtype == np.float32
    np.testing.assert_array_equal(t[0], 0)
    w = np.array([1.0, 0.01])  # 1 / 10000 ** (k / 2), k = 0, 1
    # patch 2 is row 1, column 0
    np.testing.assert_allclose(
        t[3],
        np.concatenate([np.sin(0 * w), np.cos(0 * w), np.sin(w), np.cos(w)]),
        rtol=0,
        atol=1e-7,
    )
    # patch 1 is row 0, column 1: the column lives in the first half
    np.testing.assert_allclose(
        t[2], np.concatenate([np.sin(w), np.cos(w), [0, 0], [1, 1]]), rtol=0, atol=1e-7
    )


def test_sincos_table_is_float64_then_cast():
    t = sincos_2d(1024, 14)
    pos = np.arange(14.0)
    omega = 1.0 / 10000 ** (np.arange(256) / 256.0)
    col13 = np.concatenate([np.sin(13 * omega), np.cos(13 * omega)])
    np.testing.assert_array_equal(t[1 + 13, :512], col13.astype(np.float32))  # row 0, column 13
    np.testing.assert_array_equal(
        t[1 + 14 * 13, 512:], col13.astype(np.float32)
    )  # row 13, column 0
    assert pos.dtype == np.float64


# ------------------------------------------------------------------ the model


def test_presets_exact_sizes():
    b = mae_jax.get_config("mae_vit_base_patch16")
    assert (
        b.embed_dim,
        b.depth,
        b.num_heads,
        b.decoder_embed_dim,
        b.decoder_depth,
        b.decoder_num_heads,
    ) == (768, 12, 12, 512, 8, 16)
    h = mae_jax.get_config("mae_vit_huge_patch14")
    assert (h.patch_size, h.num_patches, h.embed_dim, h.depth, h.patch_dim) == (
        14,
        256,
        1280,
        32,
        588,
    )
    assert mae_jax.MAEConfig.from_json(h.to_json()) == h
    # parameter counts of the official code (OFFICIAL_FACTS 1.3), from abstract shapes only
    m = nnx.eval_shape(lambda: mae_jax.create_model("mae_vit_base_patch16"))
    params = nnx.state(m, nnx.Param)
    fixed = nnx.state(m, model_lib.FixedEmbedding)
    count = lambda s: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(s))  # noqa: E731
    assert count(params) == 111_655_680
    assert count(fixed) == 252_160
    assert len(jax.tree.leaves(params)) + len(jax.tree.leaves(fixed)) == 254


def test_gelu_is_the_exact_erf_form():
    import math

    x = np.concatenate([np.linspace(-12, 12, 4001), [-40.0, -5.5, 0.0, 1e-3, 7.25, 40.0]])
    want = np.array([v / 2 * (1 + math.erf(v / math.sqrt(2))) for v in x])  # float64
    got = np.asarray(jax.jit(model_lib.gelu)(jnp.asarray(x, jnp.float32)), np.float64)
    # 1 + erf(x) cancels for x < -4 (the result then loses its relative accuracy, as torch's
    # does); the absolute error stays at the float32 rounding of x itself.
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-6)


def test_gelu_matches_torch():
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(0).normal(0, 4, 100_000).astype(np.float32)
    got = np.asarray(jax.jit(model_lib.gelu)(jnp.asarray(x)))
    want = torch.nn.functional.gelu(torch.from_numpy(x)).numpy()  # approximate="none"
    # Both sides lose relative accuracy where 1 + erf(x) cancels (x < -4), each its own way.
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-6)


def test_forward_shapes_and_call_signature(tiny):
    imgs = _images()
    loss, pred, mask = tiny(imgs, key=jax.random.key(0), mask_ratio=0.75)
    assert loss.shape == () and pred.shape == (2, 64, 48) and mask.shape == (2, 64)
    noise = jax.random.uniform(jax.random.key(0), (2, 64))
    loss2, pred2, mask2 = tiny(imgs, noise=noise, mask_ratio=0.75)
    np.testing.assert_array_equal(mask, mask2)  # a key is the same as the noise it draws
    np.testing.assert_array_equal(loss, loss2)
    out = tiny.forward_full(imgs, noise=noise)
    assert out.latent.shape == (2, 17, 64) and out.ids_restore.shape == (2, 64)
    with pytest.raises(ValueError, match="exactly one of key"):
        tiny(imgs)


def test_encode_returns_all_tokens_in_spatial_order(tiny):
    imgs = _images()
    feats = tiny.encode(imgs)
    assert feats.shape == (2, 65, 64)
    identity = jnp.tile(jnp.arange(64, dtype=jnp.float32), (2, 1))
    masks = masking.masking_from_noise(identity, 0.0)
    np.testing.assert_allclose(feats, tiny.forward_encoder(imgs, masks), atol=1e-6)


def test_wrong_image_size_is_a_clear_error(tiny):
    with pytest.raises(
        ValueError, match=r"expected images of shape \[N, 32, 32, 3\].*got \(2, 30, 30, 3\)"
    ):
        tiny.encode(jnp.zeros((2, 30, 30, 3)))


def test_encoder_ignores_masked_pixels_exactly(tiny):
    imgs = _images()
    noise = jax.random.uniform(jax.random.key(9), (2, 64))
    masks = masking.masking_from_noise(noise, 0.75)
    grad = jax.jit(jax.grad(lambda x: tiny.forward_encoder(x, masks).sum()))(imgs)
    per_patch = np.abs(np.asarray(mae_jax.patchify(grad, 4))).max(-1)
    removed = np.asarray(masks.mask) == 1
    assert per_patch[removed].max() == 0.0
    assert per_patch[~removed].min() > 0.0


def test_loss_ignores_visible_patches(tiny):
    imgs = _images()
    out = tiny.forward_full(imgs, key=jax.random.key(2))
    visible = (1 - out.mask)[..., None]
    noisy = out.pred + 5.0 * visible
    assert float(tiny.forward_loss(imgs, noisy, out.mask)) == pytest.approx(float(out.loss), abs=0)
    moved = out.pred + 5.0 * out.mask[..., None]
    assert float(tiny.forward_loss(imgs, moved, out.mask)) > float(out.loss) + 1


def test_norm_pix_target_uses_unbiased_variance():
    m = mae_jax.create_model(TINY, norm_pix_loss=True)
    imgs = _images()
    t = np.asarray(mae_jax.patchify(imgs, 4), np.float64)
    want = (t - t.mean(-1, keepdims=True)) / np.sqrt(t.var(-1, ddof=1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(m.patch_targets(imgs), want, atol=2e-6)
    biased = (t - t.mean(-1, keepdims=True)) / np.sqrt(t.var(-1, keepdims=True) + 1e-6)
    assert np.abs(np.asarray(m.patch_targets(imgs)) - biased).max() > 1e-3


def test_official_initialization():
    m = mae_jax.create_model("mae_vit_base_patch16", rngs=nnx.Rngs(0), with_decoder=False)
    qkv = np.asarray(m.blocks[0].attn.qkv.kernel[...])
    bound = np.sqrt(6 / (768 + 3 * 768))  # xavier on the fused [3D, D] matrix
    assert qkv.shape == (768, 2304) and bound * 0.99 < np.abs(qkv).max() <= bound
    np.testing.assert_allclose(qkv.std(), bound / np.sqrt(3), rtol=0.01)
    conv = np.asarray(m.patch_embed.proj.kernel[...])
    cbound = np.sqrt(6 / (768 + 768))  # the conv kernel seen as a [768, 3*16*16] matrix
    assert cbound * 0.99 < np.abs(conv).max() <= cbound
    cb = np.asarray(m.patch_embed.proj.bias[...])
    assert np.abs(cb).max() <= 1 / np.sqrt(768) and np.abs(cb).max() > 0.9 / np.sqrt(768)
    assert np.all(np.asarray(m.blocks[3].mlp.fc1.bias[...]) == 0)
    np.testing.assert_allclose(np.asarray(m.cls_token[...]).std(), 0.02, rtol=0.15)
    np.testing.assert_array_equal(m.pos_embed[...][0], sincos_2d(768, 14))


def test_position_tables_are_not_parameters(tiny):
    # compiled: op by op, this one gradient took 14 s
    grads = nnx.jit(nnx.grad(lambda mdl: mdl(_images(), key=jax.random.key(0))[0]))(tiny)
    paths = {p[0] for p, _ in nnx.to_flat_state(grads)}
    assert "pos_embed" not in paths and "decoder_pos_embed" not in paths and "cls_token" in paths
    full = {p[0] for p, _ in nnx.to_flat_state(nnx.state(tiny))}
    assert {"pos_embed", "decoder_pos_embed"} <= full  # but they are saved


def test_encoder_only_model_refuses_reconstruction():
    m = mae_jax.create_model(TINY, with_decoder=False)
    assert m.encode(_images()).shape == (2, 65, 64)
    with pytest.raises(mae_jax.MissingDecoderError, match="mae_visualize_vit"):
        m(_images(), key=jax.random.key(0))


def test_bfloat16_compute_keeps_float32_params(tiny):
    m = mae_jax.create_model(TINY, rngs=nnx.Rngs(3), dtype=jnp.bfloat16)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(m)))
    imgs = _images()
    noise = jax.random.uniform(jax.random.key(0), (2, 64))
    lo = nnx.jit(lambda m, x, z: m(x, noise=z)[0])(m, imgs, noise)
    hi, _, _ = tiny(imgs, noise=noise)
    assert lo.dtype == jnp.float32
    assert abs(float(lo) - float(hi)) < 0.02 * float(hi)


def test_jit_matches_eager(tiny):
    imgs = _images()
    noise = jax.random.uniform(jax.random.key(0), (2, 64))
    eager = tiny(imgs, noise=noise)[0]
    jitted = nnx.jit(lambda m, x, z: m(x, noise=z)[0])(tiny, imgs, noise)
    np.testing.assert_allclose(jitted, eager, rtol=1e-6)


def test_materialized_gradient_is_the_identity_both_ways():
    x = jax.random.normal(jax.random.key(0), (3, 5, 8))
    cot = jax.random.normal(jax.random.key(1), (3, 5, 8)).at[0, 0, 1].set(-0.0)
    out, vjp = jax.vjp(model_lib.materialized_gradient, x)
    np.testing.assert_array_equal(out, x)
    (back,) = jax.jit(vjp)(cot)
    assert np.array_equal(np.asarray(back), np.asarray(cot)) and np.signbit(back[0, 0, 1])
    (back_nan,) = jax.jit(vjp)(cot.at[0, 0, 0].set(jnp.nan))  # the other branch
    np.testing.assert_array_equal(back_nan[0, 1:], cot[0, 1:])


def test_block_gradients_do_not_depend_on_the_materialization(tiny, monkeypatch):
    from mae_jax import pretrain_step

    imgs = _images()
    noise = jax.random.uniform(jax.random.key(0), (2, 64))
    graphdef, params, fixed = nnx.split(tiny, nnx.Param, ...)

    def grads():
        f = jax.jit(lambda p: pretrain_step.loss_and_grads(graphdef, p, fixed, imgs, noise, 0.75))
        return jax.tree.leaves(f(params))

    with_barrier = grads()
    monkeypatch.setattr(model_lib, "materialized_gradient", lambda x: x)
    without = grads()
    for a, b in zip(with_barrier, without, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def _loss_grads(model, imgs, noise):
    from mae_jax import pretrain_step

    graphdef, params, fixed = pretrain_step.split_model(model)
    f = jax.jit(lambda p: pretrain_step.loss_and_grads(graphdef, p, fixed, imgs, noise, 0.75))
    return f(params)


@pytest.mark.parametrize("remat", ["block", "dots"])
def test_remat_gives_the_same_loss_and_gradients(remat):
    config = mae_jax.get_config("mae_vit_tiny_patch4")
    imgs = _images()
    noise = jax.random.uniform(jax.random.key(0), (2, 64))
    plain = model_lib.MaskedAutoencoderViT(config, rngs=nnx.Rngs(0))
    rematted = model_lib.MaskedAutoencoderViT(config, rngs=nnx.Rngs(0), remat=remat)
    (loss_a, grads_a), (loss_b, grads_b) = (_loss_grads(m, imgs, noise) for m in (plain, rematted))
    assert float(loss_a) == pytest.approx(float(loss_b), rel=1e-7)
    for a, b in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)


def test_unknown_remat_is_refused():
    with pytest.raises(ValueError, match="remat must be one of none, block, dots, got 'all'"):
        model_lib.MaskedAutoencoderViT(
            mae_jax.get_config("mae_vit_tiny_patch4"), rngs=nnx.Rngs(0), remat="all"
        )


def test_attention_gradient_without_the_max_equals_softmax_autodiff():
    """The max is cut from the backward: the gradient still equals autodiff through
    ``jax.nn.softmax``, within float32 rounding (the logits and softmax are float32)."""
    qkv = jax.random.normal(jax.random.key(0), (2, 9, 3, 2, 4)) * 3
    cot = jax.random.normal(jax.random.key(1), (2, 9, 8))

    def reference(qkv):
        q, k, v = qkv.transpose(2, 0, 3, 1, 4)
        w = jax.nn.softmax(jnp.einsum("nhqc,nhkc->nhqk", q, k) * 0.5, axis=-1)
        return jnp.einsum("nhqk,nhkc->nhqc", w, v).transpose(0, 2, 1, 3).reshape(2, 9, 8)

    ours = functools.partial(model_lib._xla_attention, scale=0.5)
    out_a, vjp_a = jax.vjp(ours, qkv)
    out_b, vjp_b = jax.vjp(reference, qkv)
    np.testing.assert_allclose(out_a, out_b, rtol=2e-5, atol=1e-6)
    grad_a, grad_b = vjp_a(cot)[0], vjp_b(cot)[0]
    np.testing.assert_allclose(grad_a, grad_b, rtol=2e-5, atol=2e-6 * np.abs(grad_b).max())
