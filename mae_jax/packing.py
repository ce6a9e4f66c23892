"""A tree of arrays packed into a few flat buffers, one per group, and back.

The pmapped pretraining step takes and returns the parameters and the optimizer state. Called with
one buffer per parameter (759 for ViT-B, 1,479 for ViT-H, three times that with AdamW's moments),
the host spends most of a call taking the buffers apart and wrapping the new ones, and can fall
behind the device (``bench/bench_host.py``). Packed, the same values travel as a handful of 1-D
buffers: the step unpacks them with static slices and packs its gradients once, so the optimizer
runs on flat buffers too. Where the step computes in bfloat16 (TPU), XLA mostly fuses the slices
into the casts to bfloat16; XLA:CPU copies the float32 slices (``bench/bench_packing.py``).

Leaves are grouped by a label (the weight-decay group for pretraining), so that a per-group
setting of the optimizer becomes one flag per buffer. Within a group the leaves keep the tree's
flattening order. Checkpoints hold the unpacked tree: ``unpack``/``unpack_state`` on the host
give exactly the leaves the tree had, and ``pack``/``pack_state`` take them back.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class _Slot:
    group: str
    start: int
    shape: tuple[int, ...]


class Packing:
    """Where every leaf of ``like`` lives in its group's flat buffer.

    ``labels`` is a tree of the same structure as ``like`` holding a group name (str) per leaf.
    The leaves of one group must share a dtype. The packed form is a dict ``{group: 1-D array}``
    with the groups in sorted order.
    """

    def __init__(self, like: Any, labels: Any):
        # ``like``'s leaves may be arrays or only their shapes (jax.ShapeDtypeStruct).
        leaves, self.treedef = jax.tree.flatten(like)
        names = self.treedef.flatten_up_to(labels)
        sizes: dict[str, int] = {}
        dtypes: dict[str, np.dtype] = {}
        slots = []
        for leaf, group in zip(leaves, names, strict=True):
            if not isinstance(group, str):
                raise TypeError(f"group labels must be strings, got {group!r}")
            dtype = np.dtype(leaf.dtype)
            if dtypes.setdefault(group, dtype) != dtype:
                raise ValueError(f"group {group!r} mixes {dtypes[group]} and {dtype} leaves")
            shape = tuple(leaf.shape)
            slots.append(_Slot(group, sizes.get(group, 0), shape))
            sizes[group] = sizes.get(group, 0) + math.prod(shape)
        self.slots = tuple(slots)
        self.sizes = dict(sorted(sizes.items()))
        self.dtypes = {group: dtypes[group] for group in self.sizes}
        self.packed_treedef = jax.tree.structure(dict.fromkeys(self.sizes, 0))

    @property
    def groups(self) -> tuple[str, ...]:
        return tuple(self.sizes)

    def pack(self, tree: Any) -> dict[str, Any]:
        """``tree`` (the structure of ``like``) -> ``{group: flat buffer}``: NumPy arrays for a
        tree of host arrays, jax arrays inside a traced function."""
        leaves = self.treedef.flatten_up_to(tree)
        xp = np if all(isinstance(x, np.ndarray | np.generic) for x in leaves) else jnp
        parts: dict[str, list] = {group: [] for group in self.sizes}
        for slot, leaf in zip(self.slots, leaves, strict=True):
            if tuple(np.shape(leaf)) != slot.shape:
                raise ValueError(f"leaf of shape {np.shape(leaf)} where {slot.shape} was packed")
            parts[slot.group].append(xp.reshape(leaf, -1).astype(self.dtypes[slot.group]))
        return {group: xp.concatenate(pieces) for group, pieces in parts.items()}

    def unpack(self, packed: dict[str, Any]) -> Any:
        """``{group: flat buffer}`` -> the tree, every leaf a static slice of its buffer (views
        of the buffer for NumPy arrays)."""
        leaves = [
            packed[slot.group][slot.start : slot.start + math.prod(slot.shape)].reshape(slot.shape)
            for slot in self.slots
        ]
        return self.treedef.unflatten(leaves)

    # An optimizer state holds trees shaped like the parameters (AdamW's moments) beside other
    # leaves (its step count): those trees are packed and unpacked, the rest kept as they are.

    def _is_tree(self, x: Any) -> bool:
        return jax.tree.structure(x) == self.treedef

    def _is_packed(self, x: Any) -> bool:
        return isinstance(x, dict) and jax.tree.structure(x) == self.packed_treedef

    def pack_state(self, state: Any) -> Any:
        """An optimizer state of the unpacked tree -> the state of the packed one."""
        return jax.tree.map(
            lambda x: self.pack(x) if self._is_tree(x) else x, state, is_leaf=self._is_tree
        )

    def unpack_state(self, state: Any) -> Any:
        """An optimizer state of the packed tree -> the state of the unpacked one."""
        return jax.tree.map(
            lambda x: self.unpack(x) if self._is_packed(x) else x, state, is_leaf=self._is_packed
        )


class NoPacking:
    """The tree as it is, one buffer per leaf: ``Packing``'s methods as identities."""

    def pack(self, tree: Any) -> Any:
        return tree

    def unpack(self, packed: Any) -> Any:
        return packed

    def pack_state(self, state: Any) -> Any:
        return state

    def unpack_state(self, state: Any) -> Any:
        return state


NO_PACKING = NoPacking()
