"""``load_pretrained``: the model a path names, whichever kind of directory it is (a converted or
exported checkpoint, a finished fine-tuning run, a pretraining run's latest step)."""

from __future__ import annotations

import os
from typing import Any

import jax.numpy as jnp
from flax import nnx

from mae_jax._files import naming


def load_pretrained(
    path: str | os.PathLike, *, dtype: Any = jnp.float32, attention: str = "auto"
) -> nnx.Module:
    """The model in a mae-jax checkpoint directory (from the converter or ``mae-jax export``), the
    classifier a finished fine-tuning run exported, or the latest checkpoint of a ``mae-jax
    pretrain`` run directory: an MAE (``MaskedAutoencoderViT``, with or without decoder) or a
    fine-tuned classifier (``VisionTransformer``). ``path`` may be a bucket URL (``gs://...``).

    ``dtype`` is the compute dtype (float32: full float32 matmuls on every platform; bfloat16:
    torch autocast's rules). ``attention`` the attention kernel: "auto" (cuDNN's fused attention
    on a CUDA GPU in bfloat16, else XLA's), "cudnn" (that or an error) or "xla" (never cuDNN).
    """
    from mae_jax.checkpoint import checkpoint_dir, load_model

    with naming(path):
        directory = checkpoint_dir(path)
        if directory is None:
            from mae_jax.train import load_trained_model

            return load_trained_model(path, dtype=dtype, attention=attention)
        return load_model(directory, dtype=dtype, attention=attention)
