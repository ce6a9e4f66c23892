"""The official MAE optimization recipes as explicit optax transformations.

- Pretraining: AdamW(b1=0.9, b2=0.95); weight decay on every parameter with more than one dimension
  whose name is not ``bias`` (so cls_token and mask_token decay; pos embeds are not trainable).
- Fine-tuning: AdamW with torch defaults and layer-wise lr decay: the lr (and with it the decoupled
  weight decay) of each parameter is multiplied by ``layer_decay ** (depth + 1 - layer_id)``.
- Linear probe: LARS with the official ordering: momentum on the trust-scaled gradient, lr last.
- Schedules: linear warmup from exactly 0, then half-cycle cosine to min_lr, evaluated per optimizer
  step at the fractional epoch the official training loop uses.

Every mask and scale is derived from parameter paths, so the same functions work on nested dicts,
on ``nnx.State`` (raw, or pure as ``nnx.Optimizer`` passes it) and on any other pytree of arrays.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import jax
import jax.numpy as jnp
import optax

PyTree = Any
KeyPath = tuple[Any, ...]

# Names the official code gives layer 0 in layer-wise lr decay, and exempts from fine-tune decay.
_EMBEDDING_NAMES = ("cls_token", "pos_embed")


class OptimConfigError(ValueError):
    """An optimizer or schedule was asked for with settings that cannot work."""


# ----------------------------------------------------------------------------------------------
# Parameter paths
# ----------------------------------------------------------------------------------------------


def path_names(path: KeyPath) -> tuple[Hashable, ...]:
    """Plain names of a key path: ``(DictKey('blocks'), DictKey(3), ...) -> ('blocks', 3, ...)``.

    Accepts jax key entries (DictKey, GetAttrKey, SequenceKey, FlattenedIndexKey) and plain
    strings or ints. A trailing ``GetAttrKey('value')`` is dropped: it is the array inside an
    ``nnx.Variable`` when a raw ``nnx.State`` is flattened, not part of the parameter's name.
    """
    names = []
    for entry in path:
        if isinstance(entry, jax.tree_util.DictKey):
            names.append(entry.key)
        elif isinstance(entry, jax.tree_util.GetAttrKey):
            names.append(entry.name)
        elif isinstance(entry, jax.tree_util.SequenceKey):
            names.append(entry.idx)
        elif isinstance(entry, jax.tree_util.FlattenedIndexKey):
            names.append(entry.key)
        else:
            names.append(entry)
    if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "value":
        names.pop()
    return tuple(names)


def _dotted(names: tuple[Hashable, ...]) -> str:
    return ".".join(str(n) for n in names)


# ----------------------------------------------------------------------------------------------
# Learning-rate schedules (util/lr_sched.py semantics)
# ----------------------------------------------------------------------------------------------


def scaled_lr(blr: float, effective_batch: int) -> float:
    """Linear scaling rule: ``blr * effective_batch / 256``, effective = batch * accum * devices."""
    if effective_batch < 1:
        raise OptimConfigError(f"effective batch size must be >= 1, got {effective_batch}")
    return blr * effective_batch / 256


def warmup_cosine_schedule(
    peak_lr: float, *, min_lr: float, warmup_steps: float, total_steps: float
) -> optax.Schedule:
    """lr(t): ``peak*t/W`` for t < W, then half-cycle cosine from peak (t=W) to min_lr (t=T).

    ``t`` may be fractional (any unit: optimizer steps or epochs). Past ``total_steps`` the value
    stays at ``min_lr`` (the official never evaluates there).
    """
    if not 0 <= warmup_steps < total_steps:
        raise OptimConfigError(
            f"schedule needs 0 <= warmup_steps < total_steps, got {warmup_steps} and {total_steps}"
        )
    decay_span = total_steps - warmup_steps

    def schedule(step: jax.typing.ArrayLike) -> jax.Array:
        t = jnp.asarray(step, jnp.float32)
        # max() only guards W = 0, where the warmup branch is never selected.
        warm = peak_lr * t / max(warmup_steps, 1e-30)
        progress = jnp.minimum((t - warmup_steps) / decay_span, 1.0)
        cosine = min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
        return jnp.where(t < warmup_steps, warm, cosine)

    return schedule


def optimizer_steps_per_epoch(iters_per_epoch: int, accum_iter: int = 1) -> int:
    """Optimizer updates per epoch: ``iters_per_epoch // accum_iter`` (micro-batches per epoch)."""
    if accum_iter < 1 or iters_per_epoch < accum_iter:
        raise OptimConfigError(
            f"need 1 <= accum_iter <= iters_per_epoch, got accum_iter={accum_iter}, "
            f"iters_per_epoch={iters_per_epoch}"
        )
    return iters_per_epoch // accum_iter


