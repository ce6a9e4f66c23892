"""MAE pretraining: the official recipe, data-parallel over every local device with ``jax.pmap``.

Read top to bottom: the run's configuration; the pure per-device train step (the only place that
knows about devices is ``make_p_train_step``, which wraps it in ``jax.pmap``); the training state and
its checkpoints; the loop with its progress bar, metrics, reconstructions and interruption handling.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import itertools
import json
import math
import os
import signal
import time
import types
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from mae_jax import masking, multihost, optim
from mae_jax._files import check_bucket, naming, run_path
from mae_jax.checkpoint import recorded_normalization
from mae_jax.config import MAEConfig, get_config, parse_setting
from mae_jax.model import FixedEmbedding, MaskedAutoencoderViT
from mae_jax.normalization import IMAGENET, Normalization
from mae_jax.run_checkpoints import Checkpoints
from mae_jax.run_metrics import MetricsLog
from mae_jax.run_settings import check_settings, compare_with_saved, write_settings
from mae_jax.workdir_lock import WorkdirLock

AXIS = "devices"  # the pmap axis name


class TrainingError(RuntimeError):
    """Training cannot go on (a bad configuration, a non-finite loss); the message says why."""


# --------------------------------------------------------------------------- configuration


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
    """A pretraining run. Defaults follow the official recommended command (PRETRAIN.md), which
    differs from the official argparse defaults: norm_pix_loss on, 800 epochs, blr 1.5e-4."""

    preset: str = "mae_vit_large_patch16"
    data: str | None = None  # image folder; None means the bundled sample photographs
    img_size: int | None = None  # None: the preset's (224)
    batch_size: int = 64  # per device; global = batch_size * local devices * hosts
    accum_iter: int = 1
    epochs: int = 800
    warmup_epochs: int = 40
    blr: float = 1.5e-4  # lr = blr * effective batch / 256
    lr: float | None = None  # absolute peak lr; overrides blr
    min_lr: float = 0.0
    weight_decay: float = 0.05
    mask_ratio: float = 0.75
    norm_pix_loss: bool = True
    # Compute dtype: auto = bfloat16 on GPU and TPU, float32 on CPU. Parameters, optimizer state,
    # LayerNorm statistics, softmax and loss stay float32 in any case.
    dtype: str = "auto"
    remat: str = "none"  # activation checkpointing per block: none, block or dots (model.py)
    # Attention kernel (model.py): auto = cuDNN's fused attention on a CUDA GPU in bfloat16, XLA's
    # elsewhere; cudnn = that or an error; xla = never cuDNN (the way around a cuDNN refusal).
    attention: str = "auto"
    shard_optimizer: bool = False  # ZeRO-1: each device keeps 1/n of the AdamW state
    prefetch: int = 2  # optimizer steps of images sent to the devices ahead of the step
    seed: int = 0
    max_steps: int | None = None  # stop after this many micro-steps (a short run), else all epochs
    log_every: int = 20  # micro-steps between metric lines
    ckpt_every: int = 1000  # micro-steps between checkpoints (and one at the end)
    keep_checkpoints: int = 3
    # Resume from this step's checkpoint instead of the newest (e.g. before a loss went
    # non-finite; newer checkpoints are then discarded). None: the newest that verifies.
    restore_step: int | None = None
    recon_every: int = 1000  # micro-steps between reconstruction figures; 0 = never
    recon_images: int = 4
    read_threads: int = 16
    worker_count: int = -1  # loader processes; -1: one per core but one; 0: threads only
    # The preset's sizes changed, e.g. {"embed_dim": 384, "num_heads": 6}: `--set model.KEY=VALUE`
    # or a "model" object in the --config JSON; keys are MAEConfig fields.
    model: dict[str, Any] = dataclasses.field(default_factory=dict)
    # Pixel normalisation, one value per input channel (`--set mean=0.5` for a 1-channel model,
    # `--set mean=0.4,0.5,0.6` for RGB). None: ImageNet's for RGB, (0.449,), (0.226,) for gray.
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def model_config(self) -> MAEConfig:
        overrides: dict[str, Any] = {"norm_pix_loss": self.norm_pix_loss}
        if self.img_size is not None:
            overrides["img_size"] = self.img_size
        return model_from_preset(get_config, self.preset, {**overrides, **self.model})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PretrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise TrainingError(f"unknown pretraining settings: {', '.join(unknown)}")
        return cls(**tuples_from_json(d))

    def with_overrides(self, assignments: list[str]) -> PretrainConfig:
        return apply_overrides(self, assignments, get_config("mae_vit_base_patch16"))


def normalization_for(
    in_chans: int,
    mean: tuple[float, ...] | None,
    std: tuple[float, ...] | None,
    init: str | None = None,
) -> Normalization:
    """A run's pixel normalisation: ``in_chans`` channels, its ``mean`` and ``std`` where set,
    else what the ``init`` checkpoint records (``recorded_normalization``), else the defaults.
    Every mistake is one TrainingError."""
    try:
        if init:
            return recorded_normalization(init, in_chans, mean, std)
        return Normalization.for_channels(in_chans, mean, std)
    except ValueError as err:
        raise TrainingError(f"model.in_chans={in_chans}, mean={mean}, std={std}: {err}") from None


def tuples_from_json(d: dict[str, Any]) -> dict[str, Any]:
    """JSON's lists as the tuples the configs hold (mean and std)."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}


