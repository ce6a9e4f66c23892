"""The pure pretraining step: MAE loss and gradients on one device, summed over accum_iter
micro-batches, averaged over the devices, and one optimizer update (replicated, or ZeRO-1 with
``OptimizerShards``).

Nothing here touches the host: ``make_p_train_step`` is the one ``jax.pmap`` of pretraining and
``make_sharded_train_step`` the same step under ``jax.shard_map`` for ahead-of-time compilation.
The loop around it is ``mae_jax.train``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from mae_jax import masking, multihost, optim
from mae_jax.model import FixedEmbedding, MaskedAutoencoderViT
from mae_jax.normalization import IMAGENET, Normalization
from mae_jax.packing import NO_PACKING, NoPacking, Packing
from mae_jax.replication import AXIS


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
    packing: Packing | NoPacking = NO_PACKING,
) -> tuple[nnx.State, optax.OptState, dict[str, jax.Array]]:
    """One optimizer step on one device, over ``A = accum_iter`` micro-batches [A, N, H, W, C].

    The micro-batches' gradients are summed on the device; then one all-reduce (or, with
    ``shards``, one reduce-scatter and one all-gather) and one update: ``p -= lr * tx(grads)``.
    ``tx`` is the optimizer without its learning rate (``optim.pretrain_direction``); ``lr`` comes
    from the host. Micro-batch i draws its masks for micro-step ``step + i``. uint8 images are
    normalised on the device with ``norm``.

    With a ``Packing``, ``params`` and the parameter-shaped parts of ``opt_state`` are its flat
    buffers (what the training loop passes on GPUs, ``packs_state``): the model reads
    static slices of them, and the gradients are packed the same way, so that all-reduce,
    optimizer and update run on a few large buffers.
    """
    accum = imgs_AxNxHxWxC.shape[0]
    args = (graphdef, mask_ratio, num_patches)
    tree = packing.unpack(params)

    def local(imgs, micro_step):
        loss, grads = _local_loss_and_grads(
            tree, fixed, to_model_input(imgs, norm), key, micro_step, *args
        )
        return loss, packing.pack(grads)

    if accum == 1:
        loss, grads = local(imgs_AxNxHxWxC[0], step)
    else:

        def micro(carry, i_imgs):
            i, imgs = i_imgs
            return jax.tree.map(jnp.add, carry, local(imgs, step + i)), None

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


def packs_state(platform: str | None = None) -> bool:
    """Whether the training loop packs the step's parameters and optimizer state: on GPUs,
    where the host must dispatch each step faster than the device runs it and a call's host
    time grows with its buffers (ViT-B on this project's CPU: 4.9 ms with one buffer per
    parameter and moment, 0.73 ms packed; ``bench/bench_host.py``).

    The price is memory: XLA keeps the whole packed gradient buffer through the backward,
    where per parameter each gradient's all-reduce and update can run as soon as it is ready.
    Compiled for TPU v5e at 64 images per chip, ViT-L/16 needs 11.85 GiB packed against 10.67
    per parameter (``bench/plan_tpu.py --state``), so on TPU, with 16 to 32 GiB per chip, the
    loop does not pack. Nor on XLA:CPU: there the host is the device, a step takes seconds,
    and the float32 slices of the packed buffers are copied before the matmuls (the ViT-B step
    1.08x slower; ``bench/bench_packing.py``). ``platform``: where the step runs, by default
    jax's default backend."""
    return (platform or jax.default_backend()) in ("gpu", "cuda", "rocm")


def pretrain_optimizer(
    params: Any, *, packed: bool, **adamw: float
) -> tuple[Packing | NoPacking, optax.GradientTransformation]:
    """The layout of ``params`` (plain nested dicts, or their shapes) for the step, and the
    optimizer on that layout: ``optim.pretrain_direction`` (``adamw``: its weight_decay, b1, b2,
    eps) with the official weight-decay mask (``optim.pretrain_decay_mask``).

    ``packed``: two flat buffers, the parameters with weight decay (``"decay"``) and those
    without (``"no_decay"``), and decay on the first only: the same update, leaf for leaf, as
    the unpacked optimizer. Otherwise one buffer per parameter (``NO_PACKING``).
    """
    decays = optim.pretrain_decay_mask(params)
    if not packed:
        return NO_PACKING, optim.pretrain_direction(mask=decays, **adamw)
    packing = Packing(params, jax.tree.map(lambda d: "decay" if d else "no_decay", decays))
    mask = {group: group == "decay" for group in packing.groups}
    return packing, optim.pretrain_direction(mask=mask, **adamw)


def make_train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    *,
    mask_ratio: float,
    num_patches: int,
    shards: OptimizerShards | None = None,
    norm: Normalization = IMAGENET,
    packing: Packing | NoPacking = NO_PACKING,
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
        packing=packing,
    )


def make_p_train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    mask_ratio: float,
    num_patches: int,
    shards: OptimizerShards | None = None,
    norm: Normalization = IMAGENET,
    packing: Packing | NoPacking = NO_PACKING,
) -> Callable:
    """``train_step`` over every local device: the only ``jax.pmap`` of training.

    Arguments: params and fixed tables replicated (leading device axis), the optimizer state
    replicated or, with ``shards``, one slice per device; images [devices, A, N, H, W, C]; then
    the base key, the micro-step and the lr, shared by all devices. With a ``Packing``, params
    and optimizer state come packed (see ``train_step``).
    """
    step_fn = make_train_step(
        graphdef,
        tx,
        mask_ratio=mask_ratio,
        num_patches=num_patches,
        shards=shards,
        norm=norm,
        packing=packing,
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


@dataclasses.dataclass
class TrainState:
    """Host-side handle on the replicated training state."""

    graphdef: nnx.GraphDef
    params: dict  # replicated (leading device axis), plain nested dicts (nnx.to_pure_dict)
    fixed: dict  # replicated fixed tables (position embeddings), plain nested dicts
    opt_state: optax.OptState  # replicated
    step: int  # micro-steps done


def split_model(model: MaskedAutoencoderViT) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    graphdef, params, fixed = nnx.split(model, nnx.Param, FixedEmbedding)
    return graphdef, params, fixed
