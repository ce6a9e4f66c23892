"""The optimization recipes against hand formulas, the official rules restated, and torch.optim."""

from __future__ import annotations

import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx

from mae_jax import optim

GOLDEN = Path(__file__).parent / "golden"

BLOCK_LEAVES = {  # suffix -> shape as a function of width d (flax layout)
    ("norm1", "scale"): lambda d: (d,),
    ("norm1", "bias"): lambda d: (d,),
    ("attn", "qkv", "kernel"): lambda d: (d, 3 * d),
    ("attn", "qkv", "bias"): lambda d: (3 * d,),
    ("attn", "proj", "kernel"): lambda d: (d, d),
    ("attn", "proj", "bias"): lambda d: (d,),
    ("norm2", "scale"): lambda d: (d,),
    ("norm2", "bias"): lambda d: (d,),
    ("mlp", "fc1", "kernel"): lambda d: (d, 4 * d),
    ("mlp", "fc1", "bias"): lambda d: (4 * d,),
    ("mlp", "fc2", "kernel"): lambda d: (4 * d, d),
    ("mlp", "fc2", "bias"): lambda d: (d,),
}


def _nest(flat: dict[tuple, np.ndarray]) -> dict:
    tree: dict = {}
    for path, leaf in flat.items():
        node = tree
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = leaf
    return tree