def epoch_schedule(
    peak_lr: float,
    *,
    min_lr: float,
    epochs: float,
    warmup_epochs: float,
    iters_per_epoch: int,
    accum_iter: int = 1,
) -> optax.Schedule:
    """The official lr as a function of the optimizer step ``s`` (what optax counts).

    The official sets the lr before each group of ``accum_iter`` micro-batches at
    ``epoch_f = data_iter_step / iters_per_epoch + epoch``. The k-th update of epoch e therefore
    uses ``epoch_f = e + k * accum_iter / iters_per_epoch``, which is ``s * accum_iter /
    iters_per_epoch`` when ``accum_iter`` divides ``iters_per_epoch``. (When it does not, the
    official carries the left-over micro-batch gradients into the next epoch's first update; feed
    only ``optimizer_steps_per_epoch * accum_iter`` micro-batches per epoch to stay on this grid.)
    """
    steps_per_epoch = optimizer_steps_per_epoch(iters_per_epoch, accum_iter)
    in_epochs = warmup_cosine_schedule(
        peak_lr, min_lr=min_lr, warmup_steps=warmup_epochs, total_steps=epochs
    )

    def schedule(step: jax.typing.ArrayLike) -> jax.Array:
        epoch, k = jnp.divmod(jnp.asarray(step, jnp.int32), steps_per_epoch)
        epoch_f = epoch.astype(jnp.float32) + k.astype(jnp.float32) * (accum_iter / iters_per_epoch)
        return in_epochs(epoch_f)

    return schedule


# ----------------------------------------------------------------------------------------------
# Pretraining (main_pretrain.py: timm 0.3.2 add_weight_decay + AdamW(0.9, 0.95))
# ----------------------------------------------------------------------------------------------


def pretrain_decay_mask(params: PyTree) -> PyTree:
    """Same-structure bool tree: decay iff ``ndim > 1`` and the leaf name is not ``bias``."""

    def decays(path: KeyPath, leaf: Any) -> bool:
        return jnp.ndim(leaf) > 1 and path_names(path)[-1] != "bias"

    return jax.tree_util.tree_map_with_path(decays, params)


def accumulate(tx: optax.GradientTransformation, accum_steps: int) -> optax.GradientTransformation:
    """Average gradients over ``accum_steps`` micro-batches; the inner ``tx`` (and its schedule)
    advances once per ``accum_steps`` calls, and the calls in between return zero updates."""
    if accum_steps < 1:
        raise OptimConfigError(f"accum_steps must be >= 1, got {accum_steps}")
    if accum_steps == 1:
        return tx
    return optax.MultiSteps(tx, every_k_schedule=accum_steps).gradient_transformation()