def model_from_preset(get: Callable, preset: str, overrides: dict[str, Any]) -> Any:
    """``get(preset, **overrides)`` (a config getter), with every mistake as one TrainingError."""
    try:
        fields = set(get(preset).to_dict())
    except ValueError as err:
        raise TrainingError(str(err)) from None
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise TrainingError(
            f"model.{unknown[0]}: not a model setting; model settings: {', '.join(sorted(fields))}"
        )
    try:
        return get(preset, **overrides)
    except (ValueError, TypeError) as err:
        raise TrainingError(f"model ({preset} with {_shown(overrides)}): {err}") from None


def _shown(overrides: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in overrides.items()) or "no changes"


def apply_overrides(config: Any, assignments: list[str], model_defaults: Any = None) -> Any:
    """A copy of the dataclass ``config`` with ``key=value`` strings applied, each value parsed
    to its field's type (``none`` for optional fields). ``model.KEY=VALUE`` sets an entry of the
    ``model`` dict, parsed as the type of ``model_defaults``' field KEY."""
    types_ = {f.name: f.type for f in dataclasses.fields(config)}
    model_types = {} if model_defaults is None else model_defaults.to_dict()
    changes: dict[str, Any] = {}
    model = dict(getattr(config, "model", {}))
    for item in assignments:
        key, sep, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if sep and key.startswith("model.") and "model" in types_:
            name = key.removeprefix("model.")
            if name not in model_types:
                known = ", ".join(sorted(model_types))
                raise TrainingError(f"--set {item!r}: model settings are: {known}")
            model[name] = _parse_value(key, raw.strip(), type(model_types[name]).__name__)
            changes["model"] = model
            continue
        if not sep or key not in types_:
            known = ", ".join(sorted(types_))
            raise TrainingError(f"--set {item!r}: expected key=value with key one of: {known}")
        changes[key] = _parse_value(key, raw.strip(), str(types_[key]))
    return dataclasses.replace(config, **changes)


def _parse_value(key: str, raw: str, type_name: str) -> Any:
    try:
        return parse_setting(key, raw, type_name)
    except ValueError as err:
        raise TrainingError(str(err)) from None


# --------------------------------------------------------------------------- the train step


def loss_and_grads(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    fixed: nnx.State,
    imgs_NxHxWxC: jax.Array,
    noise_NxL: jax.Array,
    mask_ratio: float,
) -> tuple[jax.Array, nnx.State]:
    """The MAE loss of a batch under the masks that ``noise`` selects, and its parameter gradients."""

    def loss_fn(p):
        model = nnx.merge(graphdef, p, fixed)
        return model(imgs_NxHxWxC, noise=noise_NxL, mask_ratio=mask_ratio)[0]

    return jax.value_and_grad(loss_fn)(params)


def device_grads(
    params: nnx.State,
    fixed: nnx.State,
    imgs_NxHxWxC: jax.Array,
    key: jax.Array,
    step: jax.Array,
    *,
    graphdef: nnx.GraphDef,
    mask_ratio: float,
    num_patches: int,
) -> tuple[jax.Array, nnx.State]:
    """Loss and gradients of one device's shard with its own masks, averaged over all devices."""
    loss, grads = _local_loss_and_grads(
        params, fixed, imgs_NxHxWxC, key, step, graphdef, mask_ratio, num_patches
    )
    return jax.lax.pmean(loss, AXIS), jax.lax.pmean(grads, AXIS)


def _local_loss_and_grads(
    params, fixed, imgs_NxHxWxC, key, step, graphdef, mask_ratio, num_patches
):
    """This device's loss and gradients for micro-step ``step``, masks from its own key."""
    device_key = masking.step_device_key(key, step, AXIS)
    noise = masking.random_noise(device_key, imgs_NxHxWxC.shape[0], num_patches)
    return loss_and_grads(graphdef, params, fixed, imgs_NxHxWxC, noise, mask_ratio)


