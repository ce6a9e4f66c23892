"""A run's checkpoints: Orbax's CheckpointManager in ``<workdir>/checkpoints``.

Shared by pretraining and fine-tuning. Each step holds the model's named states, the optimizer's
leaves and a JSON ``meta`` (step, every host's data position, topology, the run's config, and a
CRC-32 of every saved array).

Failures are loud and early. Saves are asynchronous: a save that fails in the background is
reported by ``raise_if_failed`` (called once per training step), by the next ``save`` and by
``wait``/``close``, as one ``CheckpointSaveError`` line naming the step's path and the reason;
the earlier checkpoints stay as they were. Restores take the newest checkpoint that restores
and whose arrays match their checksums; the others are skipped with one printed line each.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jax
import numpy as np
from flax import nnx

from mae_jax import multihost
from mae_jax._files import is_url, run_path

# What every step holds: a step without one of them is half-deleted (a kill while Orbax removed
# an old step) or was damaged by hand; it cannot be restored.
ITEMS = ("model", "opt_state", "meta")
# The key in a step's meta under which save records its arrays' checksums.
CHECKSUMS = "checksums"


class CheckpointSaveError(OSError):
    """A checkpoint that could not be written; the message names its path and the reason."""


class CheckpointRestoreError(OSError):
    """No checkpoint of a run that restores and verifies (or not the one asked for)."""


class _Unusable(Exception):
    """One step that cannot be used; ``incomplete`` when it lacks whole items."""

    def __init__(self, reason: str, incomplete: bool = False):
        super().__init__(reason)
        self.incomplete = incomplete


# ----------------------------------------------------------------------------- checksums


def _crc32(array: np.ndarray) -> int:
    # zlib releases the GIL on large buffers: the leaves of a tree are summed in parallel.
    return zlib.crc32(np.ascontiguousarray(array).reshape(-1).view(np.uint8))


def checksums(tree: Any) -> dict[str, int]:
    """CRC-32 of each array's bytes in ``tree`` (host arrays), keyed by its path (``keystr``)."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        sums = list(pool.map(_crc32, (np.asarray(x) for _, x in flat)))
    return {jax.tree_util.keystr(path): s for (path, _), s in zip(flat, sums, strict=True)}


def _first_mismatch(recorded: dict[str, int], tree: Any) -> str | None:
    got = checksums(tree)
    if set(got) != set(recorded):
        return "holds other arrays than its checksums list"
    bad = [k for k in recorded if got[k] != recorded[k]]
    if not bad:
        return None
    if len(bad) == 1:
        return f"{bad[0]} does not match its checksum taken at save"
    return f"{bad[0]} and {len(bad) - 1} more arrays do not match their checksums taken at save"


# ----------------------------------------------------------------------------- errors


def _reason(error: BaseException) -> str:
    """The cause of a failed write or read in a few words ("No space left on device")."""
    seen = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno:
            return os.strerror(seen.errno)
        # tensorstore reports the OS error inside a ValueError: "... [os_error_code='28']"
        code = re.search(r"os_error_code='?(\d+)", str(seen))
        if code:
            return os.strerror(int(code.group(1)))
        seen = seen.__cause__ or seen.__context__
    if isinstance(error, json.JSONDecodeError):
        return f"a metadata file is not valid JSON: {error}"
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _note(message: str) -> None:
    print(f"mae-jax: {message}", file=sys.stderr, flush=True)


