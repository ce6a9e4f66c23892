"""Model checkpoints: an Orbax directory of parameters plus a small JSON metadata file.

Layout of a checkpoint directory::

    <dir>/mae_jax.json   what the model is: type, config, where it came from
    <dir>/params/        Orbax (StandardCheckpointer) tree of the model's state, named as the official state_dict

``path`` may be local or in a bucket (``gs://...``, see ``mae_jax._files``). A local directory is
written under a temporary name and renamed when complete, so a reader never sees a half-written
checkpoint. In a bucket the directory is written in place (see ``save_model``): ``mae_jax.json``
is written last and is its commit marker.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from mae_jax._files import atomic_write, is_url, naming, replace_dir, run_path
from mae_jax._memory import return_large_blocks_to_the_system
from mae_jax.classifier import VisionTransformer
from mae_jax.config import MAEConfig, ViTConfig
from mae_jax.model import MaskedAutoencoderViT
from mae_jax.normalization import Normalization

METADATA_FILE = "mae_jax.json"
PARAMS_DIR = "params"
FORMAT = "mae-jax-checkpoint/1"
MODEL_TYPES = ("mae", "mae_encoder", "vit_classifier")
CONFIG_CLASSES = {"mae": MAEConfig, "mae_encoder": MAEConfig, "vit_classifier": ViTConfig}


class CheckpointError(Exception):
    """A checkpoint directory that is missing, incomplete or not a mae-jax checkpoint."""


def build_model(
    model_type: str,
    config: MAEConfig | ViTConfig,
    *,
    rngs: nnx.Rngs | None = None,
    dtype: Any = jnp.float32,
    attention: str = "auto",
) -> nnx.Module:
    """A model of the given type ('mae', 'mae_encoder' or 'vit_classifier') and config."""
    if model_type not in MODEL_TYPES:
        raise CheckpointError(f"unknown model type {model_type!r}; known: {', '.join(MODEL_TYPES)}")
    if not isinstance(config, CONFIG_CLASSES[model_type]):
        raise TypeError(f"a {model_type} model needs a {CONFIG_CLASSES[model_type].__name__}")
    rngs = rngs if rngs is not None else nnx.Rngs(0)
    if model_type == "vit_classifier":
        return VisionTransformer(config, rngs=rngs, dtype=dtype, attention=attention)
    return MaskedAutoencoderViT(
        config, rngs=rngs, with_decoder=model_type == "mae", dtype=dtype, attention=attention
    )


class _OneKey:
    """Stands in for ``nnx.Rngs`` where only shapes are wanted: every stream gives the same key.

    Tracing ``nnx.Rngs`` costs seconds for a large model: each draw updates a traced counter, and
    for each update jax composes an error text (the "sharding not available" message) by walking
    the whole trace so far, so the cost grows with the square of the parameter count.
    """

    def __init__(self) -> None:
        self._key: jax.Array | None = None

    def _draw(self) -> jax.Array:
        if self._key is None:
            self._key = jax.random.key(0)
        return self._key

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return self._draw


def abstract_model(
    model_type: str,
    config: MAEConfig | ViTConfig,
    *,
    dtype: Any = jnp.float32,
    attention: str = "auto",
) -> nnx.Module:
    """The model of this type and config with shape-and-dtype stand-ins for its arrays.

    The same as ``nnx.eval_shape(lambda: build_model(...))``, about 7x faster (ViT-L: 0.5 s).
    """
    return nnx.eval_shape(
        lambda: build_model(model_type, config, rngs=_OneKey(), dtype=dtype, attention=attention)
    )


def model_type_of(model: nnx.Module) -> str:
    if isinstance(model, MaskedAutoencoderViT):
        return "mae" if model.with_decoder else "mae_encoder"
    if isinstance(model, VisionTransformer):
        return "vit_classifier"
    raise TypeError(f"cannot checkpoint a {type(model).__name__}")


def state_as_numpy(model: nnx.Module) -> dict:
    """The model's whole state (parameters and fixed tables) as a nested dict of numpy arrays."""
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model)))


def _checkpoint_path(path: str | os.PathLike) -> epath.Path:
    """``path`` as an epath.Path, made absolute when local (a URL is absolute already)."""
    path = run_path(path)
    return path if is_url(path) else path.absolute()