def to_model_input(imgs: jax.Array, norm: Normalization = IMAGENET) -> jax.Array:
    """Batches arrive as uint8 pixels (a quarter of float32's bytes) and are normalized here, on
    the device, with ``norm``; float batches are taken as already normalized."""
    if imgs.dtype == jnp.uint8:
        return norm.on_device(imgs)
    return imgs


def train_step(
    params: nnx.State,
    opt_state: optax.OptState,
    fixed: nnx.State,
    imgs_AxNxHxWxC: jax.Array,
    key: jax.Array,
    step: jax.Array,
    lr: jax.Array,
    *,
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    mask_ratio: float,
    num_patches: int,
    shards: OptimizerShards | None = None,
    norm: Normalization = IMAGENET,
) -> tuple[nnx.State, optax.OptState, dict[str, jax.Array]]:
    """One optimizer step on one device, over ``A = accum_iter`` micro-batches [A, N, H, W, C].

    The micro-batches' gradients are summed on the device; then one all-reduce (or, with
    ``shards``, one reduce-scatter and one all-gather) and one update: ``p -= lr * tx(grads)``.
    ``tx`` is the optimizer without its learning rate (``optim.pretrain_direction``); ``lr`` comes
    from the host. Micro-batch i draws its masks for micro-step ``step + i``. uint8 images are
    normalised on the device with ``norm``.
    """
    accum = imgs_AxNxHxWxC.shape[0]
    args = (graphdef, mask_ratio, num_patches)
    if accum == 1:
        loss, grads = _local_loss_and_grads(
            params, fixed, to_model_input(imgs_AxNxHxWxC[0], norm), key, step, *args
        )
    else:

        def micro(carry, i_imgs):
            i, imgs = i_imgs
            loss_i, grads_i = _local_loss_and_grads(
                params, fixed, to_model_input(imgs, norm), key, step + i, *args
            )
            return jax.tree.map(jnp.add, carry, (loss_i, grads_i)), None

        zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
        (loss, grads), _ = jax.lax.scan(micro, zeros, (jnp.arange(accum), imgs_AxNxHxWxC))
        loss, grads = jax.tree.map(lambda x: x / accum, (loss, grads))
    loss = jax.lax.pmean(loss, AXIS)
    if shards is None:
        grads = jax.lax.pmean(grads, AXIS)
        direction, opt_state = tx.update(grads, opt_state, params)
        params = jax.tree.map(lambda p, d: p - lr * d, params, direction)
        grad_norm = optax.tree.norm(grads)
    else:
        grad_shards = shards.reduce_scatter_mean(grads)
        param_shards = shards.local_shards(params)
        direction, opt_state = tx.update(grad_shards, opt_state, param_shards)
        params = shards.all_gather(
            jax.tree.map(lambda p, d: p - lr * d, param_shards, direction), params
        )
        grad_norm = jnp.sqrt(jax.lax.psum(optax.tree.norm(grad_shards, squared=True), AXIS))
    return params, opt_state, {"loss": loss, "grad_norm": grad_norm}


