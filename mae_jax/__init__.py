"""mae-jax: Masked Autoencoders in JAX/Flax, faithful to the official PyTorch code and weights."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax.numpy as jnp
from flax import nnx

from mae_jax.config import PRESETS, MAEConfig, get_config
from mae_jax.masking import masking_from_noise, random_masking, step_device_key
from mae_jax.model import MaskedAutoencoderViT, MissingDecoderError, patchify, unpatchify

__version__ = "0.1.0"


def create_model(
    name: str | MAEConfig,
    *,
    rngs: nnx.Rngs | None = None,
    with_decoder: bool = True,
    dtype: Any = jnp.float32,
    **overrides: Any,
) -> MaskedAutoencoderViT:
    """A freshly initialized MAE from a preset name (e.g. ``"mae_vit_large_patch16"``) or a config."""
    config = (
        name.replace(**overrides) if isinstance(name, MAEConfig) else get_config(name, **overrides)
    )
    return MaskedAutoencoderViT(
        config,
        rngs=rngs if rngs is not None else nnx.Rngs(0),
        with_decoder=with_decoder,
        dtype=dtype,
    )


def load_pretrained(path: str | os.PathLike, *, dtype: Any = jnp.float32) -> nnx.Module:
    """The model in a mae-jax checkpoint directory (from the converter or ``mae-jax export``), or
    the latest checkpoint of a ``mae-jax pretrain`` run directory."""
    from mae_jax.checkpoint import METADATA_FILE, load_model

    path = Path(path)
    if not (path / METADATA_FILE).exists() and (path / "checkpoints").is_dir():
        from mae_jax.train import load_trained_model

        return load_trained_model(path, dtype=dtype)
    return load_model(path, dtype=dtype)


__all__ = [
    "PRESETS",
    "MAEConfig",
    "MaskedAutoencoderViT",
    "MissingDecoderError",
    "create_model",
    "get_config",
    "load_pretrained",
    "masking_from_noise",
    "patchify",
    "random_masking",
    "step_device_key",
    "unpatchify",
]
