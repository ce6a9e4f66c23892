"""mae-jax: Masked Autoencoders in JAX/Flax, faithful to the official PyTorch code and weights."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import jax.numpy as jnp
from flax import nnx

from mae_jax.classifier import (
    NotAClassifierError,
    VisionTransformer,
    init_classifier_from_mae,
    interpolate_pos_embed,
)
from mae_jax.config import PRESETS, VIT_PRESETS, MAEConfig, ViTConfig, get_config, get_vit_config
from mae_jax.masking import masking_from_noise, random_masking, step_device_key
from mae_jax.model import MaskedAutoencoderViT, MissingDecoderError, patchify, unpatchify

if TYPE_CHECKING:
    from etils import epath

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


def create_classifier(
    name: str | ViTConfig,
    *,
    rngs: nnx.Rngs | None = None,
    dtype: Any = jnp.float32,
    **overrides: Any,
) -> VisionTransformer:
    """A freshly initialized ViT classifier from a preset name (e.g. ``"vit_base_patch16"``) or a
    config; start one from a pretrained MAE with ``init_classifier_from_mae``."""
    config = (
        name.replace(**overrides)
        if isinstance(name, ViTConfig)
        else get_vit_config(name, **overrides)
    )
    return VisionTransformer(config, rngs=rngs if rngs is not None else nnx.Rngs(0), dtype=dtype)


def checkpoint_dir(path: str | os.PathLike) -> epath.Path | None:
    """The checkpoint directory ``path`` (local or a bucket URL) names: itself, or the ``model/``
    a finished fine-tuning run exported; None for a pretraining run directory (whose model lives
    in its Orbax steps)."""
    from mae_jax._files import naming, run_path
    from mae_jax.checkpoint import METADATA_FILE

    path = run_path(path)
    with naming(path):
        if (path / METADATA_FILE).exists() or not (path / "checkpoints").is_dir():
            return path
        if (path / "model" / METADATA_FILE).exists():
            return path / "model"
    return None


def load_pretrained(path: str | os.PathLike, *, dtype: Any = jnp.float32) -> nnx.Module:
    """The model in a mae-jax checkpoint directory (from the converter or ``mae-jax export``), the
    classifier a finished fine-tuning run exported, or the latest checkpoint of a ``mae-jax
    pretrain`` run directory: an MAE (``MaskedAutoencoderViT``, with or without decoder) or a
    fine-tuned classifier (``VisionTransformer``). ``path`` may be a bucket URL (``gs://...``).
    """
    from mae_jax._files import naming
    from mae_jax.checkpoint import load_model

    with naming(path):
        directory = checkpoint_dir(path)
        if directory is None:
            from mae_jax.train import load_trained_model

            return load_trained_model(path, dtype=dtype)
        return load_model(directory, dtype=dtype)


__all__ = [
    "PRESETS",
    "VIT_PRESETS",
    "MAEConfig",
    "MaskedAutoencoderViT",
    "MissingDecoderError",
    "NotAClassifierError",
    "ViTConfig",
    "VisionTransformer",
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
