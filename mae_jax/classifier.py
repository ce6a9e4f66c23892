"""The fine-tuned ViT classifier (the official ``models_vit.VisionTransformer``) in Flax NNX.

Attribute names mirror the official state_dict (``cls_token``, ``pos_embed``, ``patch_embed.proj``,
``blocks[i]``, ``fc_norm`` or ``norm``, ``head``); the blocks are the MAE's own ``Block``. Also here:
bicubic position-table interpolation as the official fine-tuning code does it, and the official
way of starting a classifier from a pretrained MAE encoder. Images are NHWC, ImageNet-normalized.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mae_jax.config import ViTConfig
from mae_jax.model import (
    RESIDUAL_DTYPE,
    Block,
    Dtype,
    MaskedAutoencoderViT,
    PatchEmbed,
    check_attention,
    layer_norm,
    linear,
    materialized_gradient,
)
from mae_jax.pos_embed import sincos_2d

# Head init of the official recipes: fine-tuning uses std 2e-5, linear probing 0.01. timm's
# trunc_normal_ cuts at +-2 in absolute units, which is no cut at all at these widths: a plain normal.
FINETUNE_HEAD_STD = 2e-5
LINPROBE_HEAD_STD = 0.01


class NotAClassifierError(ValueError):
    """A model or checkpoint that has no classification head where one is needed."""


class EncoderMismatchError(ValueError):
    """Pretrained encoder weights that do not fit the classifier's architecture."""


class HeadMismatchError(ValueError):
    """A classifier checkpoint's head does not fit the classes of the data it is to be trained on."""


# --------------------------------------------------------------------------- drop path


def drop_path(x_NxTxD: jax.Array, rate: float, key: jax.Array) -> jax.Array:
    """Stochastic depth of a residual branch: each sample's branch is zeroed with probability
    ``rate`` and the others are scaled by 1 / (1 - rate), as timm's DropPath."""
    if rate == 0.0:
        return x_NxTxD
    keep = 1.0 - rate
    shape = (x_NxTxD.shape[0],) + (1,) * (x_NxTxD.ndim - 1)
    mask = jnp.floor(keep + jax.random.uniform(key, shape, jnp.float32))
    return x_NxTxD / keep * mask.astype(x_NxTxD.dtype)


