"""What a path holds: ``load_pretrained``, the model a path names, whichever kind of directory it
is (a converted or exported checkpoint, a finished fine-tuning run, a pretraining run's latest
step), and ``load_trained_model``, the model of a pretraining run's newest good checkpoint."""

from __future__ import annotations

import json
import os
from typing import Any

import jax.numpy as jnp
from flax import nnx

from mae_jax._files import naming, run_path
from mae_jax.checkpoint import checkpoint_dir, load_model
from mae_jax.model import MaskedAutoencoderViT
from mae_jax.pretrain_step import split_model
from mae_jax.run_checkpoints import Checkpoints
from mae_jax.run_config import PretrainConfig, TrainingError


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
    with naming(path):
        directory = checkpoint_dir(path)
        if directory is None:
            return load_trained_model(path, dtype=dtype, attention=attention)
        return load_model(directory, dtype=dtype, attention=attention)


def load_trained_model(
    workdir: str | os.PathLike, dtype: Any = jnp.float32, attention: str = "auto"
) -> MaskedAutoencoderViT:
    """The model of the newest checkpoint of a pretraining run directory that restores and
    matches its checksums (``Checkpoints.restore_latest``: a damaged newer step is skipped with
    one printed line)."""
    workdir = run_path(workdir)
    config = PretrainConfig.from_dict(json.loads((workdir / "config.json").read_text()))
    model = MaskedAutoencoderViT(
        config.model_config(), rngs=nnx.Rngs(0), dtype=dtype, attention=attention
    )
    graphdef, params, fixed = split_model(model)
    ckpts = Checkpoints(workdir, keep=config.keep_checkpoints)
    try:
        found = ckpts.restore_latest({"params": params, "fixed": fixed})
    finally:
        ckpts.close()
    if found is None:
        raise TrainingError(f"{workdir}: the run has no checkpoint yet")
    return nnx.merge(graphdef, params, fixed)
