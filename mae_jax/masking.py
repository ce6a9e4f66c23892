"""Random masking as the official MAE does it (argsort of uniform noise), driven by JAX PRNG keys.

All functions are pure. The mask is 1 for removed patches and 0 for kept ones, in spatial order.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Masking(NamedTuple):
    ids_keep: jax.Array  # [N, len_keep] int32: indices of kept patches, in noise order
    ids_restore: jax.Array  # [N, L] int32: inverse of the noise-sorting permutation
    mask: jax.Array  # [N, L] float32: 1 = removed, 0 = kept


def num_kept(num_patches: int, mask_ratio: float) -> int:
    """Number of visible patches: Python float truncation, exactly as the reference (19 for 196 at 0.9)."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    return int(num_patches * (1 - mask_ratio))


def masking_from_noise(noise_NxL: jax.Array, mask_ratio: float) -> Masking:
    """Keep the len_keep patches with the smallest noise; noise [N, L] -> Masking."""
    n, length = noise_NxL.shape
    len_keep = num_kept(length, mask_ratio)
    ids_shuffle = jnp.argsort(noise_NxL, axis=1).astype(jnp.int32)
    ids_restore = jnp.argsort(ids_shuffle, axis=1).astype(jnp.int32)
    removed_in_noise_order = (jnp.arange(length) >= len_keep).astype(jnp.float32)
    mask = jnp.take_along_axis(
        jnp.broadcast_to(removed_in_noise_order, (n, length)), ids_restore, axis=1
    )
    return Masking(ids_shuffle[:, :len_keep], ids_restore, mask)


def random_noise(key: jax.Array, batch: int, num_patches: int) -> jax.Array:
    """Uniform [0, 1) float32 noise of shape [batch, num_patches]."""
    return jax.random.uniform(key, (batch, num_patches), dtype=jnp.float32)


def random_masking(key: jax.Array, batch: int, num_patches: int, mask_ratio: float) -> Masking:
    """A fresh per-sample random mask drawn from ``key``."""
    return masking_from_noise(random_noise(key, batch, num_patches), mask_ratio)


def step_device_key(
    key: jax.Array, step: jax.Array | int, axis_name: str | None = None
) -> jax.Array:
    """A key distinct for every step and, inside pmap over ``axis_name``, for every device.

    Without this, every replica would draw the same masks for its shard.
    """
    key = jax.random.fold_in(key, step)
    if axis_name is not None:
        key = jax.random.fold_in(key, jax.lax.axis_index(axis_name))
    return key
