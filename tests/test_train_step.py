"""The pretraining step as the accelerators run it: gradient accumulation with one update, ZeRO-1
optimizer sharding, the host-side lr, and what the step lowers to on GPU and TPU (no device
needed). Eight fake CPU devices (see conftest.py)."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mae_jax
from mae_jax import model as model_lib
from mae_jax import optim, pretrain_step, replication

TINY = "mae_vit_tiny_patch4"
N_DEV = 8
PER_DEVICE = 2


def _split(dtype=jnp.float32, **kw):
    config = mae_jax.get_config(TINY)
    return pretrain_step.split_model(
        model_lib.MaskedAutoencoderViT(config, rngs=nnx.Rngs(0), dtype=dtype, **kw)
    )


def _images(micro_steps: int) -> np.ndarray:
    """[micro_steps, N_DEV * PER_DEVICE, 32, 32, 3] uint8 pixels."""
    rng = np.random.default_rng(3)
    return rng.integers(0, 256, (micro_steps, N_DEV * PER_DEVICE, 32, 32, 3), dtype=np.uint8)


SCHEDULE = optim.warmup_cosine_schedule(2e-3, min_lr=1e-4, warmup_steps=1, total_steps=6)


def _reference_run(micro_imgs, accum):
    """Today's semantics spelled out: every micro-step all-reduces its gradients and calls optax
    MultiSteps around AdamW with the schedule inside; the update lands every ``accum`` calls."""
    graphdef, params, fixed = _split()
    tx = optim.make_pretrain_optimizer(SCHEDULE, accum_steps=accum)
    grads_fn = jax.pmap(
        functools.partial(
            pretrain_step.device_grads, graphdef=graphdef, mask_ratio=0.75, num_patches=64
        ),
        axis_name=replication.AXIS,
        in_axes=(0, 0, 0, None, None),
    )
    update = jax.pmap(tx.update, in_axes=(0, 0, 0))
    p, f = replication.replicate(params, N_DEV), replication.replicate(fixed, N_DEV)
    o = replication.replicate(tx.init(params), N_DEV)
    losses = []
    for s, imgs in enumerate(micro_imgs):
        normalized = np.asarray(pretrain_step.to_model_input(jnp.asarray(imgs)))
        loss, grads = grads_fn(
            p, f, replication.shard_batch(normalized, N_DEV), jax.random.key(5), s
        )
        updates, o = update(grads, o, p)
        p = jax.tree.map(lambda a, u: a + u, p, updates)
        losses.append(float(loss[0]))
    per_update = np.asarray(losses).reshape(-1, accum).mean(axis=1)
    return replication.unreplicate(p), per_update


def _new_run(micro_imgs, accum, shard_optimizer=False, packed=True):
    """The step as the training loop runs it on GPUs: parameters and optimizer state packed by
    weight-decay group (``packed=False``: one buffer per parameter, as on TPU and CPU).
    Returns the parameters and the full optimizer state unpacked, as checkpoints hold them."""
    graphdef, params, fixed = _split()
    params = nnx.to_pure_dict(params)
    packing, tx = pretrain_step.pretrain_optimizer(params, packed=packed)
    state = packing.pack(params)
    full = tx.init(state)
    shards = pretrain_step.OptimizerShards(state, N_DEV) if shard_optimizer else None
    if shards is None:
        o = replication.replicate(full, N_DEV)
    else:
        o = shards.shard(full, tx.init(shards.template()))
    step_fn = pretrain_step.make_p_train_step(graphdef, tx, 0.75, 64, shards, packing=packing)
    p, f = replication.replicate(state, N_DEV), replication.replicate(fixed, N_DEV)
    lr_table = np.asarray(jax.jit(SCHEDULE)(np.arange(len(micro_imgs) // accum)))
    losses, norms = [], []
    for u in range(len(micro_imgs) // accum):
        group = micro_imgs[u * accum : (u + 1) * accum]
        imgs = np.stack([replication.shard_batch(x, N_DEV) for x in group], axis=1)
        p, o, metrics = step_fn(p, o, f, imgs, jax.random.key(5), u * accum, lr_table[u])
        losses.append(float(metrics["loss"][0]))
        norms.append(float(metrics["grad_norm"][0]))
    opt_host = replication.unreplicate(o) if shards is None else shards.unshard(o, full)
    p = packing.unpack(replication.unreplicate(p))
    return p, np.asarray(losses), np.asarray(norms), packing.unpack_state(opt_host)


def _assert_params_close(a, b, rtol, atol):
    for (path, x), y in zip(
        jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b), strict=True
    ):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path))


def _key_bias_mask(tree):
    """True everywhere but the key third of each qkv bias: softmax ignores a bias shared by all
    keys, so its true gradient is zero and AdamW turns rounding noise there into steps of about
    lr (see shared ENVIRONMENT.md); those values are compared separately, loosely."""

    def keep(path, leaf):
        names = optim.path_names(path)
        out = np.ones(np.shape(leaf), bool)
        if names[-2:] == ("qkv", "bias"):
            d = out.shape[0] // 3
            out[d : 2 * d] = False
        return out

    return jax.tree_util.tree_map_with_path(keep, tree)


@pytest.fixture(scope="module")
def runs():
    imgs = _images(4)
    return {
        "reference": _reference_run(imgs, accum=2),
        "accumulated": _new_run(imgs, accum=2),
        "sharded": _new_run(imgs, accum=2, shard_optimizer=True),
        "unpacked": _new_run(imgs, accum=2, packed=False),
    }


def test_packed_state_gives_the_per_parameter_update(runs):
    """The loop's packed buffers change where the values live, not the arithmetic: the same
    update, leaf for leaf, as the step on one buffer per parameter. Only the gradient norm's
    sum runs in another order (1e-6 relative)."""
    params, losses, norms, opt_full = runs["accumulated"]
    u_params, u_losses, u_norms, u_opt_full = runs["unpacked"]
    np.testing.assert_array_equal(losses, u_losses)
    np.testing.assert_allclose(norms, u_norms, rtol=1e-6)
    _assert_params_close(params, u_params, rtol=0, atol=0)
    _assert_params_close(opt_full, u_opt_full, rtol=0, atol=0)


def test_accumulation_is_one_update_equal_to_multisteps(runs):
    ref_params, ref_losses = runs["reference"]
    params, losses, _, _ = runs["accumulated"]
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-6)
    masks = _key_bias_mask(params)
    for (path, a), b, m in zip(
        jax.tree_util.tree_flatten_with_path(params)[0],
        jax.tree.leaves(ref_params),
        jax.tree.leaves(masks),
        strict=True,
    ):
        # float32 rounding: the sum of two micro-batch gradients over 2 vs optax's running mean
        np.testing.assert_allclose(
            a[m], b[m], rtol=1e-5, atol=1e-7, err_msg=jax.tree_util.keystr(path)
        )
        np.testing.assert_allclose(a[~m], b[~m], atol=2 * 2 * 2e-3)  # two steps of at most ~lr


def test_accumulation_all_reduces_once_per_update():
    """The lowered step holds as many all-reduces for 4 micro-batches as for 1: they are summed
    on the device and reduced once."""
    graphdef, params, fixed = _split()
    tx = optim.pretrain_direction()
    mesh = jax.sharding.Mesh(np.array(jax.devices()), (replication.AXIS,))
    step = pretrain_step.make_sharded_train_step(
        pretrain_step.make_train_step(graphdef, tx, mask_ratio=0.75, num_patches=64), mesh
    )
    counts = []
    for accum in (1, 4):
        args = _abstract_args(params, tx.init(params), fixed, accum)
        text = step.trace(*args).lower().as_text()
        counts.append(len(re.findall(r"stablehlo\.all_reduce|\ball-reduce\(", text)))
    assert counts[0] == counts[1] > 0


def test_sharded_optimizer_matches_the_replicated_update(runs):
    params, losses, norms, opt_full = runs["accumulated"]
    z_params, z_losses, z_norms, z_opt_full = runs["sharded"]
    np.testing.assert_allclose(z_losses, losses, rtol=1e-6)
    np.testing.assert_allclose(z_norms, norms, rtol=1e-6)
    _assert_params_close(z_params, params, rtol=1e-6, atol=1e-8)
    # The gathered AdamW moments equal the replicated ones: checkpoints hold one layout.
    _assert_params_close(z_opt_full, opt_full, rtol=1e-6, atol=1e-12)


def test_optimizer_shards_round_trip_and_split_the_state():
    _, params, _ = _split()
    tx = optim.pretrain_direction()
    shards = pretrain_step.OptimizerShards(params, N_DEV)
    full = jax.tree.map(
        lambda x: np.random.default_rng(0).normal(size=np.shape(x)).astype(x.dtype), tx.init(params)
    )
    device = shards.shard(full, tx.init(shards.template()))
    back = shards.unshard(device, full)
    for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(back), strict=True):
        np.testing.assert_array_equal(a, b)
    # each device holds 1/8 of every moment (rounded up), not all of it
    qkv = params["blocks"][0]["attn"]["qkv"]["kernel"][...]
    mu = device[0].mu["blocks"][0]["attn"]["qkv"]["kernel"]
    assert mu.shape == (N_DEV, -(-qkv.size // N_DEV))


def _abstract_args(params, opt_state, fixed, accum, dtype=jnp.uint8):
    rep = functools.partial(
        jax.tree.map, lambda x: jax.ShapeDtypeStruct((N_DEV, *np.shape(x)), x.dtype)
    )
    imgs = jax.ShapeDtypeStruct((N_DEV, accum, PER_DEVICE, 32, 32, 3), dtype)
    return rep(params), rep(opt_state), rep(fixed), imgs, jax.random.key(0), 0, np.float32(1e-3)


# ------------------------------------------------------------------ lowering for GPU and TPU


def _canonical_stablehlo(lowered) -> str:
    """The lowered module after MLIR's canonicalizer, which folds what is constant: here, the
    ``platform_dependent`` selectors, whose platform is known once the target is chosen."""
    from jax._src.lib.mlir import ir, passmanager

    module = lowered.compiler_ir("stablehlo")
    with module.context:
        copy = ir.Module.parse(str(module))
        passmanager.PassManager.parse("builtin.module(canonicalize)").run(copy.operation)
    return str(copy)


@pytest.fixture
def cudnn_present(monkeypatch):
    """Lowering for cuda needs no GPU, but jax asks cuDNN's version while it traces its fused
    attention; answer as a CUDA install with cuDNN 9.10 would."""
    from jax._src.cudnn import fused_attention_stablehlo

    monkeypatch.setattr(fused_attention_stablehlo, "check_cudnn_version", lambda: 91000)
    assert model_lib.cudnn_attention_available()


def _lower_step(platform, dtype, remat="none"):
    """The step as the loop runs it on ``platform`` (packed state off CPU), lowered for it."""
    graphdef, params, fixed = _split(dtype=dtype, remat=remat)
    packing, tx = pretrain_step.pretrain_optimizer(
        nnx.to_pure_dict(params), packed=pretrain_step.packs_state(platform)
    )
    mesh = jax.sharding.Mesh(np.array(jax.devices()), (replication.AXIS,))
    step = pretrain_step.make_sharded_train_step(
        pretrain_step.make_train_step(
            graphdef, tx, mask_ratio=0.75, num_patches=64, packing=packing
        ),
        mesh,
    )
    packed = jax.eval_shape(packing.pack, nnx.to_pure_dict(params))
    args = _abstract_args(packed, jax.eval_shape(tx.init, packed), fixed, accum=1)
    return _canonical_stablehlo(step.trace(*args).lower(lowering_platforms=(platform,)))


CUDNN_CALL = re.compile(r"custom_call @__cudnn\$fmha")
CASE = re.compile(r"stablehlo\.case")


@pytest.mark.parametrize("remat", ["none", "block"])
def test_gpu_step_has_no_conditional_and_uses_cudnn_attention(cudnn_present, remat):
    text = _lower_step("cuda", jnp.bfloat16, remat)
    assert not CASE.search(text)
    # forward and backward kernels of the 4 attention layers (2 encoder + 2 decoder blocks)
    assert len(CUDNN_CALL.findall(text)) >= 8


def test_tpu_step_has_no_conditional(cudnn_present):
    text = _lower_step("tpu", jnp.bfloat16)
    assert not CASE.search(text)
    assert not CUDNN_CALL.search(text)


def test_cpu_step_keeps_its_gradient_boundaries():
    """The check above can fail: on CPU each block's backward keeps its conditional."""
    text = _lower_step("cpu", jnp.float32)
    assert len(CASE.findall(text)) == 4  # one per block: 2 encoder + 2 decoder
