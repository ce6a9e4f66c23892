"""mae-jax: Masked Autoencoders in JAX/Flax, faithful to the official PyTorch code and weights."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import nnx

from mae_jax.checkpoint import checkpoint_dir
from mae_jax.classifier import (
    NotAClassifierError,
    VisionTransformer,
    init_classifier_from_mae,
    interpolate_pos_embed,
)
from mae_jax.config import PRESETS, VIT_PRESETS, MAEConfig, ViTConfig, get_config, get_vit_config
from mae_jax.loading import load_pretrained
from mae_jax.masking import masking_from_noise, random_masking, step_device_key
from mae_jax.model import MaskedAutoencoderViT, MissingDecoderError, patchify, unpatchify

__version__ = "0.1.0"


def create_model(
    name: str | MAEConfig,
    *,
    rngs: nnx.Rngs | None = None,
    with_decoder: bool = True,
    dtype: Any = jnp.float32,
    attention: str = "auto",
    **overrides: Any,
) -> MaskedAutoencoderViT:
    """A freshly initialized MAE from a preset name (e.g. ``"mae_vit_large_patch16"``) or a config.

    ``attention``: "auto" (cuDNN's fused attention on a CUDA GPU in bfloat16, else XLA's),
    "cudnn" (that or an error) or "xla" (never cuDNN: the way around a cuDNN refusal)."""
    config = (
        name.replace(**overrides) if isinstance(name, MAEConfig) else get_config(name, **overrides)
    )
    return MaskedAutoencoderViT(
        config,
        rngs=rngs if rngs is not None else nnx.Rngs(0),
        with_decoder=with_decoder,
        dtype=dtype,
        attention=attention,
    )


def create_classifier(
    name: str | ViTConfig,
    *,
    rngs: nnx.Rngs | None = None,
    dtype: Any = jnp.float32,
    attention: str = "auto",
    **overrides: Any,
) -> VisionTransformer:
    """A freshly initialized ViT classifier from a preset name (e.g. ``"vit_base_patch16"``) or a
    config (``attention`` as for ``create_model``); start one from a pretrained MAE with
    ``init_classifier_from_mae``."""
    config = (
        name.replace(**overrides)
        if isinstance(name, ViTConfig)
        else get_vit_config(name, **overrides)
    )
    return VisionTransformer(
        config, rngs=rngs if rngs is not None else nnx.Rngs(0), dtype=dtype, attention=attention
    )


__all__ = [
    "PRESETS",
    "VIT_PRESETS",
    "MAEConfig",
    "MaskedAutoencoderViT",
    "MissingDecoderError",
    "NotAClassifierError",
    "ViTConfig",
    "VisionTransformer",
    "checkpoint_dir",
    "create_classifier",
    "create_model",
    "get_config",
    "get_vit_config",
    "init_classifier_from_mae",
    "interpolate_pos_embed",
    "load_pretrained",
    "masking_from_noise",
    "patchify",
    "random_masking",
    "step_device_key",
    "unpatchify",
]