class OptimizerShards:
    """ZeRO-1 inside the pmap: each of the n devices keeps and updates 1/n of the optimizer state.

    Every parameter is flattened and zero-padded to n * k values; device d owns values
    [d*k, (d+1)*k). In the step, gradients are reduce-scattered (each device receives the mean
    of its slice), the optimizer updates the slice, and the updated slices are all-gathered into
    the full parameters, which stay replicated. On the host, ``shard``/``unshard`` convert the
    optimizer state between this layout (leading device axis, one slice per device) and the
    full state that checkpoints hold, so a run can resume with either layout.

    With several hosts, n counts the devices of all of them and a host holds the slices of its
    own devices: ``local_rows`` are their indices on the pmap axis (``local_axis_indices``).
    ``unshard`` gathers every host's slices (a collective, at saves only), so each host gets
    the full state and checkpoints keep the one layout whatever the hosts.
    """

    def __init__(self, params: nnx.State, n: int, local_rows: np.ndarray | None = None):
        self.n = n
        self.shapes = jax.tree.map(lambda p: tuple(np.shape(p)), params)
        self.local_rows = np.arange(n) if local_rows is None else np.asarray(local_rows)
        # The rows of every host, in the order process_allgather stacks the hosts' slices.
        self.all_rows = multihost.gather_ints(self.local_rows).reshape(-1)

    def _slice_len(self, shape: tuple[int, ...]) -> int:
        return -(-math.prod(shape) // self.n)

    def template(self) -> Any:
        """Zero slices, shaped as one device's share of every parameter (for ``tx.init``)."""
        return jax.tree.map(
            lambda shape: np.zeros(self._slice_len(shape), np.float32),
            self.shapes,
            is_leaf=lambda x: isinstance(x, tuple),
        )

    def _padded_flat(self, x: jax.Array) -> jax.Array:
        flat = x.reshape(-1)
        return jnp.pad(flat, (0, self.n * self._slice_len(x.shape) - flat.size))

    # -- inside the step (collectives over AXIS)

    def reduce_scatter_mean(self, grads: nnx.State) -> nnx.State:
        def scatter(g):
            return jax.lax.psum_scatter(self._padded_flat(g), AXIS, tiled=True) / self.n

        return jax.tree.map(scatter, grads)

    def local_shards(self, params: nnx.State) -> nnx.State:
        index = jax.lax.axis_index(AXIS)

        def take(p):
            k = self._slice_len(p.shape)
            return jax.lax.dynamic_slice(self._padded_flat(p), (index * k,), (k,))

        return jax.tree.map(take, params)

    def all_gather(self, new_shards: nnx.State, like: nnx.State) -> nnx.State:
        def gather(s, p):
            full = jax.lax.all_gather(s, AXIS, tiled=True)
            return full[: p.size].reshape(p.shape).astype(p.dtype)

        return jax.tree.map(gather, new_shards, like)

    # -- on the host

    def shard(self, full_state: Any, sharded_like: Any) -> Any:
        """Full optimizer state -> [local devices, ...] leaves (this host's slices, or copies of
        scalars)."""
        rows = len(self.local_rows)

        def split(full, like):
            full = np.asarray(full)
            if full.shape == np.shape(like):  # not parameter-shaped (the step count): copy it
                return np.broadcast_to(full, (rows, *full.shape)).copy()
            k = np.shape(like)[0]
            flat = np.zeros(self.n * k, full.dtype)
            flat[: full.size] = full.reshape(-1)
            return flat.reshape(self.n, k)[self.local_rows]

        return jax.tree.map(split, full_state, sharded_like)

    def unshard(self, device_state: Any, full_like: Any) -> Any:
        """[local devices, ...] leaves of every host -> the full optimizer state, as host arrays
        (with several hosts, a collective that every host must call)."""
        local = jax.tree.map(np.asarray, device_state)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            hosts = multihost_utils.process_allgather(local)  # [hosts, local devices, ...]
            local = jax.tree.map(lambda x: np.asarray(x).reshape(-1, *x.shape[2:]), hosts)

        def join(dev, full):
            if dev.shape[1:] == np.shape(full):
                return dev[0]
            ordered = np.empty_like(dev)
            ordered[self.all_rows] = dev
            return ordered.reshape(-1)[: np.size(full)].reshape(np.shape(full))

        return jax.tree.map(join, local, full_like)


def make_train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    *,
    mask_ratio: float,
    num_patches: int,
    shards: OptimizerShards | None = None,
    norm: Normalization = IMAGENET,
) -> Callable:
    """The pure per-device step, its static settings bound; collectives over ``AXIS``."""
    return functools.partial(
        train_step,
        graphdef=graphdef,
        tx=tx,
        mask_ratio=mask_ratio,
        num_patches=num_patches,
        shards=shards,
        norm=norm,
    )


def make_p_train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    mask_ratio: float,
    num_patches: int,
    shards: OptimizerShards | None = None,
    norm: Normalization = IMAGENET,
) -> Callable:
    """``train_step`` over every local device: the only ``jax.pmap`` of training.

    Arguments: params and fixed tables replicated (leading device axis), the optimizer state
    replicated or, with ``shards``, one slice per device; images [devices, A, N, H, W, C]; then
    the base key, the micro-step and the lr, shared by all devices.
    """
    step_fn = make_train_step(
        graphdef, tx, mask_ratio=mask_ratio, num_patches=num_patches, shards=shards, norm=norm
    )
    return jax.pmap(
        step_fn, axis_name=AXIS, in_axes=(0, 0, 0, 0, None, None, None), donate_argnums=(0, 1)
    )