def _start_dir(path: epath.Path, force: bool) -> epath.Path:
    """The directory to write the checkpoint into: a temporary sibling of a local ``path``, or
    ``path`` itself in a bucket (an existing one removed first, when ``force``)."""
    if path.exists() and not force:
        raise FileExistsError(f"{path}: already exists (pass --force / force=True to replace it)")
    if is_url(path):
        # Written in place. A directory "rename" in a bucket is a copy plus a delete of every
        # object (the whole model copied again, and not atomic either), so instead: Orbax
        # commits params/ itself (its commit_success.txt marker in a bucket) and mae_jax.json,
        # written last, marks the whole checkpoint complete; read_metadata refuses a directory
        # without it. A replaced checkpoint loses its mae_jax.json first, so a reader meanwhile
        # finds it incomplete, never a mix of the old and the new.
        if path.exists():
            (path / METADATA_FILE).unlink(missing_ok=True)
            path.rmtree()
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    if not os.access(path.parent, os.W_OK):
        raise PermissionError(f"{path.parent}: directory is not writable")
    return epath.Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))


def _remove_dir(path: epath.Path) -> None:
    try:
        path.rmtree(missing_ok=True)
    except Exception:  # cleaning up after a failure: the failure is what to report
        pass


def save_model(
    model: nnx.Module,
    path: str | os.PathLike,
    *,
    metadata: dict | None = None,
    force: bool = False,
    check_interrupt: Callable[[], None] | None = None,
) -> epath.Path:
    """Write ``model`` to the checkpoint directory ``path`` (local or a bucket URL) atomically;
    returns the path.

    ``check_interrupt`` is called once the parameters are written, before the checkpoint is
    committed (renamed into place; in a bucket, given its mae_jax.json): what it raises abandons
    the checkpoint, and the temporary directory is removed with no Orbax thread still writing
    into it. An exception raised while Orbax writes (a KeyboardInterrupt) cannot promise that:
    hold signals during the write and raise them here instead (convert/pth_to_orbax.py does).
    """
    path = _checkpoint_path(path)
    meta = {
        "format": FORMAT,
        "model_type": model_type_of(model),
        "config": model.config.to_dict(),
        **(metadata or {}),
    }
    # The caller's process writes the whole (host numpy) state alone: with several processes
    # (jax.distributed) Orbax would otherwise wait for all of them at a barrier.
    me = jax.process_index()
    alone = ocp.options.MultiprocessingOptions(
        primary_host=me, active_processes={me}, barrier_sync_key_prefix=f"save_model_{me}"
    )
    # The model's own arrays, uncompressed: Orbax then writes them without a copy, so saving adds
    # almost nothing to the model's memory (numpy leaves, or zstd compression, cost 1.4-2.3x the
    # model in buffers). Other processes' arrays are not addressable here: numpy for them.
    state = nnx.to_pure_dict(nnx.state(model))
    if jax.process_count() > 1:
        state = jax.tree.map(np.asarray, state)
    with naming(path):
        tmp = _start_dir(path, force)
        try:
            handler = ocp.PyTreeCheckpointHandler(
                use_compression=False, multiprocessing_options=alone
            )
            with ocp.Checkpointer(handler, multiprocessing_options=alone) as ckptr:
                ckptr.save(tmp / PARAMS_DIR, args=ocp.args.PyTreeSave(state))
            if check_interrupt is not None:
                check_interrupt()
            atomic_write(tmp / METADATA_FILE, json.dumps(meta, indent=2, sort_keys=True) + "\n")
            if tmp != path:
                replace_dir(tmp, path)
        except BaseException:
            _remove_dir(tmp)
            raise
    return path


def read_metadata(path: str | os.PathLike) -> dict:
    """The JSON metadata of a checkpoint directory (local or in a bucket), checked for the fields
    every checkpoint has."""
    path = run_path(path)
    with naming(path):
        if not path.is_dir():
            raise CheckpointError(f"{path}: no such checkpoint directory")
        meta_file = path / METADATA_FILE
        if not meta_file.is_file():
            raise CheckpointError(f"{path}: not a mae-jax checkpoint (no {METADATA_FILE})")
        text = meta_file.read_bytes()
    try:
        meta = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{meta_file}: unreadable metadata ({e})") from None
    for field in ("format", "model_type", "config"):
        if field not in meta:
            raise CheckpointError(f"{meta_file}: metadata has no '{field}'")
    if meta["format"] != FORMAT:
        raise CheckpointError(f"{meta_file}: unknown checkpoint format {meta['format']!r}")
    return meta


def checkpoint_dir(path: str | os.PathLike) -> epath.Path | None:
    """The checkpoint directory ``path`` (local or a bucket URL) names: itself, or the ``model/``
    a finished fine-tuning run exported; None for a pretraining run directory (whose model lives
    in its Orbax steps)."""
    path = run_path(path)
    with naming(path):
        if (path / METADATA_FILE).exists() or not (path / "checkpoints").is_dir():
            return path
        if (path / "model" / METADATA_FILE).exists():
            return path / "model"
    return None


