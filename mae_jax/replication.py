"""Replication over the local devices in ``jax.pmap``'s layout: the axis name, copies of a state
on every device and back, and batches split one slice per device.

The one axis name ``AXIS`` is shared by every pmapped step and by ``replicate``: arrays laid out by
a pmap of the same axis are taken by the step without resharding or a second compilation.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

AXIS = "devices"  # the pmap axis name


class ReplicationError(ValueError):
    """A batch that does not split over the devices."""


def local_axis_indices(n_local: int) -> np.ndarray:
    """The pmap axis indices of this host's devices (0..n-1 on one host)."""
    if jax.process_count() == 1:
        return np.arange(n_local)
    index = jax.pmap(lambda _: jax.lax.axis_index(AXIS), axis_name=AXIS)(np.zeros(n_local))
    return np.asarray(index)


def replicate(tree: Any, n: int) -> Any:
    """``n`` copies of every leaf on a new leading axis, copy i placed on local device i."""
    # A pmapped identity on the step's axis name lays the copies out exactly as the train step's
    # outputs are laid out: the first step's donated arguments need no resharding, and the
    # step's second call finds the first one's compilation (one compile per start). A tree
    # without leaves (fine-tuning has no batch statistics) stays as it is: with several
    # processes, pmap fails on no outputs.
    if not jax.tree.leaves(tree):
        return tree
    return jax.pmap(lambda _, t: t, in_axes=(0, None), axis_name=AXIS)(np.zeros(n), tree)


def distribute(tree: Any) -> Any:
    """Leaves [n, ...] on the host -> slice i on local device i, laid out as ``replicate``'s
    copies are (and for the same reason: one compile per start)."""
    if not jax.tree.leaves(tree):
        return tree
    return jax.pmap(lambda t: t, axis_name=AXIS)(tree)


def unreplicate(tree: Any) -> Any:
    """One device's copy of a replicated tree, as host numpy arrays.

    Read from the array's first local shard: indexing (``x[0]``) would compile a gather for
    every distinct leaf shape at the first save.
    """

    def first(x: Any) -> np.ndarray:
        if isinstance(x, jax.Array):
            return np.asarray(x.addressable_shards[0].data)[0]
        return np.asarray(x[0])

    return jax.tree.map(first, tree)


def shard_batch(images_BxHxWxC: np.ndarray, n: int) -> np.ndarray:
    """[n * b, H, W, C] -> [n, b, H, W, C]: one slice per local device."""
    if images_BxHxWxC.shape[0] % n:
        raise ReplicationError(
            f"batch of {images_BxHxWxC.shape[0]} does not split over {n} devices"
        )
    return images_BxHxWxC.reshape(n, -1, *images_BxHxWxC.shape[1:])


# --------------------------------------------------------------------------- state and checkpoints
