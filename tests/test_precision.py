"""What a compute dtype means on an accelerator (mae_jax/model.py, "precision").

float32: every matmul and convolution of the forward asks for Precision.HIGHEST itself, so that a
model loaded or built in float32 computes in float32 on TPU and GPU without any context (XLA's
DEFAULT there is one bfloat16 pass on TPU, TF32 on recent GPUs). bfloat16: torch autocast's
rules, matmuls at DEFAULT in bfloat16, the residual stream in float32. Checked by lowering for
``tpu`` and ``cuda`` without a device, under a DEFAULT context (conftest.py sets HIGHEST for the
whole test session, which would hide a model that does not ask for it).
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mae_jax
from mae_jax import classifier as classifier_lib
from mae_jax import model as model_lib
from mae_jax import optim, pretrain_step, replication
from tests.test_train_step import _canonical_stablehlo, _lower_step, cudnn_present  # noqa: F401

PLATFORMS = ("tpu", "cuda")
_OP = re.compile(r"stablehlo\.(dot_general|convolution)\b.*")
_DOT_PRECISION = re.compile(r"precision = \[(\w+), (\w+)\]")
_CONV_PRECISION = re.compile(
    r"precision_config = \[#stablehlo<precision (\w+)>, #stablehlo<precision (\w+)>\]"
)


def matmul_precisions(stablehlo: str) -> list[tuple[str, str]]:
    """The (lhs, rhs) precision of every dot_general and convolution; none written = DEFAULT."""
    found = []
    for line in (m.group(0) for m in _OP.finditer(stablehlo)):
        match = _DOT_PRECISION.search(line) or _CONV_PRECISION.search(line)
        found.append(match.groups() if match else ("DEFAULT", "DEFAULT"))
    return found


def _lower(fn, platform, *args) -> str:
    with jax.default_matmul_precision("default"):
        return _canonical_stablehlo(jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)))


def _images(config, n=2):
    shape = (n, config.img_size, config.img_size, config.in_chans)
    return jax.ShapeDtypeStruct(shape, jnp.float32)


def test_the_counter_sees_what_the_context_decides():
    """The parser reads both spellings, and a bare float32 matmul lowers at DEFAULT under the
    test's context: the model's HIGHEST below is its own."""

    def conv(precision):
        return lambda x, k: jax.lax.conv_general_dilated(x, k, (1, 1), "VALID", precision=precision)

    x = jax.ShapeDtypeStruct((2, 3, 8, 8), jnp.float32)
    k = jax.ShapeDtypeStruct((4, 3, 2, 2), jnp.float32)
    m = jax.ShapeDtypeStruct((8, 8), jnp.float32)
    highest = jax.lax.Precision.HIGHEST
    assert matmul_precisions(_lower(conv(None), "tpu", x, k)) == [("DEFAULT", "DEFAULT")]
    assert matmul_precisions(_lower(conv(highest), "tpu", x, k)) == [("HIGHEST", "HIGHEST")]
    assert matmul_precisions(_lower(jnp.matmul, "tpu", m, m)) == [("DEFAULT", "DEFAULT")]


@pytest.mark.parametrize("platform", PLATFORMS)
def test_float32_mae_forward_is_highest_everywhere(platform):
    config = mae_jax.get_config("mae_vit_tiny_patch4")
    model = model_lib.MaskedAutoencoderViT(config, rngs=nnx.Rngs(0))

    def forward(model, imgs, key):
        out = model.forward_full(imgs, key=key)
        return out.loss, out.pred, out.latent

    text = _lower(forward, platform, model, _images(config), jax.random.key(0))
    precisions = matmul_precisions(text)
    # patch embedding, 4 per block (qkv, proj, fc1, fc2) + 2 attention einsums, decoder_embed,
    # decoder_pred: 1 + 6 * 4 + 2
    assert len(precisions) == 27
    assert precisions.count(("HIGHEST", "HIGHEST")) == len(precisions)


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("global_pool", [True, False])
def test_float32_classifier_forward_is_highest_everywhere(platform, global_pool):
    config = mae_jax.get_vit_config("vit_tiny_patch4", global_pool=global_pool)
    model = classifier_lib.VisionTransformer(config, rngs=nnx.Rngs(0))
    text = _lower(lambda m, x: m(x), platform, model, _images(config))
    precisions = matmul_precisions(text)
    assert len(precisions) == 1 + 6 * config.depth + 1  # patch embedding, blocks, head
    assert precisions.count(("HIGHEST", "HIGHEST")) == len(precisions)


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize(
    "dtype, precision", [(jnp.float32, "HIGHEST"), (jnp.bfloat16, "DEFAULT")], ids=["f32", "bf16"]
)
def test_train_step_precision(cudnn_present, platform, dtype, precision):  # noqa: F811
    """The whole step, backward and optimizer included: float32 all HIGHEST (the gradients'
    matmuls inherit the forward's precision), bfloat16 all DEFAULT."""
    with jax.default_matmul_precision("default"):
        text = _lower_step(platform, dtype)
    precisions = matmul_precisions(text)
    assert len(precisions) > 0
    assert precisions.count((precision, precision)) == len(precisions)


def test_bfloat16_keeps_the_residual_stream_and_layer_norm_in_float32():
    """torch autocast: matmul outputs in bfloat16, everything added to the residual stream, the
    stream itself, LayerNorm and the loss in float32; parameters float32."""
    config = mae_jax.get_config("mae_vit_tiny_patch4")
    model = model_lib.MaskedAutoencoderViT(config, rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
    imgs = jnp.asarray(np.random.default_rng(0).normal(size=(2, 32, 32, 3)), jnp.float32)
    out = model.forward_full(imgs, key=jax.random.key(0), capture_stages=True)
    assert out.stages["patch_embed"].dtype == jnp.bfloat16  # a matmul output
    for name in ("enc_in", "enc_blocks", "dec_embed", "dec_in", "dec_blocks", "dec_norm"):
        assert out.stages[name].dtype == jnp.float32, name
    assert out.latent.dtype == jnp.float32 and out.loss.dtype == jnp.float32
    assert out.pred.dtype == jnp.bfloat16  # decoder_pred's output, cast for the loss
    block = model.blocks[0]
    x = jnp.zeros((2, 17, config.embed_dim), jnp.bfloat16)
    assert block(x).dtype == jnp.float32
    assert block.attn.qkv(x).dtype == jnp.bfloat16
    assert {x.dtype for x in jax.tree.leaves(nnx.state(model))} == {jnp.dtype(jnp.float32)}

    vit = classifier_lib.VisionTransformer(
        mae_jax.get_vit_config("vit_tiny_patch4"), rngs=nnx.Rngs(0), dtype=jnp.bfloat16
    )
    stages = vit.forward_stages(imgs)
    assert stages["enc_in"].dtype == stages["enc_blocks"].dtype == jnp.float32
    assert stages["features"].dtype == stages["logits"].dtype == jnp.float32


def _smooth_images(n: int, seed: int) -> np.ndarray:
    """uint8 images [n, 32, 32, 3] with structure a tiny MAE can learn: 4x4 random colours,
    bilinearly upsampled."""
    low = np.random.default_rng(seed).uniform(0, 255, (n, 4, 4, 3)).astype(np.float32)
    up = jax.image.resize(low, (n, 32, 32, 3), "linear")
    return np.asarray(up).round().clip(0, 255).astype(np.uint8)


def _losses(dtype, steps: int, batch: int = 16, lr: float = 2e-3):
    config = mae_jax.get_config("mae_vit_tiny_patch4")
    model = model_lib.MaskedAutoencoderViT(config, rngs=nnx.Rngs(0), dtype=dtype)
    graphdef, params, fixed = pretrain_step.split_model(model)
    tx = optim.pretrain_direction()
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), (replication.AXIS,))
    step = pretrain_step.make_sharded_train_step(
        pretrain_step.make_train_step(
            graphdef, tx, mask_ratio=0.75, num_patches=config.num_patches
        ),
        mesh,
    )
    one_device = jax.tree.map(lambda x: jnp.asarray(x)[None], (params, tx.init(params), fixed))
    p, o, f = one_device
    losses = []
    for s in range(steps):
        imgs = _smooth_images(batch, s)[None, None]  # [device, accum, batch, H, W, C]
        p, o, metrics = step(p, o, f, imgs, jax.random.key(1), s, np.float32(lr))
        losses.append(float(metrics["loss"][0]))
    return np.asarray(losses), p


def test_bfloat16_training_tracks_float32():
    """20 AdamW steps (lr 2e-3; the loss falls from ~1.9 to ~0.9) from the same weights, images
    and masks: every bfloat16 loss within 5e-3 of the float32 loss, relative. That is 1.3 times
    bfloat16's unit roundoff (2^-8 = 3.9e-3): the bfloat16 run's loss is the float32 run's up to
    about one rounding of a bfloat16 number, every step. Measured here: at most 8e-4 (the per-
    element rounding errors mostly average out in the mean over patches and images)."""
    f32, _ = _losses(jnp.float32, 20)
    bf16, params = _losses(jnp.bfloat16, 20)
    assert f32[-1] < 0.6 * f32[0]  # it learns, so the comparison covers a moving model
    np.testing.assert_allclose(bf16, f32, rtol=5e-3)
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