def recorded_normalization(
    checkpoint: str | os.PathLike,
    in_chans: int,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
) -> Normalization:
    """The normalisation for the model of ``checkpoint``: ``mean``/``std`` where given, else what
    a pretraining run's config.json or a checkpoint directory's metadata records (runs and
    exports write it), else the default of ``in_chans`` channels. ValueError if they do not fit."""
    directory = checkpoint_dir(checkpoint)
    if directory is None:
        with naming(checkpoint):
            saved = json.loads((run_path(checkpoint) / "config.json").read_text())
    else:
        saved = read_metadata(directory).get("normalization") or {}
    mean = saved.get("mean") if mean is None else mean
    std = saved.get("std") if std is None else std
    return Normalization.for_channels(in_chans, mean, std)


def load_model(
    path: str | os.PathLike, *, dtype: Any = jnp.float32, attention: str = "auto"
) -> nnx.Module:
    """The model stored in the checkpoint directory ``path`` (architecture from its metadata),
    computing in ``dtype`` with the ``attention`` kernel (``model.ATTENTION_CHOICES``)."""
    graphdef, abstract_state, leaves, treedef = _restore(path, dtype, attention)
    for i, want in enumerate(jax.tree.leaves(abstract_state)):
        # One at a time, each host copy freed once its device copy is done (the copies are
        # asynchronous: without the wait the host arrays can pile up, ~1.7x the model).
        leaves[i] = jnp.asarray(leaves[i], dtype=want.dtype).block_until_ready()
    nnx.replace_by_pure_dict(abstract_state, jax.tree.unflatten(treedef, leaves))
    return nnx.merge(graphdef, abstract_state)


def load_state(path: str | os.PathLike) -> dict:
    """The checkpoint's state (parameters and fixed tables) as a nested dict of host arrays,
    checked against the model of its config, without building the model's arrays."""
    _, _, leaves, treedef = _restore(path, jnp.float32)
    return jax.tree.unflatten(treedef, leaves)


def _restore(path: str | os.PathLike, dtype: Any, attention: str = "auto") -> tuple:
    """(graphdef, abstract state, host leaves, their treedef) of the checkpoint at ``path``."""
    path = _checkpoint_path(path)
    with naming(path):
        return _restore_from(path, dtype, attention)


def _restore_from(path: epath.Path, dtype: Any, attention: str) -> tuple:
    meta = read_metadata(path)
    return_large_blocks_to_the_system()
    if meta["model_type"] not in MODEL_TYPES:
        raise CheckpointError(
            f"{path / METADATA_FILE}: unknown model type {meta['model_type']!r}; "
            f"known: {', '.join(MODEL_TYPES)}"
        )
    try:
        config = CONFIG_CLASSES[meta["model_type"]].from_dict(meta["config"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path / METADATA_FILE}: bad config ({e})") from None
    abstract = abstract_model(meta["model_type"], config, dtype=dtype, attention=attention)
    graphdef, abstract_state = nnx.split(abstract)
    target = nnx.to_pure_dict(abstract_state)
    params_dir = path / PARAMS_DIR
    if not params_dir.is_dir():
        raise CheckpointError(f"{path}: checkpoint has no {PARAMS_DIR}/ directory")
    # Restored as host arrays (load_model then makes JAX arrays one at a time): restoring JAX
    # arrays directly holds about 1.7x the model at the end (Orbax's buffers), this about 1.1x.
    as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
    try:
        with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as ckptr:
            restored = ckptr.restore(
                params_dir, args=ocp.args.PyTreeRestore(item=target, restore_args=as_numpy)
            )
    except (ValueError, KeyError, FileNotFoundError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{params_dir}: cannot restore parameters ({first})") from None
    leaves, treedef = jax.tree.flatten(restored)
    if treedef != jax.tree.structure(target):
        raise CheckpointError(f"{params_dir}: the parameters do not fit the model of its config")
    for (key, want), leaf in zip(
        jax.tree_util.tree_flatten_with_path(target)[0], leaves, strict=True
    ):
        if tuple(np.shape(leaf)) != tuple(want.shape):
            raise CheckpointError(
                f"{params_dir}: {jax.tree_util.keystr(key)} has shape {np.shape(leaf)}, the model "
                f"needs {tuple(want.shape)}"
            )
    return graphdef, abstract_state, leaves, treedef