def make_sharded_train_step(step_fn: Callable, mesh: jax.sharding.Mesh) -> Callable:
    """``step_fn`` (from ``make_train_step``) under ``jax.shard_map`` on ``mesh``, whose one axis
    is ``AXIS``, in pmap's layout: state and images with a leading device axis, the key, the
    micro-step and the lr shared. Training runs the pmap; this form compiles ahead of time for
    devices that are not attached (``bench/plan_tpu.py``) and lowers for other platforms."""
    spec, shared = jax.sharding.PartitionSpec(AXIS), jax.sharding.PartitionSpec()

    def per_device(params, opt_state, fixed, imgs, key, step, lr):
        squeeze = functools.partial(jax.tree.map, lambda x: x[0])
        out = step_fn(*squeeze((params, opt_state, fixed, imgs)), key, step, lr)
        return jax.tree.map(lambda x: x[None], out)

    mapped = jax.shard_map(
        per_device,
        mesh=mesh,
        in_specs=(spec, spec, spec, spec, shared, shared, shared),
        out_specs=spec,
        check_vma=False,
    )
    return jax.jit(mapped, donate_argnums=(0, 1))


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
        raise TrainingError(f"batch of {images_BxHxWxC.shape[0]} does not split over {n} devices")
    return images_BxHxWxC.reshape(n, -1, *images_BxHxWxC.shape[1:])


# --------------------------------------------------------------------------- state and checkpoints


@dataclasses.dataclass
class TrainState:
    """Host-side handle on the replicated training state."""

    graphdef: nnx.GraphDef
    params: nnx.State  # replicated: leading device axis
    fixed: nnx.State  # replicated fixed tables (position embeddings)
    opt_state: optax.OptState  # replicated
    step: int  # micro-steps done


def split_model(model: MaskedAutoencoderViT) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    graphdef, params, fixed = nnx.split(model, nnx.Param, FixedEmbedding)
    return graphdef, params, fixed


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


# --------------------------------------------------------------------------- the loop


def _save_or_stop(previous, step, total_steps, config, ckpts, save, stop, summary) -> bool:
    """The end of a training step that moved from micro-step ``previous`` to ``step``: save when
    it crossed a multiple of ``ckpt_every`` and at the last step; when ``stop`` (a
    ``multihost.StopRequest``, asked once per step on every host) says so, save (unless this
    step was just saved), record the signal in ``summary`` and return True. A save that failed
    in the background stops the run here (one line naming the checkpoint and the reason)."""
    ckpts.raise_if_failed()
    if _crossed(previous, step, config.ckpt_every) or step == total_steps:
        save()
    if not stop.should_stop():
        return False
    if ckpts.last_saved != step:
        save()
    summary["interrupted"] = signal.Signals(stop.signal).name
    return True


def resume_run(
    ckpts: Checkpoints, states: dict, opt_state: Any, loader: Any, config: Any, changes: list[str]
) -> tuple[dict, Any, int]:
    """(states, opt_state, step) to start from: the checkpoint of ``config.restore_step``, else
    the newest that verifies, restored (with the loader's position), and step 0 for a new run.
    Says where it resumes and the settings changed since (``run_settings.compare_with_saved``);
    after a ``restore_step``, the newer checkpoints are discarded (the run goes another way)."""
    chosen = {} if config.restore_step is None else {"restore_step": config.restore_step}
    resumed = ckpts.resume(states, opt_state, loader, **chosen)
    if resumed is None:
        return states, opt_state, 0
    states, opt_state, meta = resumed
    step = int(meta["step"])
    if jax.process_index() == 0:
        print(f"resuming from {ckpts.directory} at step {step} (epoch {loader.epoch})")
        for line in changes:
            print(f"changed since the last start: {line}")
    if config.restore_step is not None:
        ckpts.discard_after(step)
    return states, opt_state, step


def _close_run(ckpts, *closables) -> None:
    """Wait for the last asynchronous save and close the checkpoints (CheckpointSaveError if a
    save failed), then close everything else in any case."""
    try:
        ckpts.close()
    finally:
        for thing in closables:
            thing.close()


def _default_data_folder() -> str:
    from mae_jax import assets

    return str(assets.sample_images_dir())


def _recon_batch(folder, config: MAEConfig, count: int, norm: Normalization) -> np.ndarray | None:
    """The first ``count`` readable images of the folder, center-cropped: the fixed figure set."""
    from mae_jax.data import DataError, decode_bytes, square_image

    imgs = []
    for index in range(len(folder)):
        if len(imgs) == count:
            break
        try:
            encoded, name = folder.read(index)
            img = decode_bytes(encoded, name, norm.channels)
            imgs.append(square_image(img, config.img_size, center_crop=True, norm=norm))
        except (DataError, OSError):
            continue
    return np.stack(imgs) if imgs else None


def _write_reconstructions(
    model, imgs, workdir: Any, step: int, seed: int, mask_ratio: float, norm: Normalization
):
    from mae_jax import visualize

    figure = visualize.reconstruction_figure(
        model, imgs, seed=seed, mask_ratio=mask_ratio, note=f"step {step}", norm=norm
    )
    visualize.save_png(figure, workdir / "reconstructions" / f"step_{step:08d}.png")