def _block_forward(block: Block, x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """The MAE Block, with drop path on both residual branches when a key is given."""
    if key is None or rate == 0.0:
        return block(x)
    k_attn, k_mlp = jax.random.split(key)
    x = materialized_gradient(x)  # as Block does
    x = x + drop_path(block.attn(block.norm1(x)), rate, k_attn)
    return x + drop_path(block.mlp(block.norm2(x)), rate, k_mlp)


# --------------------------------------------------------------------------- the probe's BatchNorm


class BatchNorm1d(nnx.Module):
    """BatchNorm over the batch axis without affine parameters, computed as torch's
    ``BatchNorm1d(d, affine=False)``: a training batch is normalised with its biased variance,
    and the running variance takes the unbiased one (squared deviations over n - 1, n the
    samples of the batch), which is what the official probe's checkpoints hold. ``nnx.BatchNorm``
    keeps the biased one. ``momentum`` is torch's: the weight of the new batch."""

    def __init__(self, num_features: int, *, epsilon: float = 1e-5, momentum: float = 0.1):
        self.mean = nnx.BatchStat(jnp.zeros(num_features, jnp.float32))
        self.var = nnx.BatchStat(jnp.ones(num_features, jnp.float32))
        self.epsilon = epsilon
        self.momentum = momentum

    def __call__(self, x_NxD: jax.Array, *, use_running_average: bool) -> jax.Array:
        """x [N, D] -> (x - mean) / sqrt(var + eps) [N, D] float32: the running statistics, or
        the batch's (then the running ones advance)."""
        x = x_NxD.astype(jnp.float32)
        if use_running_average:
            mean, var = self.mean[...], self.var[...]
        else:
            n = x.shape[0]
            if n < 2:
                raise ValueError(f"BatchNorm in training needs more than 1 sample, got {n}")
            mean = x.mean(axis=0)
            squares = jnp.square(x - mean).sum(axis=0)
            var = squares / n
            m = self.momentum
            self.mean[...] = (1.0 - m) * self.mean[...] + m * mean
            self.var[...] = (1.0 - m) * self.var[...] + m * (squares / (n - 1))
        return (x - mean) * jax.lax.rsqrt(var + self.epsilon)


# --------------------------------------------------------------------------- the model


class VisionTransformer(nnx.Module):
    """ViT classifier: patch embedding, cls token, learned position table, blocks, pooling, head.

    ``attention`` picks the attention kernel, as for ``MaskedAutoencoderViT``.
    """

    def __init__(
        self,
        config: ViTConfig,
        *,
        rngs: nnx.Rngs,
        dtype: Dtype = jnp.float32,
        head_init_std: float = FINETUNE_HEAD_STD,
        attention: str = "auto",
    ):
        check_attention(attention, dtype)
        c = config
        self.config = c
        self.dtype = dtype
        self.attention = attention
        d = c.embed_dim
        self.cls_token = nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (1, 1, d)))
        # Learned here (fine-tuning trains it); starts as the sin-cos table the MAE was trained with.
        self.pos_embed = nnx.Param(jnp.asarray(sincos_2d(d, c.grid_size))[None])
        self.patch_embed = PatchEmbed(c.patch_size, c.in_chans, d, dtype, rngs)
        self.blocks = nnx.List(
            [
                Block(d, c.num_heads, c.mlp_ratio, c.layer_norm_eps, dtype, rngs, attention)
                for _ in range(c.depth)
            ]
        )
        if c.global_pool:
            self.fc_norm = layer_norm(d, c.layer_norm_eps, rngs)
        else:
            self.norm = layer_norm(d, c.layer_norm_eps, rngs)
        self.head = linear(
            d, c.num_classes, dtype, rngs, kernel_init=nnx.initializers.normal(head_init_std)
        )

    def drop_path_rates(self) -> list[float]:
        """Per-block drop rate: linspace(0, drop_path_rate, depth), as timm's VisionTransformer."""
        return [float(r) for r in np.linspace(0.0, self.config.drop_path_rate, self.config.depth)]

    # The MAE's input check: it reads only the encoder sizes both configs share.
    _check_images = MaskedAutoencoderViT._check_images

    def forward_features(
        self,
        imgs_NxHxWxC: jax.Array,
        *,
        train: bool = False,
        key: jax.Array | None = None,
        stages: dict | None = None,
    ) -> jax.Array:
        """imgs [N, H, W, C] -> pooled features [N, D]; fills ``stages`` when given a dict."""
        self._check_images(imgs_NxHxWxC)
        use_drop = train and self.config.drop_path_rate > 0.0
        if use_drop and key is None:
            raise ValueError("train=True with drop_path_rate > 0 needs key= (a PRNG key)")
        x = self.patch_embed(imgs_NxHxWxC.astype(self.dtype))
        if stages is not None:
            stages["patch_embed"] = x
        n, _, d = x.shape
        # The residual stream in float32 from here on, whatever the compute dtype (model.py).
        cls = jnp.broadcast_to(self.cls_token[...], (n, 1, d))
        x = jnp.concatenate([cls, x.astype(RESIDUAL_DTYPE)], axis=1) + self.pos_embed[...]
        if stages is not None:
            stages["enc_in"] = x
        keys = jax.random.split(key, self.config.depth) if use_drop else [None] * self.config.depth
        outs = []
        for block, rate, k in zip(self.blocks, self.drop_path_rates(), keys, strict=True):
            x = _block_forward(block, x, rate, k)
            outs.append(x)
        if stages is not None:
            stages["enc_blocks"] = jnp.stack(outs)
        if self.config.global_pool:
            return self.fc_norm(x[:, 1:, :].mean(axis=1))  # patch tokens only, cls left out
        return self.norm(x)[:, 0]

    def features(self, imgs_NxHxWxC: jax.Array) -> jax.Array:
        """imgs [N, H, W, C] -> pooled features [N, D] (eval mode), the head's input."""
        return self.forward_features(imgs_NxHxWxC)

    def forward_stages(self, imgs_NxHxWxC: jax.Array) -> dict[str, jax.Array]:
        """Every stage in eval mode: patch_embed [N, L, D], enc_in [N, 1+L, D],
        enc_blocks [depth, N, 1+L, D], features [N, D], logits [N, classes]."""
        stages: dict[str, jax.Array] = {}
        stages["features"] = self.forward_features(imgs_NxHxWxC, stages=stages)
        stages["logits"] = self.head(stages["features"]).astype(jnp.float32)
        return stages

    def __call__(
        self, imgs_NxHxWxC: jax.Array, *, train: bool = False, key: jax.Array | None = None
    ) -> jax.Array:
        """imgs [N, H, W, C] -> logits [N, num_classes] float32; drop path only when ``train``."""
        feats = self.forward_features(imgs_NxHxWxC, train=train, key=key)
        return self.head(feats).astype(jnp.float32)