def one_update_per_step(
    tx: optax.GradientTransformation, accum_steps: int
) -> optax.GradientTransformation:
    """``tx`` for a step that averages its ``accum_steps`` micro-batches' gradients itself: each
    ``update`` runs ``tx`` once, on that mean (``accumulate`` runs it at every micro-batch and
    masks the result).

    The state is ``accumulate``'s (``optax.MultiStepsState``), so that either resumes the other's
    checkpoints: ``gradient_step`` counts the updates, ``mini_step`` and ``acc_grads`` stay zero.
    A state that ``accumulate`` left inside a group (``mini_step`` m > 0, ``acc_grads`` the mean of
    m gradients) is completed: ``update`` then takes the mean of the group's other
    ``accum_steps - m`` micro-batches.
    """
    if accum_steps < 1:
        raise OptimConfigError(f"accum_steps must be >= 1, got {accum_steps}")
    if accum_steps == 1:
        return tx
    init = optax.MultiSteps(tx, every_k_schedule=accum_steps).init

    def update_fn(grads, state, params=None):
        done = state.mini_step / accum_steps  # share of the group already in acc_grads
        mean = jax.tree.map(
            lambda g, acc: g + (acc.astype(g.dtype) - g) * done.astype(g.dtype),
            grads,
            state.acc_grads,
        )
        updates, inner = tx.update(mean, state.inner_opt_state, params)
        state = state._replace(
            mini_step=jnp.zeros_like(state.mini_step),
            gradient_step=state.gradient_step + 1,
            inner_opt_state=inner,
            acc_grads=jax.tree.map(jnp.zeros_like, state.acc_grads),
        )
        return updates, state

    return optax.GradientTransformation(init, update_fn)


def make_pretrain_optimizer(
    learning_rate: optax.ScalarOrSchedule,
    *,
    weight_decay: float = 0.05,
    b1: float = 0.9,
    b2: float = 0.95,
    eps: float = 1e-8,
    accum_steps: int = 1,
) -> optax.GradientTransformation:
    """AdamW as torch computes it: ``p -= lr(s) * (adam_update + wd * mask * p)`` per update s."""
    adamw = optax.adamw(
        learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=pretrain_decay_mask
    )
    return accumulate(adamw, accum_steps)


def pretrain_direction(
    *,
    weight_decay: float = 0.05,
    b1: float = 0.9,
    b2: float = 0.95,
    eps: float = 1e-8,
    mask: Any = pretrain_decay_mask,
) -> optax.GradientTransformation:
    """``make_pretrain_optimizer`` without its learning rate: the train step applies
    ``p -= lr * direction`` with an lr it gets from the host, which is the same arithmetic as
    optax's ``adamw`` (``p + (-lr) * direction``). ``mask`` may be a bool tree, for optimizer
    states that hold slices of the parameters."""
    return optax.chain(
        optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
        optax.add_decayed_weights(weight_decay, mask),
    )


# ----------------------------------------------------------------------------------------------
# Fine-tuning (main_finetune.py + util/lr_decay.py)
# ----------------------------------------------------------------------------------------------


def layer_id(path: KeyPath, depth: int) -> int:
    """Layer of a parameter for lr decay: cls_token, pos_embed, patch_embed.* -> 0;
    blocks.k.* -> k + 1; everything else (norm, fc_norm, head, ...) -> depth + 1."""
    names = path_names(path)
    if not names:
        raise OptimConfigError("a parameter path is empty; cannot assign it a layer")
    top = names[0]
    if top in _EMBEDDING_NAMES or top == "patch_embed":
        return 0
    if top == "blocks":
        if len(names) < 2:
            raise OptimConfigError(f"parameter {_dotted(names)} has no block index after 'blocks'")
        block = int(names[1])
        if not 0 <= block < depth:
            raise OptimConfigError(
                f"parameter {_dotted(names)} has block index {block} but depth is {depth}"
            )
        return block + 1
    return depth + 1