def compute_dtype(name: str, platform: str | None = None) -> Any:
    """The compute dtype of a ``dtype`` setting: "auto" is bfloat16 on GPU and TPU, float32 on
    CPU (where the golden tests and parity checks run, and bfloat16 matmuls are slow)."""
    if name == "auto":
        name = "float32" if (platform or jax.default_backend()) == "cpu" else "bfloat16"
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}.get(name)
    if dtype is None:
        raise TrainingError(f"dtype must be auto, float32 or bfloat16, got {name!r}")
    return dtype


@dataclasses.dataclass
class DeviceBatch:
    """One optimizer step's images on the devices, and where the loader stood after them."""

    epoch: int
    images: jax.Array  # [devices, accum_iter, per-device batch, H, W, C], uint8
    data_state: dict[str, Any]
    skipped_images: int


def device_batches(loader, *, used_per_epoch: int, accum_iter: int, ahead: int):
    """DeviceBatch after DeviceBatch, ``ahead`` of them already sent to the local devices.

    ``device_put`` returns at once and copies in the background, so while a step runs the next
    ``ahead`` batches travel to the devices. Left-over micro-batches at the end of an epoch
    (fewer than ``accum_iter``) are read and dropped, as the lr schedule expects.
    """
    n_dev = jax.local_device_count()
    mesh = jax.sharding.Mesh(np.array(jax.local_devices()), (AXIS,))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(AXIS))

    def produce():
        while True:
            group = []
            while len(group) < accum_iter:
                if loader.step >= used_per_epoch:
                    next(loader)
                    continue
                epoch, batch = next(loader)
                group.append(shard_batch(batch["image"], n_dev))
            images = jax.device_put(np.stack(group, axis=1), sharding)
            yield DeviceBatch(epoch, images, loader.get_state(), loader.num_skipped)

    source = produce()
    queue = collections.deque(itertools.islice(source, ahead))
    while True:
        queue.append(next(source))
        yield queue.popleft()


def _steady_state():
    """The context of one step between two sync points (log, save, figure, interrupt).

    Nothing in it reads a device value, so the host runs ahead of the devices. The tests replace
    it with ``jax.transfer_guard_device_to_host("disallow")`` plus a trap on host reads that also
    works on CPU (where the guard sees no transfer), and run the steps under it.
    """
    return contextlib.nullcontext()


def _crossed(before: int, after: int, every: int) -> bool:
    """Whether a multiple of ``every`` lies in (before, after]: steps advance by accum_iter."""
    return every > 0 and after // every > before // every


def pretrain(config: PretrainConfig, workdir: str | os.PathLike, *, progress: bool = True) -> dict:
    """Run (or resume) pretraining in ``workdir``; returns a summary of the run."""
    check_settings(config)  # every bad value is one line before anything is made or written
    model_config = config.model_config()
    check_settings(config, model_config.num_patches)
    norm = normalization_for(model_config.in_chans, config.mean, config.std)
    multihost.check_same_settings(config.to_dict())
    workdir = make_workdir(workdir)
    with WorkdirLock(workdir) as lock, multihost.StopRequest() as stop:
        return _pretrain(config, model_config, norm, workdir, lock, stop, progress)


def _pretrain(config, model_config, norm, workdir, lock, stop, progress) -> dict:
    """``pretrain`` in its workdir, holding its lock, with signals turned into a stop."""
    from mae_jax import data as data_lib

    changes = compare_with_saved(workdir, config, _model_dict)
    dtype = compute_dtype(config.dtype)

    # ---- data: this host's shard, batches of batch_size * local devices
    n_dev = jax.local_device_count()
    folder = data_lib.open_dataset(config.data or _default_data_folder())
    host_batch = config.batch_size * n_dev
    if config.data is None and len(folder) < host_batch:
        # The bundled folder holds 7 photographs: list it often enough to fill one batch on any
        # number of devices (each copy gets its own random crops).
        copies = math.ceil(host_batch / len(folder))
        folder.paths, folder.labels = folder.paths * copies, np.tile(folder.labels, copies)
    loader = data_lib.pretrain_batches(
        folder,
        batch_size=host_batch,
        img_size=model_config.img_size,
        seed=config.seed,
        shard_index=jax.process_index(),
        shard_count=jax.process_count(),
        read_threads=config.read_threads,
        worker_count=config.worker_count,
        pixels="uint8",
        norm=norm,
    )
    try:
        return _pretrain_with_data(
            config,
            model_config,
            norm,
            workdir,
            lock,
            stop,
            progress,
            folder,
            loader,
            changes,
            dtype,
        )
    finally:
        loader.close()


