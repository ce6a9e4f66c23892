"""Parameters and optimizer state packed into flat buffers (``mae_jax.packing``), as the
pretraining loop hands them to its step: every value lands where ``unpack`` reads it back."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mae_jax
from mae_jax import model as model_lib
from mae_jax import optim, pretrain_step
from mae_jax.packing import Packing


def _params():
    config = mae_jax.get_config("mae_vit_tiny_patch4")
    _, params, _ = pretrain_step.split_model(
        model_lib.MaskedAutoencoderViT(config, rngs=nnx.Rngs(0))
    )
    return jax.tree.map(np.asarray, nnx.to_pure_dict(params))


def _random_like(tree, seed=0):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: rng.normal(size=np.shape(x)).astype(x.dtype), tree)


def test_round_trip_is_exact_and_groups_follow_the_decay_rule():
    params = _random_like(_params())
    packing, _ = pretrain_step.pretrain_optimizer(params, packed=True)
    packed = packing.pack(params)
    assert packing.groups == ("decay", "no_decay")
    decays = jax.tree.leaves(optim.pretrain_decay_mask(params))
    sizes = [np.size(x) for x in jax.tree.leaves(params)]
    assert packed["decay"].size == sum(n for n, d in zip(sizes, decays, strict=True) if d)
    assert packed["no_decay"].size == sum(n for n, d in zip(sizes, decays, strict=True) if not d)
    back = packing.unpack(packed)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(back), strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    # on the host the leaves are views of the buffers: nothing is copied for a save
    qkv = back["blocks"][0]["attn"]["qkv"]["kernel"]
    assert np.shares_memory(qkv, packed["decay"])


def test_inside_jit_pack_and_unpack_give_the_same_values():
    params = _random_like(_params(), seed=1)
    packing, _ = pretrain_step.pretrain_optimizer(params, packed=True)
    doubled = jax.jit(lambda p: packing.pack(jax.tree.map(lambda x: 2 * x, packing.unpack(p))))(
        packing.pack(params)
    )
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(packing.unpack(doubled)), strict=True):
        np.testing.assert_array_equal(2 * a, b)


def test_optimizer_state_round_trip_keeps_the_checkpoint_layout():
    """The state unpacked for a checkpoint is the tree the per-parameter optimizer has: same
    paths, same shapes, in the same order (runs saved before packing resume unchanged)."""
    params = _params()
    packing, tx = pretrain_step.pretrain_optimizer(params, packed=True)
    per_param = optim.pretrain_direction(mask=optim.pretrain_decay_mask(params)).init(params)
    packed_state = _random_like(tx.init(packing.pack(params)), seed=2)
    unpacked = packing.unpack_state(packed_state)

    def names(tree):
        flat = jax.tree_util.tree_flatten_with_path(tree)[0]
        return [(jax.tree_util.keystr(path), np.shape(leaf)) for path, leaf in flat]

    assert len(names(unpacked)) > 100
    assert names(unpacked) == names(per_param)
    again = packing.pack_state(unpacked)
    for a, b in zip(jax.tree.leaves(packed_state), jax.tree.leaves(again), strict=True):
        np.testing.assert_array_equal(a, b)


def test_packed_adamw_is_the_per_parameter_adamw():
    """Weight decay on the "decay" buffer only is the official per-parameter mask."""
    params = _random_like(_params(), seed=3)
    grads = _random_like(params, seed=4)
    packing, tx = pretrain_step.pretrain_optimizer(params, packed=True, weight_decay=0.05)
    per_param = optim.pretrain_direction(mask=optim.pretrain_decay_mask(params))
    want, _ = jax.jit(per_param.update)(grads, per_param.init(params), params)
    packed_params = packing.pack(params)
    got, _ = jax.jit(tx.update)(packing.pack(grads), tx.init(packed_params), packed_params)
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(packing.unpack(got)), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=0)


def test_a_group_of_mixed_dtypes_is_refused():
    tree = {"a": np.zeros(3, np.float32), "b": np.zeros(2, jnp.bfloat16)}
    with pytest.raises(ValueError, match="group 'all' mixes float32 and bfloat16"):
        Packing(tree, {"a": "all", "b": "all"})
    with pytest.raises(ValueError, match=r"leaf of shape \(4,\) where \(3,\) was packed"):
        Packing(tree, {"a": "x", "b": "y"}).pack({"a": np.zeros(4, np.float32), "b": tree["b"]})