def layer_decay_scales(params: PyTree, *, layer_decay: float, depth: int) -> PyTree:
    """Same-structure tree of Python floats: ``layer_decay ** (depth + 1 - layer_id)``."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: layer_decay ** (depth + 1 - layer_id(path, depth)), params
    )


def finetune_decay_mask(params: PyTree) -> PyTree:
    """Same-structure bool tree: decay iff ``ndim > 1`` and the parameter is not a top-level
    ``pos_embed`` or ``cls_token`` (timm's ``no_weight_decay``)."""

    def decays(path: KeyPath, leaf: Any) -> bool:
        names = path_names(path)
        return jnp.ndim(leaf) > 1 and not (len(names) == 1 and names[0] in _EMBEDDING_NAMES)

    return jax.tree_util.tree_map_with_path(decays, params)


def scale_by_layer_decay(*, layer_decay: float, depth: int) -> optax.GradientTransformation:
    """Multiply each update by its layer's lr scale (stateless; scales come from the paths)."""

    def update_fn(updates, state, params=None):
        del params
        scales = layer_decay_scales(updates, layer_decay=layer_decay, depth=depth)
        scaled = jax.tree.map(lambda u, s: u * jnp.asarray(s, u.dtype), updates, scales)
        return scaled, state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def make_finetune_optimizer(
    learning_rate: optax.ScalarOrSchedule,
    *,
    layer_decay: float,
    depth: int,
    weight_decay: float = 0.05,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    accum_steps: int = 1,
    params: PyTree | None = None,
) -> optax.GradientTransformation:
    """AdamW with layer-wise lr decay, as torch does it per param group:
    ``p -= lr(s) * scale[p] * (adam_update + wd * mask * p)``.

    ``params``, if given, is only checked now (every path gets a valid layer), so that a wrong
    ``depth`` fails here rather than at the first update.
    """
    if not 0.0 < layer_decay <= 1.0:
        raise OptimConfigError(f"layer_decay must be in (0, 1], got {layer_decay}")
    if depth < 1:
        raise OptimConfigError(f"depth must be >= 1, got {depth}")
    if params is not None:
        layer_decay_scales(params, layer_decay=layer_decay, depth=depth)
    adamw = optax.adamw(
        learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=finetune_decay_mask
    )
    # Scaling after adamw's -lr step multiplies the decoupled decay too, as a torch group lr does.
    tx = optax.chain(adamw, scale_by_layer_decay(layer_decay=layer_decay, depth=depth))
    return accumulate(tx, accum_steps)


# ----------------------------------------------------------------------------------------------
# Linear probe (util/lars.py)
# ----------------------------------------------------------------------------------------------


def _more_than_1d(tree: PyTree) -> PyTree:
    return jax.tree.map(lambda x: jnp.ndim(x) > 1, tree)


def lars(
    learning_rate: optax.ScalarOrSchedule,
    *,
    momentum: float = 0.9,
    trust_coefficient: float = 0.001,
    weight_decay: float = 0.0,
) -> optax.GradientTransformation:
    """LARS as the official linear probe: for ndim > 1, ``g += wd*p; g *= trust*|p|/|g|`` (1 if
    either norm is 0); then ``mu = momentum*mu + g; p -= lr(s)*mu``. 1-D params skip decay and
    trust.

    ``optax.lars`` differs: it applies the lr before the momentum trace, so under a schedule its
    momentum carries old learning rates.
    """
    return optax.chain(
        optax.masked(optax.add_decayed_weights(weight_decay), _more_than_1d),
        optax.masked(
            optax.scale_by_trust_ratio(trust_coefficient=trust_coefficient, eps=0.0),
            _more_than_1d,
        ),
        optax.trace(decay=momentum),
        optax.scale_by_learning_rate(learning_rate),
    )


def finetune_param_groups(params: PyTree, *, depth: int) -> dict[tuple[int, bool], int]:
    """``{(layer_id, decays): number of tensors}``: the official fine-tune param groups (28 for
    ViT-B)."""
    groups: dict[tuple[int, bool], int] = {}
    leaves_with_path = jax.tree_util.tree_flatten_with_path(params)[0]
    decays = jax.tree_util.tree_leaves(finetune_decay_mask(params))
    for (path, _), decay in zip(leaves_with_path, decays, strict=True):
        key = (layer_id(path, depth), bool(decay))
        groups[key] = groups.get(key, 0) + 1
    return groups