def _pretrain_with_data(
    config, model_config, norm, workdir, lock, stop, progress, folder, loader, changes, dtype
) -> dict:
    n_dev = jax.local_device_count()
    host_batch = config.batch_size * n_dev
    if jax.process_index() == 0:
        write_settings(workdir, config)  # only now that the data opened
    # ---- model and optimizer
    global_batch = host_batch * jax.process_count()
    plan = plan_steps(config, loader.steps_per_epoch, global_batch)
    accum = config.accum_iter
    # Whole optimizer steps only (max_steps is rounded up to one).
    total_steps = -(-plan.total_steps // accum) * accum
    # The lr of every optimizer step, computed once: the loop then never waits for the device.
    lr_table = np.asarray(jax.jit(plan.schedule)(np.arange(total_steps // accum)))
    model = MaskedAutoencoderViT(
        model_config,
        rngs=nnx.Rngs(config.seed),
        dtype=dtype,
        remat=config.remat,
        attention=config.attention,
    )
    graphdef, params, fixed = split_model(model)
    decay_mask = optim.pretrain_decay_mask(params)
    tx = optim.pretrain_direction(weight_decay=config.weight_decay, mask=decay_mask)
    opt_state = tx.init(params)  # the full state, as checkpoints hold it
    shards = (
        OptimizerShards(params, jax.device_count(), local_axis_indices(n_dev))
        if config.shard_optimizer
        else None
    )

    # ---- restore
    ckpts = Checkpoints(workdir, keep=config.keep_checkpoints)
    stop.agree_through(ckpts.manager.reached_preemption)
    _, opt_state, step = resume_run(
        ckpts, {"params": params, "fixed": fixed}, opt_state, loader, config, changes
    )
    full_opt_like = jax.tree.map(np.asarray, opt_state)
    if shards is None:
        device_opt = replicate(opt_state, n_dev)
    else:
        device_opt = shards.shard(opt_state, tx.init(shards.template()))
    state = TrainState(
        graphdef, replicate(params, n_dev), replicate(fixed, n_dev), device_opt, step
    )
    # The replicas are the state from here on: free the host copies (1.3 GB for ViT-B).
    del model, params, fixed, opt_state, device_opt
    p_train_step = make_p_train_step(
        graphdef, tx, config.mask_ratio, model_config.num_patches, shards, norm
    )
    base_key = jax.random.key(config.seed)
    batches = device_batches(
        loader, used_per_epoch=plan.used_per_epoch, accum_iter=accum, ahead=config.prefetch
    )

    # ---- observability (the first host writes logs and figures; every host writes checkpoints)
    is_main = jax.process_index() == 0
    metrics_log = MetricsLog(workdir, enabled=is_main, resumed_at=step or None)
    recon_imgs = (
        _recon_batch(folder, model_config, config.recon_images, norm)
        if config.recon_every and is_main
        else None
    )
    bar = _progress(progress and is_main, total_steps, step)
    # Metrics stay on the devices until they are read at a log step or before a save.
    pending: list[tuple[int, int, float, dict[str, jax.Array]]] = []
    t_window = time.perf_counter()
    summary = {"start_step": step, "interrupted": None}
    last = DeviceBatch(loader.epoch, None, loader.get_state(), loader.num_skipped)

    def read_metrics() -> list[dict[str, float]]:
        """Fetch the pending metrics; stop the run (before anything is saved) if one is not
        finite: the last checkpoint then stays the last good one."""
        rows = []
        for (step_, epoch, lr, _), values in zip(
            pending, jax.device_get([m for *_, m in pending]), strict=True
        ):
            loss, grad_norm = float(values["loss"][0]), float(values["grad_norm"][0])
            check_finite(loss, grad_norm, step_, epoch, ckpts)
            rows.append({"loss": loss, "grad_norm": grad_norm, "lr": lr, "epoch": epoch})
        pending.clear()
        return rows

    def write_figure():
        model = nnx.merge(graphdef, unreplicate(state.params), unreplicate(state.fixed))
        _write_reconstructions(
            model, recon_imgs, workdir, state.step, config.seed, config.mask_ratio, norm
        )

    def save():
        window.extend(read_metrics())
        meta = {
            "step": state.step,
            "epoch": last.epoch,
            **Checkpoints.position(last.data_state),
            "seed": config.seed,
            "config": config.to_dict(),
        }
        if shards is None:
            opt_host = unreplicate(state.opt_state)
        else:
            opt_host = shards.unshard(state.opt_state, full_opt_like)
        lock.check()
        ckpts.save(
            state.step,
            {"params": unreplicate(state.params), "fixed": unreplicate(state.fixed)},
            opt_host,
            meta,
        )
        metrics_log.flush()

    window: list[dict[str, float]] = []
    try:
        while state.step < total_steps:
            before = state.step
            with _steady_state():
                batch = next(batches)
                lr = lr_table[before // accum]
                state.params, state.opt_state, metrics = p_train_step(
                    state.params,
                    state.opt_state,
                    state.fixed,
                    batch.images,
                    base_key,
                    before,
                    lr,
                )
                state.step += accum
                last = batch
                pending.append((before, batch.epoch, float(lr), metrics))
                bar.update(accum)
            final = state.step >= total_steps
            if _crossed(before, state.step, config.log_every) or final:
                window.extend(read_metrics())
                now = time.perf_counter()
                record = {
                    "step": state.step,
                    "epoch": batch.epoch,
                    "loss": float(np.mean([r["loss"] for r in window])),
                    "grad_norm": float(np.mean([r["grad_norm"] for r in window])),
                    "lr": window[-1]["lr"],
                    "images_per_s": len(window) * accum * global_batch / (now - t_window),
                    "skipped_images": batch.skipped_images,
                }
                metrics_log.write(record)
                bar.set_postfix(
                    loss=f"{record['loss']:.4f}",
                    lr=f"{record['lr']:.2e}",
                    img_s=f"{record['images_per_s']:.1f}",
                )
                window, t_window = [], now
            if recon_imgs is not None and _crossed(before, state.step, config.recon_every):
                write_figure()
            if _save_or_stop(before, state.step, total_steps, config, ckpts, save, stop, summary):
                break
    finally:
        _close_run(ckpts, bar, metrics_log)
    summary.update(end_step=state.step, total_steps=total_steps, skipped_images=last.skipped_images)
    if recon_imgs is not None and summary["interrupted"] is None:
        write_figure()
    return summary


def check_finite(loss: float, grad_norm: float, step: int, epoch: int, ckpts: Checkpoints) -> None:
    """TrainingError naming the step and the last good checkpoint when a metric is not finite."""
    if math.isfinite(loss) and math.isfinite(grad_norm):
        return
    what = f"loss is {loss}" if not math.isfinite(loss) else f"gradient norm is {grad_norm}"
    last = ckpts.latest_step()
    kept = (
        f"The last good checkpoint (step {last}) is intact; to go on, resume from it or an "
        "earlier one (--set restore_step=N) with a lower lr (--set blr=... or lr=...)."
        if last is not None
        else "No checkpoint was written yet."
    )
    raise TrainingError(f"{what} at step {step} (epoch {epoch}); stopped. {kept}")


@dataclasses.dataclass(frozen=True)
class StepPlan:
    schedule: optax.Schedule  # lr of each optimizer step
    used_per_epoch: int  # micro-batches trained per epoch: whole groups of accum_iter
    total_steps: int  # micro-steps of the run


def plan_steps(config: Any, iters_per_epoch: int, global_batch: int) -> StepPlan:
    """The lr schedule and step counts of a run (pretraining or fine-tuning config).

    lr = blr * global batch * accum_iter / 256 unless ``config.lr`` is set. The left-over
    micro-batches of an epoch (fewer than accum_iter) are skipped, so that the schedule's
    optimizer steps line up with the epochs.
    """
    if config.accum_iter > iters_per_epoch:
        raise TrainingError(
            f"accum_iter {config.accum_iter} exceeds the {iters_per_epoch} batches of an epoch"
        )
    used_per_epoch = (iters_per_epoch // config.accum_iter) * config.accum_iter
    total_steps = config.epochs * used_per_epoch
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    eff_batch = global_batch * config.accum_iter
    peak_lr = config.lr if config.lr is not None else optim.scaled_lr(config.blr, eff_batch)
    schedule = optim.epoch_schedule(
        peak_lr,
        min_lr=config.min_lr,
        epochs=config.epochs,
        warmup_epochs=config.warmup_epochs,
        iters_per_epoch=iters_per_epoch,
        accum_iter=config.accum_iter,
    )
    return StepPlan(schedule, used_per_epoch, total_steps)


def make_workdir(workdir: Any) -> Any:
    """``workdir`` as a run path (local or bucket), created; one line if it cannot be."""
    path = run_path(workdir)
    check_bucket(path)
    with naming(path):
        path.mkdir(parents=True, exist_ok=True)
    return path


def _model_dict(config: PretrainConfig) -> dict[str, Any]:
    return config.model_config().to_dict()


def _progress(enabled: bool, total: int, initial: int):
    if not enabled:
        return types.SimpleNamespace(
            update=lambda n: None, set_postfix=lambda **k: None, close=lambda: None
        )
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)