class _QuietOrbaxErrors(logging.Filter):
    """After a failed write, Orbax logs it with its traceback from each thread involved, and
    asyncio logs each of its abandoned writes ("Task exception was never retrieved"): over a
    thousand lines for a full disk. ``Checkpoints`` reports such a failure in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            return True
        if "orbax" in record.pathname:
            return False
        text = record.getMessage()
        return not ("never retrieved" in text and ("orbax" in text or "OCDBT" in text))


def _quiet_orbax_errors() -> None:
    for name in ("absl", "asyncio"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _QuietOrbaxErrors) for f in logger.filters):
            logger.addFilter(_QuietOrbaxErrors())
    if not isinstance(sys.unraisablehook, _DropClosedLoopCallbacks):
        sys.unraisablehook = _DropClosedLoopCallbacks(sys.unraisablehook)


class _DropClosedLoopCallbacks:
    """After a failed write Orbax closes its event loop while tensorstore still completes the
    other writes: each completion then prints "RuntimeError: Event loop is closed" (24 tracebacks
    for one full disk), which say nothing the one-line error does not. Others pass through."""

    def __init__(self, previous: Callable[[Any], None]):
        self.previous = previous

    def __call__(self, unraisable: Any) -> None:
        error = unraisable.exc_value
        if not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"):
            self.previous(unraisable)


def _pure(state: Any) -> Any:
    """An ``nnx.State`` as its plain nested dict; a plain dict (the pretraining step's state) as
    it is. Both are saved alike."""
    return nnx.to_pure_dict(state) if isinstance(state, nnx.State) else state


def _flat_leaves(tree: Any) -> dict[str, np.ndarray]:
    return {str(i): np.asarray(x) for i, x in enumerate(jax.tree.leaves(tree))}


class Checkpoints:
    """Orbax CheckpointManager in ``<workdir>/checkpoints``: asynchronous, atomic, keeps the last K.

    Each step holds ``model`` (named model states, e.g. ``params`` and ``fixed``, each a tree
    named as the official state_dict), ``opt_state`` (the optimizer's leaves in order) and
    ``meta`` (JSON: step, data position, RNG seed, the run's config, the arrays' checksums).

    A training loop calls ``raise_if_failed()`` once per step, ``save`` at its checkpoints and
    ``wait()`` then ``close()`` at the end; each raises ``CheckpointSaveError`` once a save
    failed.
    """

    def __init__(self, workdir: Any, keep: int):
        import orbax.checkpoint as ocp

        _quiet_orbax_errors()
        self._ocp = ocp
        directory = self.directory = run_path(workdir) / "checkpoints"
        self.manager = ocp.CheckpointManager(
            directory if is_url(directory) else directory.absolute(),
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep,
                create=True,
                # Created in the background, a step folder that cannot be made (a read-only
                # disk) leaves every writer waiting 300 s for it, and the process for as long
                # at exit; created by save itself, the failure is an error there and then.
                async_options=ocp.AsyncOptions(create_directories_asynchronously=False),
            ),
        )
        # The step of the last save started by this process: every host keeps the same count,
        # so a decision taken on it (save now or not) is the same on all of them.
        self.last_saved = self.manager.latest_step()
        self._unchecked: int | None = None  # a step whose background write is not yet known good
        self._failure: CheckpointSaveError | None = None
        self._said_unverified = False

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def _step_path(self, step: int) -> Any:
        return self.directory / str(step)

    # ------------------------------------------------------------------------- saving

    def save(self, step: int, states: dict[str, Any], opt_state: Any, meta: dict[str, Any]) -> None:
        """Save host copies of ``states`` and ``opt_state`` (see ``unreplicate``) as ``step``,
        with the CRC-32 of every array in its meta. Returns once the arrays are handed to the
        background write; CheckpointSaveError when this save or an earlier one failed."""
        self.wait()  # Orbax would wait for the previous save too, and name no step if it failed
        ocp = self._ocp
        model_tree = {k: jax.tree.map(np.asarray, _pure(v)) for k, v in states.items()}
        opt_leaves = _flat_leaves(opt_state)
        meta = {
            **meta,
            CHECKSUMS: {
                "crc32": {"model": checksums(model_tree), "opt_state": checksums(opt_leaves)}
            },
        }
        self.last_saved = step
        try:
            self.manager.save(
                step,
                args=ocp.args.Composite(
                    model=ocp.args.StandardSave(model_tree),
                    opt_state=ocp.args.StandardSave(opt_leaves),
                    meta=ocp.args.JsonSave(meta),
                ),
            )
        except Exception as e:  # noqa: BLE001  any failure to write is the one-line error
            self._fail(step, e)
        self._unchecked = step

    def _fail(self, step: int, error: BaseException) -> None:
        self._failure = CheckpointSaveError(
            f"{self._step_path(step)}: cannot save the checkpoint: {_reason(error)} (the "
            "earlier checkpoints are kept)"
        )
        raise self._failure from None

    def raise_if_failed(self) -> None:
        """CheckpointSaveError when a background save has failed; returns at once otherwise
        (also while a save is still being written). Cheap enough for every training step."""
        if self._failure is not None:
            raise self._failure
        if self._unchecked is None or self.manager.is_saving_in_progress():
            return
        self._collect()

    def _collect(self) -> None:
        step, self._unchecked = self._unchecked, None
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            self._fail(step, e)

    def wait(self) -> None:
        """Block until the last save is written; CheckpointSaveError if it (or any) failed."""
        if self._failure is not None:
            raise self._failure
        if self._unchecked is not None:
            self._collect()

    def close(self) -> None:
        """Wait for the last save, release Orbax's threads; CheckpointSaveError if a save
        failed (after closing)."""
        try:
            self.wait()
        finally:
            try:
                self.manager.close()
            except Exception as e:  # noqa: BLE001  Orbax raises a failed write once more
                if self._failure is None:
                    self._fail(self.last_saved, e)

    # ------------------------------------------------------------------------- restoring

    def restore(
        self, step: int, states: dict[str, nnx.State], opt_state: Any = None
    ) -> tuple[dict[str, nnx.State], Any, dict]:
        """(states, opt_state, meta) of ``step``, unreplicated, shaped like the templates and
        checked against the checksums taken at save; the optimizer state is skipped when
        ``opt_state`` is None (loading a model only). CheckpointRestoreError naming the step's
        path and the reason when it does not restore or verify."""
        try:
            return self._restore(step, states, opt_state)
        except _Unusable as e:
            raise CheckpointRestoreError(f"{self._step_path(step)}: {e}") from None

    def _restore(
        self, step: int, states: dict[str, nnx.State], opt_state: Any
    ) -> tuple[dict[str, nnx.State], Any, dict]:
        ocp = self._ocp
        path = self._step_path(step)
        wanted = ITEMS if opt_state is not None else ("model", "meta")
        try:
            missing = [name for name in wanted if not (path / name).exists()]
        except Exception as e:  # noqa: BLE001  a listing that fails: the step is unusable
            raise _Unusable(f"cannot be read ({_reason(e)})") from None
        if missing:
            raise _Unusable(f"incomplete: no {', '.join(n + '/' for n in missing)}", True)
        target = {k: jax.tree.map(np.asarray, nnx.to_pure_dict(v)) for k, v in states.items()}
        items = {"meta": ocp.args.JsonRestore(), "model": ocp.args.StandardRestore(target)}
        if opt_state is not None:
            leaves, treedef = jax.tree.flatten(opt_state)
            items["opt_state"] = ocp.args.StandardRestore(_flat_leaves(leaves))
        restored = self._read(path, items)
        meta = dict(restored["meta"] or {})
        recorded = meta.pop(CHECKSUMS, None)
        if recorded is None:
            self._say_unverified(path)
        else:
            for name in items.keys() - {"meta"}:
                mismatch = _first_mismatch(recorded["crc32"][name], restored[name])
                if mismatch:
                    raise _Unusable(f"corrupt: {name} {mismatch}")
        for name, state in states.items():
            nnx.replace_by_pure_dict(state, restored["model"][name])
        if opt_state is None:
            return states, None, meta
        opt_leaves = [restored["opt_state"][str(i)] for i in range(len(leaves))]
        return states, jax.tree.unflatten(treedef, opt_leaves), meta

    def _read(self, path: Any, items: dict[str, Any]) -> dict[str, Any]:
        """The items of one step, read by this host alone: Orbax's manager would meet the other
        hosts at a barrier after each read, and a step that fails on one host only would leave
        them waiting there; the hosts agree on the step afterwards instead. One item at a
        time, so that a failure names its item."""
        ocp = self._ocp
        me = jax.process_index()
        alone = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})
        restored = {}
        with ocp.Checkpointer(
            ocp.CompositeCheckpointHandler(), multiprocessing_options=alone
        ) as reader:
            for name, args in items.items():
                try:
                    one = reader.restore(path, args=ocp.args.Composite(**{name: args}))
                except Exception as e:  # noqa: BLE001  truncated data, bad metadata, unreadable
                    raise _Unusable(f"{name}/ does not restore ({_reason(e)})") from None
                restored[name] = one[name]
        return restored

    def _say_unverified(self, path: Any) -> None:
        if not self._said_unverified:
            self._said_unverified = True
            _note(
                f"{path}: saved without checksums (before mae-jax recorded them): restored "
                "unverified"
            )

    def _newest_good(
        self, states: dict[str, nnx.State], opt_state: Any, restore_step: int | None
    ) -> tuple[int, tuple[dict[str, nnx.State], Any, dict], list[tuple[int, _Unusable]]]:
        """(step, what ``restore`` returned, the newer steps skipped with why): the newest step
        that restores and verifies, or ``restore_step``. CheckpointRestoreError when there is
        none; a line for each step skipped."""
        steps = sorted(self.manager.all_steps(), reverse=True)
        listing = ", ".join(map(str, sorted(steps))) or "none"
        if restore_step is not None:
            if restore_step not in steps:
                raise CheckpointRestoreError(
                    f"{self.directory}: there is no checkpoint of step {restore_step} "
                    f"(steps there: {listing})"
                )
            try:
                return restore_step, self._restore(restore_step, states, opt_state), []
            except _Unusable as e:
                raise CheckpointRestoreError(
                    f"{self._step_path(restore_step)}: {e} (steps there: {listing})"
                ) from None
        skipped = []
        for step in steps:
            try:
                return step, self._restore(step, states, opt_state), skipped
            except _Unusable as e:
                _note(f"{self._step_path(step)}: skipped: {e}")
                skipped.append((step, e))
        raise CheckpointRestoreError(
            f"{self.directory}: no checkpoint restores (steps there: {listing}; see above)"
        )

    def restore_latest(
        self, states: dict[str, nnx.State], opt_state: Any = None
    ) -> tuple[int, dict[str, nnx.State], Any, dict] | None:
        """(step, states, opt_state, meta) of the newest checkpoint that restores and verifies,
        like ``restore``; None when there is none at all, CheckpointRestoreError when none of
        them restores. Reads only: for tools that load a run's model, on one host."""
        if self.latest_step() is None:
            return None
        step, found, _ = self._newest_good(states, opt_state, restore_step=None)
        return (step, *found)

    def resume(
        self,
        states: dict[str, nnx.State],
        opt_state: Any,
        loader: Any,
        restore_step: int | None = None,
    ) -> tuple[dict[str, nnx.State], Any, dict] | None:
        """The newest checkpoint of a run that restores and verifies (or exactly
        ``restore_step``), restored like ``restore``, with this host's data position set on
        ``loader``; None when the run has none yet.

        Every host must see the same latest step and choose the same step, and the run's hosts
        and devices must be the ones it was started with (one-line refusals otherwise). As the
        run will write their step numbers again, newer steps that did not restore are moved
        aside to ``<step>.unusable`` and half-deleted steps are removed (by the first host).
        """
        latest = self.latest_step()
        multihost.check_same_checkpoint(latest, self.directory)
        if latest is None:
            if restore_step is not None:
                raise CheckpointRestoreError(
                    f"{self.directory}: there is no checkpoint of step {restore_step} "
                    "(the run has none)"
                )
            return None
        try:
            step, found, skipped = self._newest_good(states, opt_state, restore_step)
        except CheckpointRestoreError as e:
            self._agree_on(None)
            raise e from None
        self._agree_on(step)
        self._clear_the_way(step, skipped)
        states, opt_state, meta = found
        multihost.check_topology(meta.get("topology"), self.directory)
        loader.set_state(multihost.own_data_state(meta["data"]))
        return states, opt_state, meta

    def _agree_on(self, step: int | None) -> None:
        """HostMismatchError on every host unless all hosts chose ``step`` (None: none)."""
        chosen = multihost.gather_ints([-1 if step is None else step])[:, 0].tolist()
        if len(set(chosen)) == 1:
            return
        seen = ", ".join(
            f"host {i}: {'none' if s < 0 else f'step {s}'}" for i, s in enumerate(chosen)
        )
        raise multihost.HostMismatchError(
            f"{self.directory}: the hosts restored different checkpoints ({seen}); each "
            "host's lines above say why it skipped one"
        )

    def _clear_the_way(self, step: int, skipped: list[tuple[int, _Unusable]]) -> None:
        """Remove half-deleted steps and move newer unusable ones aside (first host only), so
        that the run's next saves find their step numbers free; every host then re-lists."""
        if jax.process_index() == 0:
            half_deleted = {s for s, e in skipped if e.incomplete}
            half_deleted |= {
                s
                for s in self.manager.all_steps()
                if s < step and any(not (self._step_path(s) / n).exists() for n in ITEMS)
            }
            for s in sorted(half_deleted):
                self._step_path(s).rmtree(missing_ok=True)
                _note(f"{self._step_path(s)}: removed (half-deleted: items missing)")
            for s, _ in skipped:
                if s not in half_deleted:
                    aside = self._free_name(f"{s}.unusable")
                    self._step_path(s).rename(aside)
                    _note(f"{self._step_path(s)}: moved aside to {aside}")
        self._relist()

    def _relist(self) -> None:
        """Every host lists the steps again once the first host has changed them (a bucket
        client caches listings: the other hosts' would still show the old steps)."""
        multihost.gather_ints([0])  # the first host has finished
        if is_url(self.directory):
            from etils.epath import backend

            backend.fsspec_backend.fs(os.fspath(self.directory)).invalidate_cache()
        self.manager.reload()

    def _free_name(self, name: str) -> Any:
        path, n = self.directory / name, 1
        while path.exists():
            n += 1
            path = self.directory / f"{name}-{n}"
        return path

    def discard_after(self, step: int) -> None:
        """Remove the checkpoints newer than ``step`` (a run resumed at an older
        ``restore_step`` goes another way from there). Every host calls it; the first host
        removes, saying so in one line per step."""
        newer = [s for s in self.manager.all_steps() if s > step]
        if jax.process_index() == 0:
            for s in newer:
                self._step_path(s).rmtree(missing_ok=True)
                _note(f"{self._step_path(s)}: removed (newer than the restored step {step})")
        self._relist()

    @staticmethod
    def position(loader_state: dict[str, int]) -> dict[str, Any]:
        """What a checkpoint's meta needs for ``resume``: every host's loader state and the run's
        hosts and devices (a collective: every host calls it at each save)."""
        return {
            "data": multihost.gather_data_states(loader_state),
            "topology": multihost.topology(),
        }
