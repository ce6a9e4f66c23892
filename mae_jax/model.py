"""The masked autoencoder in Flax NNX, and patchify/unpatchify.

Attribute names mirror the official PyTorch state_dict (``blocks[3].attn.qkv``, ``decoder_pred``, ...),
so that a checkpoint maps onto this tree by a short table of rules. Images are NHWC, ImageNet-normalized.
Shape suffixes: N batch, H/W image size, L patches, K kept patches, T tokens, D width, P patch vector.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mae_jax import masking as masking_lib
from mae_jax.config import MAEConfig
from mae_jax.pos_embed import sincos_2d

Dtype = Any


class MissingDecoderError(RuntimeError):
    """Raised when an encoder-only model is asked for a reconstruction or a pretraining loss."""


class FixedEmbedding(nnx.Variable):
    """A fixed table (the sin-cos position embedding): saved and loaded, never optimized."""


# --------------------------------------------------------------------------- patches


def patchify(imgs_NxHxWxC: jax.Array, patch_size: int) -> jax.Array:
    """[N, H, W, C] -> [N, L, p*p*C], patches row-major, each vector in (row, col, channel) order."""
    n, h, w, c = imgs_NxHxWxC.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {p}")
    x = imgs_NxHxWxC.reshape(n, h // p, p, w // p, p, c)
    x = x.transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(n, (h // p) * (w // p), p * p * c)


def unpatchify(patches_NxLxP: jax.Array, patch_size: int, channels: int = 3) -> jax.Array:
    """[N, L, p*p*C] -> [N, H, W, C] for a square grid; the inverse of ``patchify``."""
    n, length, _ = patches_NxLxP.shape
    g = int(round(length**0.5))
    if g * g != length:
        raise ValueError(f"{length} patches do not form a square grid")
    p = patch_size
    x = patches_NxLxP.reshape(n, g, g, p, p, channels)
    x = x.transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(n, g * p, g * p, channels)


# --------------------------------------------------------------------------- precision
#
# What a compute dtype means, as torch autocast does it. Parameters are float32 whatever it is.
# - float32: every matmul, einsum and convolution at full float32 precision on every platform
#   (Precision.HIGHEST on the op, so no context is needed: XLA's DEFAULT would be one bfloat16
#   pass on TPU and TF32 on recent GPUs).
# - bfloat16 (or float16): the inputs of matmuls and attention in that dtype, one pass of it
#   (DEFAULT); the residual stream, the position-table and token adds, LayerNorm, softmax and
#   the loss in float32 (RESIDUAL_DTYPE), as autocast keeps them.

RESIDUAL_DTYPE = jnp.float32


def matmul_precision(dtype: Dtype) -> jax.lax.Precision:
    """The precision the model's matmuls ask for with compute ``dtype``: HIGHEST for float32
    (and wider), DEFAULT for the 16-bit types."""
    if jnp.dtype(dtype).itemsize < 4:
        return jax.lax.Precision.DEFAULT
    return jax.lax.Precision.HIGHEST


# --------------------------------------------------------------------------- layers


def linear(din: int, dout: int, dtype: Dtype, rngs: nnx.Rngs, **init) -> nnx.Linear:
    """A Linear computing in ``dtype`` at ``matmul_precision(dtype)``, float32 parameters.

    Default init: xavier-uniform on the whole matrix (the fused qkv included), zero bias, the
    official one; ``init`` may replace kernel_init / bias_init.
    """
    init = {
        "kernel_init": nnx.initializers.xavier_uniform(),
        "bias_init": nnx.initializers.zeros,
        **init,
    }
    return nnx.Linear(
        din,
        dout,
        dtype=dtype,
        param_dtype=jnp.float32,
        precision=matmul_precision(dtype),
        rngs=rngs,
        **init,
    )


def layer_norm(dim: int, eps: float, rngs: nnx.Rngs) -> nnx.LayerNorm:
    """LayerNorm in float32 whatever the compute dtype (autocast's rule); a following Linear
    casts its output to the compute dtype."""
    # use_fast_variance=False: E[(x - mean)^2], which rounds like torch's LayerNorm.
    return nnx.LayerNorm(
        dim,
        epsilon=eps,
        use_fast_variance=False,
        dtype=RESIDUAL_DTYPE,
        param_dtype=jnp.float32,
        rngs=rngs,
    )


class PatchEmbed(nnx.Module):
    """Non-overlapping p x p patches -> D-dim tokens, as a strided convolution."""

    def __init__(self, patch_size: int, in_chans: int, dim: int, dtype: Dtype, rngs: nnx.Rngs):
        fan_in = patch_size * patch_size * in_chans
        bound = 1.0 / np.sqrt(fan_in)
        self.patch_size = patch_size
        self.proj = nnx.Conv(
            in_chans,
            dim,
            kernel_size=(patch_size, patch_size),
            strides=(patch_size, patch_size),
            padding="VALID",
            # xavier-uniform of the kernel seen as a [D, C*p*p] matrix; the bias keeps the
            # convolution's default U(+-1/sqrt(fan_in)), as in the reference.
            kernel_init=nnx.initializers.variance_scaling(
                1.0, "fan_avg", "uniform", in_axis=(0, 1, 2), out_axis=-1
            ),
            bias_init=lambda key, shape, dtype=jnp.float32: jax.random.uniform(
                key, shape, dtype, -bound, bound
            ),
            dtype=dtype,
            param_dtype=jnp.float32,
            precision=matmul_precision(dtype),
            rngs=rngs,
        )

    def __call__(self, imgs_NxHxWxC: jax.Array) -> jax.Array:
        """Every patch -> [N, L, D] in the compute dtype, row-major."""
        return self.embed(patchify(imgs_NxHxWxC, self.patch_size))

    def embed(self, patches_NxKxP: jax.Array) -> jax.Array:
        """Patches from ``patchify`` (any subset) -> [N, K, D].

        A stride-p convolution without overlap is one matmul of each (row, col, channel) patch
        vector with the kernel flattened in the same order. As a matmul it runs faster on XLA:CPU
        than the convolution, and it can embed just the visible patches of a masked image.
        """
        kernel = self.proj.kernel[...]
        dtype = self.proj.dtype or patches_NxKxP.dtype
        x = jnp.einsum(
            "nkp,pd->nkd",
            patches_NxKxP.astype(dtype),
            kernel.reshape(-1, kernel.shape[-1]).astype(dtype),
            precision=self.proj.precision,
        )
        return x + self.proj.bias[...].astype(dtype)


# --------------------------------------------------------------------------- attention
#
# Which kernel computes softmax(q k^T) v, a setting of the model that is no part of its state
# (checkpoints and parameter names are the same whichever it is):
# - "auto": cuDNN's fused attention where it can run (a CUDA GPU with cuDNN, bfloat16 or float16
#   compute), chosen by the platform the model is lowered for; the XLA path everywhere else.
# - "cudnn": cuDNN's fused attention, and an AttentionError where it cannot be had.
# - "xla": the XLA path on every platform: the way around a card or driver on which cuDNN's fused
#   attention refuses (or fails), at the cost of its speed.

ATTENTION_CHOICES = ("auto", "cudnn", "xla")
_CUDNN_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


class AttentionError(ValueError):
    """An attention setting this model or this machine cannot run."""


def check_attention(attention: str, dtype: Dtype, platform: str | None = None) -> None:
    """AttentionError when attention ``attention`` cannot run with compute ``dtype``, nor (when
    given, as ``jax.default_backend()`` names it) on ``platform``; the model checks it without a
    platform, since it may be lowered for another one than the host's."""
    if attention not in ATTENTION_CHOICES:
        raise AttentionError(
            f"attention={attention}: must be one of {', '.join(ATTENTION_CHOICES)}"
        )
    if attention != "cudnn":
        return
    if platform is not None and platform != "gpu":
        raise AttentionError(
            f"attention=cudnn: cuDNN's fused attention needs a CUDA GPU, and jax runs on "
            f"{platform} here; use attention=auto or xla"
        )
    if jnp.dtype(dtype) not in _CUDNN_DTYPES:
        raise AttentionError(
            f"attention=cudnn: cuDNN's fused attention needs bfloat16 or float16 compute, not "
            f"{jnp.dtype(dtype).name}; use attention=auto or xla, or bfloat16 compute"
        )
    if not cudnn_attention_available():
        raise AttentionError(
            "attention=cudnn: cuDNN's fused attention is not available here (this jax has no "
            "CUDA plugin with cuDNN); use attention=auto or xla"
        )


class Attention(nnx.Module):
    def __init__(
        self, dim: int, num_heads: int, dtype: Dtype, rngs: nnx.Rngs, attention: str = "auto"
    ):
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.attention = attention  # ATTENTION_CHOICES; checked by the model that holds it
        self.qkv = linear(dim, 3 * dim, dtype, rngs)
        self.proj = linear(dim, dim, dtype, rngs)

    def __call__(self, x_NxTxD: jax.Array) -> jax.Array:
        n, t, d = x_NxTxD.shape
        h = self.num_heads
        # Fused features are [q (all heads) | k | v], each head's dims contiguous.
        qkv = self.qkv(x_NxTxD).reshape(n, t, 3, h, d // h)
        if self.attention == "cudnn":
            out = _cudnn_attention(qkv, self.scale)
        elif (
            self.attention == "auto" and qkv.dtype in _CUDNN_DTYPES and cudnn_attention_available()
        ):
            # The scale is bound, not passed: platform_dependent would turn it into a tracer.
            out = jax.lax.platform_dependent(
                qkv,
                cuda=functools.partial(_cudnn_attention, scale=self.scale),
                default=functools.partial(_xla_attention, scale=self.scale),
            )
        else:
            out = _xla_attention(qkv, self.scale)
        return self.proj(out)


def _xla_attention(qkv_NxTx3xHxC: jax.Array, scale: float) -> jax.Array:
    """softmax((q @ k^T) * scale) @ v -> [N, T, H*C], written for XLA (CPU, TPU, float32 GPU).

    Heads go before tokens, (n, h, t, c): XLA:CPU runs weights @ v about 4x slower in the
    (n, t, h, c) layout. (q @ k^T) * scale in the reference's order, the logits and the softmax
    in float32 whatever the compute dtype, then softmax(logits) @ v computed as
    (exp(logits - max) @ v) / sum: the normalisation is applied to the t x c output instead of
    the t x t weights, as torch's fused CPU attention (SDPA) does. Mathematically the same; it
    differs from normalise-then-multiply by about an ulp, and XLA:CPU runs it 2-4x faster. The
    max only keeps exp() in range: its exact gradient is zero, so it is cut from the backward,
    which then keeps one [N, H, T, T] float32 tensor per block instead of two.
    """
    n, t, _, h, c = qkv_NxTx3xHxC.shape
    q, k, v = qkv_NxTx3xHxC.transpose(2, 0, 3, 1, 4)
    precision = matmul_precision(qkv_NxTx3xHxC.dtype)  # the compute dtype, as qkv's output
    logits = jnp.einsum(
        "nhqc,nhkc->nhqk", q, k, preferred_element_type=jnp.float32, precision=precision
    )
    logits = logits * scale
    peak = jax.lax.stop_gradient(logits.max(axis=-1, keepdims=True))
    unnormalized = jnp.exp(logits - peak)
    out = jnp.einsum("nhqk,nhkc->nhqc", unnormalized.astype(v.dtype), v, precision=precision)
    out = out / unnormalized.sum(axis=-1, keepdims=True).astype(out.dtype)
    return out.transpose(0, 2, 1, 3).reshape(n, t, h * c)


def _cudnn_attention(qkv_NxTx3xHxC: jax.Array, scale: float) -> jax.Array:
    """The same attention through cuDNN's fused kernel (GPU, bfloat16/float16) -> [N, T, H*C].

    jax's cuDNN training path refuses odd sequence lengths (MAE's are 1 + kept patches and
    1 + all patches: 50, 197, 65, 257), so the tokens are padded to a multiple of 8 and the
    padding is masked out as keys (``key_value_seq_lengths``); padded queries are dropped.
    """
    n, t, _, h, c = qkv_NxTx3xHxC.shape
    padded = -(-t // 8) * 8
    qkv = jnp.pad(qkv_NxTx3xHxC, ((0, 0), (0, padded - t), (0, 0), (0, 0), (0, 0)))
    q, k, v = (qkv[:, :, i] for i in range(3))  # [N, T, H, C] each, cuDNN's layout
    lengths = None if padded == t else jnp.full((n,), t, jnp.int32)
    out = jax.nn.dot_product_attention(
        q,
        k,
        v,
        scale=scale,
        query_seq_lengths=lengths,
        key_value_seq_lengths=lengths,
        implementation="cudnn",
    )
    return out[:, :t].reshape(n, t, h * c)


def cudnn_attention_available() -> bool:
    """Whether cuDNN's fused attention can be traced here (a CUDA jaxlib plugin with cuDNN).

    ``jax.nn.dot_product_attention(implementation="cudnn")`` asks for the cuDNN version while it
    traces, on any platform; without the CUDA plugin it raises, so the cuDNN branch is only
    built where it can be.
    """
    from jax._src.cudnn import fused_attention_stablehlo

    try:
        fused_attention_stablehlo.check_cudnn_version()
    except RuntimeError:
        return False
    return True


class Mlp(nnx.Module):
    def __init__(self, dim: int, hidden: int, dtype: Dtype, rngs: nnx.Rngs):
        self.fc1 = linear(dim, hidden, dtype, rngs)
        self.fc2 = linear(hidden, dim, dtype, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(gelu(self.fc1(x)))


def gelu(x: jax.Array) -> jax.Array:
    """Exact GELU written as torch writes it, x/2 * (1 + erf(x/sqrt(2))).

    ``jax.nn.gelu(approximate=False)`` goes through erfc(-x/sqrt(2)) instead: the same function,
    but XLA:CPU evaluates erfc about 3x slower than erf, and erf rounds like torch more often.
    """
    return 0.5 * x * (1 + jax.lax.erf(x * np.asarray(np.sqrt(0.5), x.dtype)))


class Block(nnx.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x)).

    The residual stream x stays float32 (``RESIDUAL_DTYPE``); the branches compute in ``dtype``
    and their outputs are added to it in float32.
    """

    def __init__(
        self, dim, num_heads, mlp_ratio, eps, dtype: Dtype, rngs: nnx.Rngs, attention: str = "auto"
    ):
        self.norm1 = layer_norm(dim, eps, rngs)
        self.attn = Attention(dim, num_heads, dtype, rngs, attention)
        self.norm2 = layer_norm(dim, eps, rngs)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), dtype, rngs)

    def __call__(self, x_NxTxD: jax.Array) -> jax.Array:
        x = materialized_gradient(x_NxTxD.astype(RESIDUAL_DTYPE))
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


@jax.custom_vjp
def materialized_gradient(x: jax.Array) -> jax.Array:
    """Identity, forward and backward; XLA:CPU computes the gradient that reaches it exactly once.

    Each Block starts with it. The gradient of the residual stream is a long elementwise sum (one
    LayerNorm-backward term per later block); without a buffer boundary XLA:CPU fuses that sum
    into every consumer, the transposes for the weight gradients included, so each of them
    recomputes it and the backward does work that grows with depth squared. Measured on 2 CPU
    cores, mae_vit_base_patch16 at batch 8: 2.30 -> 1.84-1.91 s for loss and gradients, with
    identical gradients.
    """
    return x


def _materialized_gradient_fwd(x):
    return x, None


def _materialized_gradient_bwd(_, g):
    # Only XLA:CPU needs the boundary. On GPU a conditional copies its predicate to the host and
    # stalls the stream once per block, so elsewhere the gradient passes straight through. The
    # choice is made by the platform the step is lowered for, so ahead-of-time lowering for
    # another platform is right too.
    return (jax.lax.platform_dependent(g, cpu=_opaque_identity, default=lambda t: t),)


def _opaque_identity(g: jax.Array) -> jax.Array:
    # XLA:CPU drops optimization barriers, but a conditional on a value known only at run time
    # is opaque to fusion: later fusions read its result buffer instead of recomputing it. Both
    # branches give g back (the rare one, taken only when g's first element is NaN, adds 0.0,
    # which can only turn -0.0 into 0.0; branches that were identical would be folded away).
    first = g.reshape(-1)[0]
    return jax.lax.cond(first != first, lambda t: t + 0.0, lambda t: t, g)


materialized_gradient.defvjp(_materialized_gradient_fwd, _materialized_gradient_bwd)


# --------------------------------------------------------------------------- the model

# Activation checkpointing of each transformer block, by what the backward may keep from the
# forward: "none" keeps everything; "block" keeps each block's input only and recomputes the
# block in the backward (about one more forward pass); "dots" keeps the outputs of the linear
# layers (matmuls without batch dimensions) and recomputes LayerNorm, GELU and attention.
REMAT_POLICIES: dict[str, Any] = {
    "none": None,
    "block": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@dataclasses.dataclass
class ForwardOutput:
    """Everything one forward pass computes; ``stages`` is filled only when asked for."""

    loss: jax.Array  # scalar
    pred: jax.Array  # [N, L, P]
    mask: jax.Array  # [N, L], 1 = removed
    latent: (
        jax.Array
    )  # [N, 1 + K, D], encoder output after its final norm, kept tokens in noise order
    ids_restore: jax.Array  # [N, L]
    stages: dict[str, jax.Array] | None = None


jax.tree_util.register_dataclass(
    ForwardOutput,
    data_fields=["loss", "pred", "mask", "latent", "ids_restore", "stages"],
    meta_fields=[],
)


class MaskedAutoencoderViT(nnx.Module):
    """MAE: a ViT encoder over the visible patches and a light decoder that predicts the removed ones.

    ``with_decoder=False`` builds the encoder alone (the layout of the released encoder-only
    pretraining checkpoints); reconstruction and the loss then raise ``MissingDecoderError``.
    ``attention`` picks the attention kernel (``ATTENTION_CHOICES``; "cudnn" raises
    ``AttentionError`` where it cannot run).
    """

    def __init__(
        self,
        config: MAEConfig,
        *,
        rngs: nnx.Rngs,
        with_decoder: bool = True,
        dtype: Dtype = jnp.float32,
        remat: str = "none",
        attention: str = "auto",
    ):
        c = config
        if remat not in REMAT_POLICIES:
            raise ValueError(f"remat must be one of {', '.join(REMAT_POLICIES)}, got {remat!r}")
        check_attention(attention, dtype)
        self.config = c
        self.with_decoder = with_decoder
        self.dtype = dtype
        self.remat = remat
        self.attention = attention
        normal = nnx.initializers.normal(0.02)

        self.cls_token = nnx.Param(normal(rngs.params(), (1, 1, c.embed_dim), jnp.float32))
        self.pos_embed = FixedEmbedding(jnp.asarray(sincos_2d(c.embed_dim, c.grid_size))[None])
        self.patch_embed = PatchEmbed(c.patch_size, c.in_chans, c.embed_dim, dtype, rngs)
        self.blocks = nnx.List(
            [
                Block(
                    c.embed_dim, c.num_heads, c.mlp_ratio, c.layer_norm_eps, dtype, rngs, attention
                )
                for _ in range(c.depth)
            ]
        )
        self.norm = layer_norm(c.embed_dim, c.layer_norm_eps, rngs)
        if not with_decoder:
            return
        dd = c.decoder_embed_dim
        self.mask_token = nnx.Param(normal(rngs.params(), (1, 1, dd), jnp.float32))
        self.decoder_pos_embed = FixedEmbedding(jnp.asarray(sincos_2d(dd, c.grid_size))[None])
        self.decoder_embed = linear(c.embed_dim, dd, dtype, rngs)
        self.decoder_blocks = nnx.List(
            [
                Block(
                    dd, c.decoder_num_heads, c.mlp_ratio, c.layer_norm_eps, dtype, rngs, attention
                )
                for _ in range(c.decoder_depth)
            ]
        )
        self.decoder_norm = layer_norm(dd, c.layer_norm_eps, rngs)
        self.decoder_pred = linear(dd, c.patch_dim, dtype, rngs)

    def _run_block(self, block: Block, x_NxTxD: jax.Array) -> jax.Array:
        if self.remat == "none":
            return block(x_NxTxD)
        policy = REMAT_POLICIES[self.remat]
        return nnx.remat(lambda b, x: b(x), policy=policy)(block, x_NxTxD)

    # ----------------------------------------------------------------- encoder

    def _check_images(self, imgs: jax.Array) -> None:
        c = self.config
        want = (c.img_size, c.img_size, c.in_chans)
        if imgs.ndim != 4 or tuple(imgs.shape[1:]) != want:
            raise ValueError(
                f"expected images of shape [N, {c.img_size}, {c.img_size}, {c.in_chans}] (NHWC) "
                f"for this model (patch grid {c.grid_size}x{c.grid_size} of {c.patch_size}px), "
                f"got {tuple(imgs.shape)}"
            )

    def _embed_patches(self, imgs_NxHxWxC: jax.Array, stages: dict | None) -> jax.Array:
        self._check_images(imgs_NxHxWxC)
        x = self.patch_embed(imgs_NxHxWxC.astype(self.dtype))
        if stages is not None:
            stages["patch_embed"] = x
        return x.astype(RESIDUAL_DTYPE) + self.pos_embed[...][:, 1:, :]

    def _embed_visible(self, imgs_NxHxWxC: jax.Array, ids_keep_NxK: jax.Array) -> jax.Array:
        """The kept patches only, embedded with their position: the same function as embedding
        every patch and then keeping some (each patch's embedding is independent), at a quarter
        of the cost when three quarters are masked."""
        self._check_images(imgs_NxHxWxC)
        patches = patchify(imgs_NxHxWxC.astype(self.dtype), self.config.patch_size)
        kept = jnp.take_along_axis(patches, ids_keep_NxK[:, :, None], axis=1)
        x = self.patch_embed.embed(kept)
        pos = jnp.take_along_axis(self.pos_embed[...][0, 1:, :][None], ids_keep_NxK[:, :, None], 1)
        return x.astype(RESIDUAL_DTYPE) + pos

    def _run_encoder(self, x_NxKxD: jax.Array, stages: dict | None) -> jax.Array:
        cls = (self.cls_token[...] + self.pos_embed[...][:, :1, :]).astype(x_NxKxD.dtype)
        x = jnp.concatenate(
            [jnp.broadcast_to(cls, (x_NxKxD.shape[0], 1, cls.shape[-1])), x_NxKxD], 1
        )
        if stages is not None:
            stages["enc_in"] = x
        outs = []
        for block in self.blocks:
            x = self._run_block(block, x)
            outs.append(x)
        if stages is not None:
            stages["enc_blocks"] = jnp.stack(outs)
        return self.norm(x)

    def forward_encoder(
        self, imgs_NxHxWxC: jax.Array, masks: masking_lib.Masking, stages: dict | None = None
    ) -> jax.Array:
        """Encode the visible patches only -> latent [N, 1 + K, D] (cls first, then noise order)."""
        if stages is None:
            x = self._embed_visible(imgs_NxHxWxC, masks.ids_keep)
        else:  # the official order (embed all, then keep), so every stage can be recorded
            x = self._embed_patches(imgs_NxHxWxC, stages)
            x = jnp.take_along_axis(x, masks.ids_keep[:, :, None], axis=1)
            stages["x_masked"] = x
        return self._run_encoder(x, stages)

    def encode(self, imgs_NxHxWxC: jax.Array) -> jax.Array:
        """All tokens without masking -> [N, 1 + L, D]: cls, then the patches in spatial order."""
        return self._run_encoder(self._embed_patches(imgs_NxHxWxC, None), None)

    # ----------------------------------------------------------------- decoder and loss

    def _require_decoder(self) -> None:
        if not self.with_decoder:
            raise MissingDecoderError(
                "this model has no decoder weights (an encoder-only checkpoint such as the official "
                "mae_pretrain_vit_*.pth), so it cannot reconstruct images or compute the MAE loss; "
                "use mae_visualize_vit_*.pth (pixel targets) or mae_pretrain_vit_*_full.pth "
                "(normalized-pixel targets), which hold the decoder"
            )

    def forward_decoder(
        self, latent_NxTxD: jax.Array, ids_restore_NxL: jax.Array, stages: dict | None = None
    ) -> jax.Array:
        """Latent [N, 1 + K, D] -> predicted patches [N, L, P] in spatial order."""
        self._require_decoder()
        x = self.decoder_embed(latent_NxTxD).astype(RESIDUAL_DTYPE)
        if stages is not None:
            stages["dec_embed"] = x
        n, length = ids_restore_NxL.shape
        visible = x[:, 1:, :]
        mask_tokens = jnp.broadcast_to(
            self.mask_token[...].astype(x.dtype), (n, length - visible.shape[1], x.shape[-1])
        )
        x_ = jnp.concatenate([visible, mask_tokens], axis=1)
        x_ = jnp.take_along_axis(x_, ids_restore_NxL[:, :, None], axis=1)
        x = jnp.concatenate([x[:, :1, :], x_], axis=1)
        x = x + self.decoder_pos_embed[...]
        if stages is not None:
            stages["dec_in"] = x
        outs = []
        for block in self.decoder_blocks:
            x = self._run_block(block, x)
            outs.append(x)
        x = self.decoder_norm(x)
        if stages is not None:
            stages["dec_blocks"] = jnp.stack(outs)
            stages["dec_norm"] = x
        return self.decoder_pred(x)[:, 1:, :]

    def patch_targets(self, imgs_NxHxWxC: jax.Array) -> jax.Array:
        """The loss target [N, L, P]: patches, normalized per patch when norm_pix_loss is on."""
        target = patchify(imgs_NxHxWxC.astype(jnp.float32), self.config.patch_size)
        if self.config.norm_pix_loss:
            mean = target.mean(axis=-1, keepdims=True)
            var = target.var(axis=-1, keepdims=True, ddof=1)  # unbiased, as torch's .var()
            target = (target - mean) / (var + 1e-6) ** 0.5
        return target

    def forward_loss(
        self, imgs_NxHxWxC: jax.Array, pred_NxLxP: jax.Array, mask_NxL: jax.Array
    ) -> jax.Array:
        """Mean squared error over the removed patches only, pooled over the batch."""
        target = self.patch_targets(imgs_NxHxWxC)
        per_patch = ((pred_NxLxP.astype(jnp.float32) - target) ** 2).mean(axis=-1)
        return (per_patch * mask_NxL).sum() / mask_NxL.sum()

    # ----------------------------------------------------------------- full forward

    def forward_full(
        self,
        imgs_NxHxWxC: jax.Array,
        *,
        key: jax.Array | None = None,
        noise: jax.Array | None = None,
        mask_ratio: float = 0.75,
        capture_stages: bool = False,
    ) -> ForwardOutput:
        """The whole pass with every intermediate; masks come from ``noise`` [N, L] or from ``key``."""
        self._require_decoder()
        n = imgs_NxHxWxC.shape[0]
        length = self.config.num_patches
        if (key is None) == (noise is None):
            raise ValueError("pass exactly one of key= (a PRNG key) or noise= (an [N, L] array)")
        if noise is None:
            noise = masking_lib.random_noise(key, n, length)
        elif tuple(noise.shape) != (n, length):
            raise ValueError(f"noise must have shape [N, L] = [{n}, {length}], got {noise.shape}")
        masks = masking_lib.masking_from_noise(noise, mask_ratio)
        stages = {} if capture_stages else None
        latent = self.forward_encoder(imgs_NxHxWxC, masks, stages)
        pred = self.forward_decoder(latent, masks.ids_restore, stages)
        loss = self.forward_loss(imgs_NxHxWxC, pred, masks.mask)
        return ForwardOutput(loss, pred, masks.mask, latent, masks.ids_restore, stages)

    def __call__(
        self,
        imgs_NxHxWxC: jax.Array,
        *,
        key: jax.Array | None = None,
        noise: jax.Array | None = None,
        mask_ratio: float = 0.75,
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """imgs [N, H, W, 3] -> (loss, pred [N, L, p*p*3], mask [N, L] with 1 = removed)."""
        out = self.forward_full(imgs_NxHxWxC, key=key, noise=noise, mask_ratio=mask_ratio)
        return out.loss, out.pred, out.mask
