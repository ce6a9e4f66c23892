"""A run's checkpoints: Orbax's CheckpointManager in ``<workdir>/checkpoints``.

Shared by pretraining and fine-tuning. Each step holds the model's named states, the optimizer's
leaves and a JSON ``meta`` (step, every host's data position, topology, the run's config).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from flax import nnx

from mae_jax import multihost
from mae_jax._files import is_url, run_path


def _flat_leaves(tree: Any) -> dict[str, np.ndarray]:
    return {str(i): np.asarray(x) for i, x in enumerate(jax.tree.leaves(tree))}


class Checkpoints:
    """Orbax CheckpointManager in ``<workdir>/checkpoints``: asynchronous, atomic, keeps the last K.

    Each step holds ``model`` (named model states, e.g. ``params`` and ``fixed``, each a tree
    named as the official state_dict), ``opt_state`` (the optimizer's leaves in order) and
    ``meta`` (JSON: step, data position, RNG seed, the run's config).
    """

    def __init__(self, workdir: Any, keep: int):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        directory = self.directory = run_path(workdir) / "checkpoints"
        self.manager = ocp.CheckpointManager(
            directory if is_url(directory) else directory.absolute(),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
        )
        # The step of the last save started by this process: every host keeps the same count,
        # so a decision taken on it (save now or not) is the same on all of them.
        self.last_saved = self.manager.latest_step()

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(
        self, step: int, states: dict[str, nnx.State], opt_state: Any, meta: dict[str, Any]
    ) -> None:
        """Save host copies of ``states`` and ``opt_state`` (see ``unreplicate``) as ``step``."""
        ocp = self._ocp
        model_tree = {k: nnx.to_pure_dict(v) for k, v in states.items()}
        self.last_saved = step
        self.manager.save(
            step,
            args=ocp.args.Composite(
                model=ocp.args.StandardSave(model_tree),
                opt_state=ocp.args.StandardSave(_flat_leaves(opt_state)),
                meta=ocp.args.JsonSave(meta),
            ),
        )

    def restore(
        self, step: int, states: dict[str, nnx.State], opt_state: Any = None
    ) -> tuple[dict[str, nnx.State], Any, dict]:
        """(states, opt_state, meta) of ``step``, unreplicated, shaped like the templates; the
        optimizer state and meta are skipped when ``opt_state`` is None (loading a model only)."""
        ocp = self._ocp
        target = {k: jax.tree.map(np.asarray, nnx.to_pure_dict(v)) for k, v in states.items()}
        items = {"model": ocp.args.StandardRestore(target)}
        if opt_state is not None:
            leaves, treedef = jax.tree.flatten(opt_state)
            items["opt_state"] = ocp.args.StandardRestore(_flat_leaves(leaves))
            items["meta"] = ocp.args.JsonRestore()
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        for name, state in states.items():
            nnx.replace_by_pure_dict(state, restored.model[name])
        if opt_state is None:
            return states, None, {}
        opt_leaves = [restored.opt_state[str(i)] for i in range(len(leaves))]
        return states, jax.tree.unflatten(treedef, opt_leaves), restored.meta

    def resume(
        self, states: dict[str, nnx.State], opt_state: Any, loader: Any
    ) -> tuple[dict[str, nnx.State], Any, dict] | None:
        """The latest checkpoint of a run restored like ``restore``, with this host's data
        position set on ``loader``; None when the run has none yet. Every host must see the
        same latest step, and the run's hosts and devices must be the ones it was started with
        (one-line refusals otherwise)."""
        start = self.latest_step()
        multihost.check_same_checkpoint(start, self.directory)
        if start is None:
            return None
        states, opt_state, meta = self.restore(start, states, opt_state)
        multihost.check_topology(meta.get("topology"), self.directory)
        loader.set_state(multihost.own_data_state(meta["data"]))
        return states, opt_state, meta

    @staticmethod
    def position(loader_state: dict[str, int]) -> dict[str, Any]:
        """What a checkpoint's meta needs for ``resume``: every host's loader state and the run's
        hosts and devices (a collective: every host calls it at each save)."""
        return {
            "data": multihost.gather_data_states(loader_state),
            "topology": multihost.topology(),
        }

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