def _flat(tree) -> dict[tuple, object]:
    return {
        optim.path_names(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def _blocks(prefix: str, depth: int, d: int) -> dict[tuple, tuple]:
    return {
        (prefix, i, *suffix): shape(d)
        for i in range(depth)
        for suffix, shape in BLOCK_LEAVES.items()
    }


def mae_shapes(*, d=768, depth=12, dd=512, ddepth=8, p=16) -> dict[tuple, tuple]:
    """Trainable leaves of mae_vit_base_patch16 (OFFICIAL_FACTS appendix), pos embeds excluded."""
    shapes = {
        ("cls_token",): (1, 1, d),
        ("mask_token",): (1, 1, dd),
        ("patch_embed", "proj", "kernel"): (p, p, 3, d),
        ("patch_embed", "proj", "bias"): (d,),
        ("norm", "scale"): (d,),
        ("norm", "bias"): (d,),
        ("decoder_embed", "kernel"): (d, dd),
        ("decoder_embed", "bias"): (dd,),
        ("decoder_norm", "scale"): (dd,),
        ("decoder_norm", "bias"): (dd,),
        ("decoder_pred", "kernel"): (dd, p * p * 3),
        ("decoder_pred", "bias"): (p * p * 3,),
    }
    return shapes | _blocks("blocks", depth, d) | _blocks("decoder_blocks", ddepth, dd)


def vit_shapes(*, d=768, depth=12, p=16, tokens=197, classes=1000) -> dict[tuple, tuple]:
    """Leaves of the global-pool vit classifier (all trainable, pos_embed included)."""
    shapes = {
        ("cls_token",): (1, 1, d),
        ("pos_embed",): (1, tokens, d),
        ("patch_embed", "proj", "kernel"): (p, p, 3, d),
        ("patch_embed", "proj", "bias"): (d,),
        ("fc_norm", "scale"): (d,),
        ("fc_norm", "bias"): (d,),
        ("head", "kernel"): (d, classes),
        ("head", "bias"): (classes,),
    }
    return shapes | _blocks("blocks", depth, d)


def shape_tree(shapes: dict[tuple, tuple]) -> dict:
    """Nested dict of zero-stride arrays: real shapes and ndim without the memory."""
    return _nest({k: np.broadcast_to(np.float32(0), s) for k, s in shapes.items()})


def random_tree(shapes: dict[tuple, tuple], rng: np.random.Generator) -> dict:
    return _nest({k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()})


def dotted(path: tuple) -> str:
    return ".".join(str(n) for n in path)


# ---- the official rules, restated on dotted names (OFFICIAL_FACTS §6-7) ----------------------


def official_pretrain_decays(name: str, shape: tuple) -> bool:
    return not (len(shape) == 1 or name.endswith(".bias"))


def official_layer(name: str, num_layers: int) -> int:
    if name in ("cls_token", "pos_embed") or name.startswith("patch_embed"):
        return 0
    if name.startswith("blocks"):
        return int(name.split(".")[1]) + 1
    return num_layers


def official_lr(epoch_f: float, *, lr, min_lr, warmup, epochs) -> float:
    if epoch_f < warmup:
        return lr * epoch_f / warmup
    return min_lr + (lr - min_lr) * 0.5 * (
        1.0 + math.cos(math.pi * (epoch_f - warmup) / (epochs - warmup))
    )


# ---- schedules --------------------------------------------------------------------------------


def test_scaled_lr():
    assert optim.scaled_lr(1.5e-4, 4096) == pytest.approx(2.4e-3, rel=1e-12)
    assert optim.scaled_lr(0.1, 16384) == pytest.approx(6.4, rel=1e-12)
    with pytest.raises(optim.OptimConfigError, match="effective batch"):
        optim.scaled_lr(1e-3, 0)


def test_warmup_cosine_by_hand():
    peak, low, w, t = 2.4e-3, 1e-6, 5, 20
    sched = optim.warmup_cosine_schedule(peak, min_lr=low, warmup_steps=w, total_steps=t)
    assert float(sched(0)) == 0.0
    assert float(sched(2)) == pytest.approx(peak * 2 / 5, rel=1e-6)
    assert float(sched(w)) == pytest.approx(peak, rel=1e-6)
    mid = low + (peak - low) * 0.5 * (1 + math.cos(math.pi * (12 - w) / (t - w)))
    assert float(sched(12)) == pytest.approx(mid, rel=1e-6)
    last = low + (peak - low) * 0.5 * (1 + math.cos(math.pi * (t - 1 - w) / (t - w)))
    assert float(sched(t - 1)) == pytest.approx(last, rel=1e-5)
    assert float(sched(t)) == pytest.approx(low, rel=1e-5)
    # fractional counts (optimizer steps that fall between integer epochs)
    assert float(sched(2.5)) == pytest.approx(peak * 0.5, rel=1e-6)


def test_warmup_cosine_rejects_bad_spans():
    with pytest.raises(optim.OptimConfigError, match="warmup_steps < total_steps"):
        optim.warmup_cosine_schedule(1.0, min_lr=0.0, warmup_steps=10, total_steps=10)


@pytest.mark.parametrize("iters, accum", [(10, 4), (12, 4), (7, 1)])
def test_epoch_schedule_replays_official_loop(iters, accum):
    """Replay the official loop: lr set when data_iter_step % accum == 0, used at the update."""
    peak, low, epochs, warmup = 1e-3, 1e-5, 5, 2
    used = []
    for epoch in range(epochs):
        lr = None
        for step in range(iters):
            if step % accum == 0:
                lr = official_lr(
                    step / iters + epoch, lr=peak, min_lr=low, warmup=warmup, epochs=epochs
                )
            if (step + 1) % accum == 0:
                used.append(lr)
    sched = optim.epoch_schedule(
        peak,
        min_lr=low,
        epochs=epochs,
        warmup_epochs=warmup,
        iters_per_epoch=iters,
        accum_iter=accum,
    )
    assert len(used) == epochs * optim.optimizer_steps_per_epoch(iters, accum)
    got = np.asarray(jax.jit(jax.vmap(sched))(jnp.arange(len(used), dtype=jnp.int32)))
    np.testing.assert_allclose(got, used, rtol=2e-6, atol=1e-12)
    assert got[0] == 0.0
    if iters % accum == 0:  # then it is the brief's s * accum / iters, as plain optimizer steps
        spe = iters / accum
        plain = optim.warmup_cosine_schedule(
            peak, min_lr=low, warmup_steps=warmup * spe, total_steps=epochs * spe
        )
        np.testing.assert_allclose([float(plain(s)) for s in range(len(used))], used, rtol=2e-6)


def test_epoch_schedule_fractional_values():
    # 10 micro-batches per epoch, accum 4: updates at epoch_f 0, 0.4, 1, 1.4, 2, 2.4, ...
    sched = optim.epoch_schedule(
        1.0, min_lr=0.0, epochs=4, warmup_epochs=2, iters_per_epoch=10, accum_iter=4
    )
    assert [round(float(sched(s)), 6) for s in range(4)] == [0.0, 0.2, 0.5, 0.7]
    expected = 0.5 * (1 + math.cos(math.pi * 0.4 / 2))
    assert float(sched(5)) == pytest.approx(expected, rel=1e-6)
    with pytest.raises(optim.OptimConfigError, match="accum_iter"):
        optim.optimizer_steps_per_epoch(3, 4)


# ---- pretraining ------------------------------------------------------------------------------


def test_pretrain_mask_on_mae_vit_base():
    mask = _flat(optim.pretrain_decay_mask(shape_tree(mae_shapes())))
    assert len(mask) == 252
    assert sum(mask.values()) == 85
    assert sum(not v for v in mask.values()) == 167
    assert mask[("cls_token",)] and mask[("mask_token",)]
    assert mask[("patch_embed", "proj", "kernel")]
    assert not mask[("patch_embed", "proj", "bias")]
    assert mask[("blocks", 11, "attn", "qkv", "kernel")]
    assert not mask[("blocks", 0, "norm1", "scale")]
    assert not mask[("blocks", 0, "attn", "qkv", "bias")]
    assert mask[("decoder_blocks", 7, "mlp", "fc2", "kernel")]
    assert not mask[("decoder_norm", "bias")]
    assert not mask[("decoder_pred", "bias")]


def _our_path(torch_name: str, ndim: int) -> tuple:
    names = [int(n) if n.isdigit() else n for n in torch_name.split(".")]
    if names[-1] == "weight":
        names[-1] = "kernel" if ndim > 1 else "scale"
    return tuple(names)


def test_pretrain_mask_matches_official_rule_on_golden_state_dict():
    state = torch.load(GOLDEN / "tiny_shared.pth", weights_only=True, map_location="cpu")["model"]
    trainable = {k: tuple(v.shape) for k, v in state.items() if not k.endswith("pos_embed")}
    ours = _flat(
        optim.pretrain_decay_mask(
            shape_tree({_our_path(k, len(s)): s for k, s in trainable.items()})
        )
    )
    expected = {_our_path(k, len(s)): official_pretrain_decays(k, s) for k, s in trainable.items()}
    assert ours == expected
    assert sum(expected.values()) == 2 + 1 + 2 * 4 + 1 + 2 * 4 + 1  # tokens, conv, blocks, linears


def test_adamw_one_step_by_hand():
    rng = np.random.default_rng(0)
    params = {
        "w": rng.standard_normal((3, 4)).astype(np.float32),
        "bias": rng.standard_normal(4).astype(np.float32),
    }
    grads = {
        "w": rng.standard_normal((3, 4)).astype(np.float32),
        "bias": rng.standard_normal(4).astype(np.float32),
    }
    lr, wd, b1, b2, eps = 1e-2, 0.05, 0.9, 0.95, 1e-8
    tx = optim.make_pretrain_optimizer(lr, weight_decay=wd)
    updates, _ = tx.update(grads, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    for name, decay in (("w", wd), ("bias", 0.0)):
        p, g = params[name].astype(np.float64), grads[name].astype(np.float64)
        m_hat = (1 - b1) * g / (1 - b1)
        v_hat = (1 - b2) * g * g / (1 - b2)
        expected = p * (1 - lr * decay) - lr * m_hat / (np.sqrt(v_hat) + eps)
        np.testing.assert_allclose(np.asarray(new[name]), expected, atol=1e-6, rtol=0)


def _torch_groups(flat_params: dict, group_of) -> tuple[list, dict]:
    """Torch tensors grouped by group_of(dotted name, shape) -> (group key, options)."""
    tensors, groups = {}, {}
    for path, value in flat_params.items():
        tensors[path] = torch.nn.Parameter(torch.from_numpy(np.array(value)))
        key, options = group_of(dotted(path), value.shape)
        groups.setdefault(key, dict(options, params=[]))["params"].append(tensors[path])
    return list(groups.values()), tensors


def _run_both(tx, torch_opt, torch_tensors, params, grads_seq, lr_seq, lr_of_group, atol):
    state, update = tx.init(params), jax.jit(tx.update)
    for step, (grads, lr) in enumerate(zip(grads_seq, lr_seq, strict=True)):
        for group in torch_opt.param_groups:
            group["lr"] = lr_of_group(lr, group)
        for path, g in _flat(grads).items():
            torch_tensors[path].grad = torch.from_numpy(np.array(g))
        torch_opt.step()
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
        for path, value in _flat(params).items():
            np.testing.assert_allclose(
                np.asarray(value),
                torch_tensors[path].detach().numpy(),
                atol=atol,
                rtol=0,
                err_msg=f"{dotted(path)} after step {step}",
            )
    return params


def _tiny_mae_shapes():
    return mae_shapes(d=8, depth=2, dd=4, ddepth=1, p=2)


def test_pretrain_optimizer_matches_torch_adamw():
    rng = np.random.default_rng(1)
    shapes = _tiny_mae_shapes()
    params = random_tree(shapes, rng)
    grads_seq = [random_tree(shapes, rng) for _ in range(4)]
    peak, low, w, t = 1e-2, 1e-4, 1, 4
    lrs = [official_lr(s, lr=peak, min_lr=low, warmup=w, epochs=t) for s in range(4)]
    sched = optim.warmup_cosine_schedule(peak, min_lr=low, warmup_steps=w, total_steps=t)

    def group_of(name, shape):
        decays = official_pretrain_decays(name, shape)
        return decays, {"weight_decay": 0.05 if decays else 0.0}

    groups, tensors = _torch_groups(_flat(params), group_of)
    assert len(groups) == 2
    torch_opt = torch.optim.AdamW(groups, lr=0.0, betas=(0.9, 0.95), eps=1e-8)
    tx = optim.make_pretrain_optimizer(sched)
    _run_both(tx, torch_opt, tensors, params, grads_seq, lrs, lambda lr, g: lr, atol=1e-6)


def test_accumulation_equals_one_step_on_mean_gradient():
    rng = np.random.default_rng(2)
    shapes = _tiny_mae_shapes()
    params = jax.tree.map(lambda x: 0.02 * x, random_tree(shapes, rng))  # the init's scale
    k, rounds = 3, 2
    micro = [random_tree(shapes, rng) for _ in range(k * rounds)]
    sched = optim.warmup_cosine_schedule(1e-2, min_lr=0.0, warmup_steps=1, total_steps=10)

    accumulated = optim.make_pretrain_optimizer(sched, accum_steps=k)
    state, p_acc, update = accumulated.init(params), params, jax.jit(accumulated.update)
    for i, g in enumerate(micro):
        updates, state = update(g, state, p_acc)
        if (i + 1) % k:
            assert all(not np.any(u) for u in jax.tree.leaves(updates))
        p_acc = optax.apply_updates(p_acc, updates)
    assert int(state.gradient_step) == rounds

    plain = optim.make_pretrain_optimizer(sched)
    state, p_plain, update = plain.init(params), params, jax.jit(plain.update)
    for r in range(rounds):
        mean = jax.tree.map(lambda *gs: sum(gs) / k, *micro[r * k : (r + 1) * k])
        updates, state = update(mean, state, p_plain)
        p_plain = optax.apply_updates(p_plain, updates)
    moved = max(
        float(jnp.max(jnp.abs(a - b)))
        for a, b in zip(jax.tree.leaves(p_plain), jax.tree.leaves(params), strict=True)
    )
    assert moved > 1e-4  # the second update ran at lr(1) = peak, not lr(5)
    for a, b in zip(jax.tree.leaves(p_acc), jax.tree.leaves(p_plain), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-7, rtol=0)


# ---- fine-tuning ------------------------------------------------------------------------------


def test_layer_decay_on_vit_base():
    tree = shape_tree(vit_shapes())
    scales = _flat(optim.layer_decay_scales(tree, layer_decay=0.65, depth=12))
    for path in [
        ("cls_token",),
        ("pos_embed",),
        ("patch_embed", "proj", "kernel"),
        ("patch_embed", "proj", "bias"),
    ]:
        assert scales[path] == pytest.approx(0.65**13, rel=1e-12)
    assert scales[("blocks", 0, "attn", "qkv", "kernel")] == pytest.approx(0.65**12, rel=1e-12)
    assert scales[("blocks", 11, "norm2", "bias")] == pytest.approx(0.65, rel=1e-12)
    for path in [("fc_norm", "scale"), ("head", "kernel"), ("head", "bias")]:
        assert scales[path] == 1.0
    for path, scale in scales.items():  # every leaf against the official rule on dotted names
        assert scale == pytest.approx(0.65 ** (13 - official_layer(dotted(path), 13)), rel=1e-12)

    mask = _flat(optim.finetune_decay_mask(tree))
    assert not mask[("cls_token",)] and not mask[("pos_embed",)]
    assert mask[("patch_embed", "proj", "kernel")] and mask[("head", "kernel")]
    assert not any(mask[p] for p, s in vit_shapes().items() if len(s) == 1)
    assert sum(mask.values()) == 1 + 12 * 4 + 1
    groups = optim.finetune_param_groups(tree, depth=12)
    assert len(groups) == 28  # measured on the official code (OFFICIAL_FACTS §7)
    assert sum(groups.values()) == 152


def test_layer_id_reads_any_path_form():
    seq_tree = {"blocks": [{"fc": np.zeros((2, 2))}, {"fc": np.zeros((2, 2))}], "head": np.zeros(2)}
    scales = _flat(optim.layer_decay_scales(seq_tree, layer_decay=0.5, depth=2))
    assert scales == {("blocks", 0, "fc"): 0.25, ("blocks", 1, "fc"): 0.5, ("head",): 1.0}
    assert optim.layer_id(("blocks", "1", "attn", "qkv", "kernel"), depth=2) == 2
    assert optim.layer_id((jax.tree_util.GetAttrKey("patch_embed"),), depth=2) == 0


def test_layer_id_rejects_block_beyond_depth():
    with pytest.raises(optim.OptimConfigError, match="block index 12 but depth is 12"):
        optim.make_finetune_optimizer(
            1e-3, layer_decay=0.65, depth=12, params=shape_tree(vit_shapes(depth=13))
        )


def test_finetune_optimizer_matches_torch_param_groups():
    rng = np.random.default_rng(3)
    depth, decay, wd = 3, 0.65, 0.05
    shapes = vit_shapes(d=8, depth=depth, p=2, tokens=5, classes=3)
    params = random_tree(shapes, rng)
    grads_seq = [random_tree(shapes, rng) for _ in range(3)]
    peak, low = 5e-2, 1e-6
    lrs = [official_lr(s, lr=peak, min_lr=low, warmup=1, epochs=4) for s in range(3)]
    sched = optim.warmup_cosine_schedule(peak, min_lr=low, warmup_steps=1, total_steps=4)

    def group_of(name, shape):
        layer = official_layer(name, depth + 1)
        no_decay = len(shape) == 1 or name in ("pos_embed", "cls_token")
        options = {
            "weight_decay": 0.0 if no_decay else wd,
            "lr_scale": decay ** (depth + 1 - layer),
        }
        return (layer, no_decay), options

    groups, tensors = _torch_groups(_flat(params), group_of)
    assert len(groups) == 2 * (depth + 2)
    torch_opt = torch.optim.AdamW(groups, lr=0.0)
    tx = optim.make_finetune_optimizer(
        sched, layer_decay=decay, depth=depth, weight_decay=wd, params=params
    )
    _run_both(
        tx,
        torch_opt,
        tensors,
        params,
        grads_seq,
        lrs,
        lambda lr, group: lr * group["lr_scale"],
        atol=1e-6,
    )


# ---- the same functions on a real nnx model ---------------------------------------------------


class FixedEmbed(nnx.Variable):
    """Stand-in for the model's non-trainable sin-cos table."""


class Block(nnx.Module):
    def __init__(self, d: int, rngs: nnx.Rngs):
        self.norm1 = nnx.LayerNorm(d, rngs=rngs)
        self.attn = nnx.Dict(qkv=nnx.Linear(d, 3 * d, rngs=rngs), proj=nnx.Linear(d, d, rngs=rngs))
        self.norm2 = nnx.LayerNorm(d, rngs=rngs)
        self.mlp = nnx.Dict(
            fc1=nnx.Linear(d, 4 * d, rngs=rngs), fc2=nnx.Linear(4 * d, d, rngs=rngs)
        )


class TinyViT(nnx.Module):
    def __init__(self, rngs: nnx.Rngs, *, d=8, depth=2, trainable_pos=True):
        self.cls_token = nnx.Param(jax.random.normal(rngs.params(), (1, 1, d)))
        pos = jax.random.normal(rngs.params(), (1, 5, d))
        self.pos_embed = nnx.Param(pos) if trainable_pos else FixedEmbed(pos)
        self.patch_embed = nnx.Dict(proj=nnx.Conv(3, d, (2, 2), strides=(2, 2), rngs=rngs))
        self.blocks = nnx.List([Block(d, rngs) for _ in range(depth)])
        self.fc_norm = nnx.LayerNorm(d, rngs=rngs)
        self.head = nnx.Linear(d, 3, rngs=rngs)


def test_masks_and_scales_read_nnx_state_paths():
    model = TinyViT(nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    pure = nnx.to_pure_dict(state)
    for fn in (
        optim.pretrain_decay_mask,
        optim.finetune_decay_mask,
        lambda t: optim.layer_decay_scales(t, layer_decay=0.5, depth=2),
    ):
        from_state, from_dict = _flat(fn(state)), _flat(fn(pure))
        assert from_state == from_dict
        assert set(from_state) == set(_flat(pure))
    scales = _flat(optim.layer_decay_scales(state, layer_decay=0.5, depth=2))
    assert scales[("blocks", 1, "mlp", "fc1", "kernel")] == 0.5
    assert scales[("pos_embed",)] == 0.125
    mask = _flat(optim.finetune_decay_mask(state))
    assert mask[("blocks", 0, "attn", "qkv", "kernel")] and not mask[("pos_embed",)]


def test_nnx_optimizer_update_equals_plain_tree_update():
    model = TinyViT(nnx.Rngs(1))
    before = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    rng = np.random.default_rng(4)
    grads_pure = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype), before)
    grads = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(grads, grads_pure)

    def make():
        return optim.make_finetune_optimizer(0.1, layer_decay=0.5, depth=2, weight_decay=0.3)

    optimizer = nnx.Optimizer(model, make(), wrt=nnx.Param)
    optimizer.update(model, grads)
    tx = make()
    updates, _ = tx.update(grads_pure, tx.init(before), before)
    expected = _flat(optax.apply_updates(before, updates))
    got = _flat(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    assert set(got) == set(expected)
    for path in expected:
        np.testing.assert_allclose(np.asarray(got[path]), np.asarray(expected[path]), atol=1e-7)


def test_pretrain_optimizer_leaves_fixed_pos_embed_alone():
    model = TinyViT(nnx.Rngs(2), trainable_pos=False)
    pos_before = np.array(model.pos_embed[...])
    optimizer = nnx.Optimizer(
        model, optim.make_pretrain_optimizer(0.1, accum_steps=2), wrt=nnx.Param
    )
    assert ("pos_embed",) not in _flat(nnx.to_pure_dict(nnx.state(model, nnx.Param)))

    @nnx.jit
    def train_step(model, optimizer):
        loss = lambda m: jnp.sum(m.cls_token[...] ** 2) + jnp.sum(m.head.kernel[...])  # noqa: E731
        optimizer.update(model, nnx.grad(loss)(model))

    for _ in range(2):
        train_step(model, optimizer)
    np.testing.assert_array_equal(np.array(model.pos_embed[...]), pos_before)
    assert int(optimizer.opt_state.gradient_step[...]) == 1


# ---- linear probe -----------------------------------------------------------------------------


def official_lars_steps(params, grads_seq, lrs, *, momentum, trust, wd):
    params = {k: v.copy() for k, v in params.items()}
    mu = {k: np.zeros_like(v) for k, v in params.items()}
    for grads, lr in zip(grads_seq, lrs, strict=True):
        for k, p in params.items():
            dp = grads[k].copy()
            if p.ndim > 1:
                dp = dp + wd * p
                p_norm, d_norm = np.linalg.norm(p), np.linalg.norm(dp)
                q = trust * p_norm / d_norm if p_norm > 0 and d_norm > 0 else 1.0
                dp = dp * q
            mu[k] = momentum * mu[k] + dp
            params[k] = p - lr * mu[k]
    return params


@pytest.mark.parametrize("num_steps", [1, 2])
def test_lars_matches_official_formula(num_steps):
    rng = np.random.default_rng(5)
    params = {
        "head": rng.standard_normal((6, 4)).astype(np.float32),
        "bias": rng.standard_normal(4).astype(np.float32),  # 1-D: no decay, no trust ratio
        "zeros": np.zeros((2, 3), np.float32),  # |p| = 0: trust ratio 1
    }
    grads_seq = [
        {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in params.items()}
        for _ in range(num_steps)
    ]
    lrs = [0.5, 2.0][:num_steps]  # a changing lr: momentum must carry gradients, not lr * grad
    tx = optim.lars(lambda count: jnp.array([0.5, 2.0])[count], weight_decay=0.1)
    state, got = tx.init(params), params
    for grads in grads_seq:
        updates, state = tx.update(grads, state, got)
        got = optax.apply_updates(got, updates)
    expected = official_lars_steps(params, grads_seq, lrs, momentum=0.9, trust=0.001, wd=0.1)
    for k in params:
        np.testing.assert_allclose(np.asarray(got[k]), expected[k], atol=1e-6, rtol=0, err_msg=k)
    if num_steps == 2:  # optax.lars scales by lr before momentum: not the official update
        stock = optax.lars(
            lambda count: jnp.array([0.5, 2.0])[count],
            weight_decay=0.1,
            weight_decay_mask=lambda t: jax.tree.map(lambda x: x.ndim > 1, t),
            trust_ratio_mask=lambda t: jax.tree.map(lambda x: x.ndim > 1, t),
        )
        s, p = stock.init(params), params
        for grads in grads_seq:
            u, s = stock.update(grads, s, p)
            p = optax.apply_updates(p, u)
        assert np.max(np.abs(np.asarray(p["bias"]) - expected["bias"])) > 1e-2