def classification_counts(
    logits_NxC: jax.Array, labels_N: jax.Array, valid_N: jax.Array
) -> dict[str, jax.Array]:
    """Sums over the valid rows: correct top-1, correct top-k (k = min(5, C)), cross-entropy."""
    k = min(5, logits_NxC.shape[-1])
    valid = valid_N.astype(jnp.float32)
    _, top = jax.lax.top_k(logits_NxC, k)
    hit = top == labels_N[:, None]
    log_probs = jax.nn.log_softmax(logits_NxC.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(log_probs, labels_N[:, None], axis=-1)[:, 0]
    return {
        "top1": (hit[:, 0] * valid).sum(),
        "top5": (hit.any(axis=-1) * valid).sum(),
        "loss": (nll * valid).sum(),
        "count": valid.sum(),
    }


# XLA:CPU's matmuls run about 1.3x faster on operands of ~1,600 rows than on the 6,304 rows of a
# ViT-B batch of 32 (197 tokens each); see eval_slice_size.
_CPU_SLICE_TOKENS = 1600


def eval_slice_size(config: ViTConfig, batch_size: int) -> int:
    """Images per slice of the eval forward (see ``in_slices``): on CPU about 1,600 tokens, 8
    images at 224px with 16px patches; on GPU and TPU the whole batch."""
    if jax.default_backend() != "cpu":
        return batch_size
    return max(1, min(batch_size, _CPU_SLICE_TOKENS // (config.num_patches + 1)))


def in_slices(fn, x: jax.Array, size: int) -> jax.Array:
    """``fn(x)`` computed on slices of ``size`` rows of ``x``, one after another (``lax.map``), for
    a row-wise ``fn`` returning one array. The same function as ``fn(x)`` (matmul blocking may round
    the last bits differently), in less time where one large operand runs slower than several
    smaller ones."""
    n = x.shape[0]
    if size >= n:
        return fn(x)
    whole = n // size * size
    out = jax.lax.map(fn, x[:whole].reshape(n // size, size, *x.shape[1:]))
    out = out.reshape(whole, *out.shape[2:])
    if whole == n:
        return out
    return jnp.concatenate([out, fn(x[whole:])])


def make_eval_logits(model: VisionTransformer, batch_size: int):
    """A jitted (state, images) -> logits of ``model`` in eval mode, sliced by ``eval_slice_size``;
    the forward that ``mae_jax.evaluate.evaluate`` (``mae-jax eval``, fine-tuning's validation)
    runs."""
    graphdef, _ = nnx.split(model)
    size = eval_slice_size(model.config, batch_size)

    @jax.jit
    def logits(state, images):
        return in_slices(nnx.merge(graphdef, state), images, size)

    return logits


# --------------------------------------------------------------------------- from an MAE


def interpolate_pos_embed(table_1xTxD: Any, new_grid: int) -> jax.Array:
    """[1, 1 + G*G, D] -> [1, 1 + G'*G', D]: the patch rows resized bicubically on their grid.

    The cls row is kept as is. Matches torch ``F.interpolate(mode='bicubic', align_corners=False)``
    (the official fine-tuning code), which needs jax's CUBIC_PYTORCH kernel without antialiasing.
    """
    table = jnp.asarray(table_1xTxD, jnp.float32)
    if table.ndim != 3 or table.shape[0] != 1:
        raise ValueError(f"expected a position table of shape [1, 1 + G*G, D], got {table.shape}")
    rows, dim = table.shape[1] - 1, table.shape[2]
    grid = math.isqrt(rows)
    if grid * grid != rows:
        raise ValueError(f"position table has {rows} patch rows, not a square grid")
    if grid == new_grid:
        return table
    patches = table[0, 1:].reshape(grid, grid, dim)
    resized = jax.image.resize(
        patches,
        (new_grid, new_grid, dim),
        method=jax.image.ResizeMethod.CUBIC_PYTORCH,
        antialias=False,
    )
    return jnp.concatenate([table[:, :1], resized.reshape(1, new_grid * new_grid, dim)], axis=1)


def _checked_copy(src: Any, dst: Any, name: str) -> Any:
    """``src`` with ``dst``'s dtypes, after checking that both trees have the same shapes."""
    src_leaves = jax.tree_util.tree_leaves_with_path(src)
    dst_leaves = jax.tree_util.tree_leaves_with_path(dst)
    src_paths = [jax.tree_util.keystr(p) for p, _ in src_leaves]
    dst_paths = [jax.tree_util.keystr(p) for p, _ in dst_leaves]
    if src_paths != dst_paths:
        missing = sorted(set(dst_paths) - set(src_paths))
        extra = sorted(set(src_paths) - set(dst_paths))
        raise EncoderMismatchError(
            f"{name}: encoder tensors do not fit the classifier (missing {missing[:4]}, "
            f"unexpected {extra[:4]})"
        )
    for (path, a), (_, b) in zip(src_leaves, dst_leaves, strict=True):
        if tuple(np.shape(a)) != tuple(np.shape(b)):
            raise EncoderMismatchError(
                f"{name}{jax.tree_util.keystr(path)}: shape {tuple(np.shape(a))} in the encoder, "
                f"the classifier needs {tuple(np.shape(b))}"
            )
    return jax.tree.map(lambda a, b: jnp.asarray(a, b.dtype), src, dst)


def init_classifier_from_mae(
    mae: MaskedAutoencoderViT | Mapping,
    config: ViTConfig,
    *,
    rngs: nnx.Rngs | None = None,
    dtype: Dtype = jnp.float32,
    head_init_std: float = FINETUNE_HEAD_STD,
    attention: str = "auto",
) -> VisionTransformer:
    """A classifier started from a pretrained MAE encoder, the way official fine-tuning does it.

    ``mae`` is an MAE model (with or without its decoder, e.g. from ``load_pretrained``) or its
    state as a nested dict. cls_token, patch_embed and blocks are copied; pos_embed is copied, or
    interpolated bicubically when the classifier's patch grid differs; with ``global_pool`` the
    pooling ``fc_norm`` starts fresh (ones, zeros) and the encoder's ``norm`` is unused, otherwise
    ``norm`` is copied; the head is new (normal, std ``head_init_std``; bias 0).
    """
    if isinstance(mae, MaskedAutoencoderViT):
        if mae.config.num_heads != config.num_heads:
            raise EncoderMismatchError(
                f"the encoder has {mae.config.num_heads} heads, the classifier {config.num_heads}"
            )
        src = nnx.to_pure_dict(nnx.state(mae))
    elif isinstance(mae, Mapping):
        src = mae
    else:
        raise TypeError(f"expected an MAE model or its state dict, got {type(mae).__name__}")
    wanted = ["cls_token", "pos_embed", "patch_embed", "blocks"] + (
        [] if config.global_pool else ["norm"]
    )
    missing = [k for k in wanted if k not in src]
    if missing:
        raise EncoderMismatchError(f"the encoder state has no {', '.join(missing)}")
    if len(src["blocks"]) != config.depth:
        raise EncoderMismatchError(
            f"the encoder has {len(src['blocks'])} blocks, the classifier {config.depth}"
        )

    return _new_classifier_with(src, wanted, config, rngs, dtype, head_init_std, attention)


def init_classifier_from_classifier(
    src: VisionTransformer,
    config: ViTConfig,
    *,
    reset_head: bool = False,
    rngs: nnx.Rngs | None = None,
    dtype: Dtype = jnp.float32,
    head_init_std: float = FINETUNE_HEAD_STD,
    attention: str = "auto",
) -> VisionTransformer:
    """A classifier that continues from another (e.g. an official fine-tuned checkpoint).

    Everything is copied, the position table interpolated when the patch grid differs; the head
    too, unless ``reset_head`` asks for a new one (normal, std ``head_init_std``). A head whose
    class count differs from ``config.num_classes`` needs ``reset_head``: the official fine-tuning
    code drops such a head silently, here it is the user's explicit choice.
    """
    c = src.config
    for field in ("embed_dim", "depth", "num_heads", "patch_size", "in_chans"):
        if getattr(c, field) != getattr(config, field):
            raise EncoderMismatchError(
                f"the checkpoint's classifier has {field} {getattr(c, field)}, the preset "
                f"{getattr(config, field)}"
            )
    if c.global_pool != config.global_pool:
        have, want = ("global pool", "cls token") if c.global_pool else ("cls token", "global pool")
        raise EncoderMismatchError(
            f"the checkpoint's classifier pools with the {have}, this run with the {want} "
            f"(--set global_pool={str(c.global_pool).lower()} keeps the checkpoint's pooling)"
        )
    if c.num_classes != config.num_classes and not reset_head:
        raise HeadMismatchError(
            f"the checkpoint's head has {c.num_classes} classes, the data {config.num_classes}: "
            "pass --reset-head to train a new head"
        )
    wanted = ["cls_token", "pos_embed", "patch_embed", "blocks"]
    wanted += ["fc_norm" if c.global_pool else "norm"] + ([] if reset_head else ["head"])
    src_state = nnx.to_pure_dict(nnx.state(src))
    return _new_classifier_with(src_state, wanted, config, rngs, dtype, head_init_std, attention)


def _new_classifier_with(
    src, wanted, config, rngs, dtype, head_init_std, attention
) -> VisionTransformer:
    """A new classifier of ``config`` with the ``wanted`` entries of the state ``src`` copied in
    (shapes checked; pos_embed interpolated to the classifier's grid)."""
    model = VisionTransformer(
        config,
        rngs=rngs if rngs is not None else nnx.Rngs(0),
        dtype=dtype,
        head_init_std=head_init_std,
        attention=attention,
    )
    state = nnx.state(model)
    target = nnx.to_pure_dict(state)
    for name in wanted:
        if name == "pos_embed":
            table = np.asarray(src[name])
            if table.ndim != 3 or table.shape[2] != config.embed_dim:
                raise EncoderMismatchError(
                    f"pos_embed: shape {table.shape}, the classifier needs [1, T, {config.embed_dim}]"
                )
            target[name] = _checked_copy(
                interpolate_pos_embed(table, config.grid_size), target[name], name
            )
        else:
            target[name] = _checked_copy(src[name], target[name], name)
    nnx.replace_by_pure_dict(state, target)
    nnx.update(model, state)
    return model
